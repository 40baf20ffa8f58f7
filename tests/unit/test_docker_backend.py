"""The docker backend's commands, checked against a recording runner: what it creates, with which
privileges, how secrets travel, what it refuses and what it removes."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from bottle_tasks.backends.docker import DockerBackend
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import FINGERPRINT_LABEL, ROLE_LABEL, SLUG_LABEL, STATE_LABEL
from tests.unit.fakes import FakeRunner
from tests.unit.test_bundle_plan import plan  # noqa: F401  (the fixture: every daemon, all files rendered)

SECRET = "sk-ant-api03-not-a-real-key-0000000000"


HEALTHY = {"Name": "/x", "State": {"Running": True, "Health": {"Status": "healthy"}}, "Config": {"Labels": {}}, "Id": "b"}


def _runner(extra=None):
    """No container of ours exists until `docker create` ran; after that it runs and is healthy."""
    runner = FakeRunner()

    def container(argv):
        if runner.commands("docker", "create"):
            return 0, json.dumps([HEALTHY]), ""
        return 1, "", "Error: No such container"

    runner.answers = {("docker", "image", "inspect"): (0, json.dumps([{"Id": "sha256:i"}]), ""),
                      ("docker", "container", "inspect"): container, ("docker", "inspect"): (0, "[]", ""),
                      ("docker", "volume", "inspect"): (1, "", "Error: No such volume"), **(extra or {})}
    return runner


def _flags(argv: list[str], flag: str) -> list[str]:
    return [value for key, value in zip(argv, argv[1:]) if key == flag]


def test_secrets_reach_the_bundle_as_a_root_only_file_never_in_its_env_or_an_argv(plan):  # noqa: F811
    runner = _runner()
    secrets = {"ANTHROPIC_API_KEY": SECRET, "GIT_TOKEN": "ghp_x" * 8}
    DockerBackend(Docker(runner)).start_bundle(plan, secrets)
    (create,) = runner.commands("docker", "create")
    assert not any(name in " ".join(call) for call in runner.calls for name in ("ghp_x", SECRET))
    # Not in Config.Env, not even by name: `docker inspect` of the bundle shows no token.
    assert not any(e.split("=")[0] in secrets for e in _flags(create, "--env"))
    assert all(env is None or not set(env) & set(secrets) for env in runner.envs)
    # They go in on stdin, as a tar holding one 0600 root file, after create and before start.
    (copy,) = runner.commands("docker", "cp")
    assert copy == ["docker", "cp", "-", f"{plan.bundle.name}:/var/lib/bottle"]
    assert runner.calls.index(create) < runner.calls.index(copy) < runner.calls.index(runner.commands("docker", "start")[0])
    with tarfile.open(fileobj=io.BytesIO(runner.inputs[runner.calls.index(copy)])) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.uid) == ("secrets.json", 0o600, 0)
        assert json.loads(tar.extractfile(member).read()) == secrets
    assert _flags(create, "--cap-drop") == ["ALL"] and "no-new-privileges" in _flags(create, "--security-opt")
    assert set(_flags(create, "--cap-add")) == {"NET_BIND_SERVICE", "SETUID", "SETGID", "DAC_OVERRIDE", "KILL"}
    labels = dict(label.split("=", 1) for label in _flags(create, "--label"))
    assert labels[SLUG_LABEL] == plan.slug and labels[STATE_LABEL] == str(plan.state_dir)
    assert labels[ROLE_LABEL] == "bundle" and labels[FINGERPRINT_LABEL]
    assert _flags(create, "--ip") == [plan.network.bundle_ip] and _flags(create, "--network") == [plan.network.guest_side.name]
    mounts = _flags(create, "--mount")
    for state in plan.bundle.state_dirs:          # state dirs are the only writable mounts (the overlay: read-only)
        assert f"type=bind,source={state.host_path},target={state.target}" + (",readonly" if state.readonly else "") \
            in mounts
    assert all(m.endswith(",readonly") for m in mounts
               if not any(str(s.host_path) in m for s in plan.bundle.state_dirs if not s.readonly))
    # The second network is joined after create, then the bundle starts and is waited on.
    assert runner.commands("docker", "network", "connect") == [["docker", "network", "connect", plan.network.outbound.name, plan.bundle.name]]
    assert runner.commands("docker", "start") == [["docker", "start", plan.bundle.name]]


def test_a_bundle_that_never_gets_healthy_is_removed_again(plan):  # noqa: F811
    dead = {"State": {"Running": False, "Status": "exited"}, "Config": {"Labels": {}}}
    runner = _runner({("docker", "logs"): (0, "egress: routes.yaml: bad\n", "")})
    runner.answers[("docker", "container", "inspect")] = (
        lambda argv: (0, json.dumps([dead]), "") if runner.commands("docker", "create") else (1, "", "No such container"))
    backend = DockerBackend(Docker(runner))
    with pytest.raises(BottleError, match="(?s)did not become healthy.*routes.yaml: bad"):
        backend.start_bundle(plan, {})
    assert runner.calls[-1] == ["docker", "rm", "-f", plan.bundle.name]


def test_a_name_held_by_someone_else_is_refused_and_left_alone(plan):  # noqa: F811
    squatter = {"State": {"Running": True}, "Config": {"Labels": {"other": "1"}}}
    runner = _runner({("docker", "container", "inspect"): (0, json.dumps([squatter]), "")})
    with pytest.raises(BottleError, match=f"docker container '{plan.guest.name}' already exists, created outside claude-bottle"):
        DockerBackend(Docker(runner)).start_guest(plan)
    assert not runner.commands("docker", "rm") and not runner.commands("docker", "create")


def test_the_guest_holds_no_capability_and_joins_a_namespace_whose_holder_applies_the_fence(plan):  # noqa: F811
    runner = _runner()
    backend = DockerBackend(Docker(runner))
    backend.start_guest(plan)
    holder_name = backend.netns_holder(plan)
    holder, guest = runner.commands("docker", "create")
    assert _flags(holder, "--name") == [holder_name] and _flags(guest, "--name") == [plan.guest.name]
    # The guest: no capability at all, in the holder's namespace (its address, DNS and fence).
    assert _flags(guest, "--cap-drop") == ["ALL"] and not _flags(guest, "--cap-add")
    assert _flags(guest, "--network") == [f"container:{holder_name}"]
    assert not _flags(guest, "--ip") and not _flags(guest, "--dns")
    assert _flags(guest, "--env-file") == [str(plan.guest.env_file.host_path)]
    assert not any("=" in e for e in _flags(guest, "-e") + _flags(guest, "--env"))    # no values on argv
    assert _flags(guest, "--pids-limit") == [str(plan.guest.pids)]
    # The holder: the only one with NET_ADMIN; it restarts by itself and fences itself at every start.
    assert set(_flags(holder, "--cap-add")) == {"NET_ADMIN", "NET_RAW"} and _flags(holder, "--cap-drop") == ["ALL"]
    assert _flags(holder, "--ip") == [plan.network.guest_ip] and _flags(holder, "--dns") == [plan.network.bundle_ip]
    assert _flags(holder, "--restart") == ["unless-stopped"]
    assert "net.ipv6.conf.all.disable_ipv6=1" in _flags(holder, "--sysctl")
    fence = dict(e.split("=", 1) for e in _flags(holder, "--env"))
    assert f"--dport {plan.bundle.guest_ports[0][1]}" in fence["BOTTLE_FENCE_V4"] and ":OUTPUT DROP" in fence["BOTTLE_FENCE_V4"]
    script = holder[-1]
    assert script.index("iptables-restore") < script.index("ip6tables-restore") < script.index("touch /run/bottle-fenced")
    # The mark lives on a /run that every start makes afresh (a restarted holder cannot show an old
    # namespace's mark), and the holder's health is that mark, not the bundle image's daemon check.
    assert _flags(holder, "--tmpfs") == ["/run:size=64k"]
    assert _flags(holder, "--health-cmd") == ["test -e /run/bottle-fenced"]
    # The guest is created only once the holder said the fence is in place.
    waited = runner.commands("docker", "exec", holder_name, "test", "-e", "/run/bottle-fenced")
    assert waited and runner.calls.index(waited[-1]) < runner.calls.index(guest)


def test_a_holder_that_cannot_fence_stops_the_start_and_is_removed(plan):  # noqa: F811
    runner = _runner({("docker", "exec"): (1, "", "")})
    dead = {"State": {"Running": False, "Status": "exited"}, "Config": {"Labels": {}}}
    runner.answers[("docker", "container", "inspect")] = (
        lambda argv: (0, json.dumps([dead]), "") if runner.commands("docker", "create") else (1, "", "No such container"))
    backend = DockerBackend(Docker(runner))
    with pytest.raises(BottleError, match="the guest's fence could not be applied"):
        backend.start_guest(plan)
    assert len(runner.commands("docker", "create")) == 1          # the guest was never created
    assert runner.calls[-1] == ["docker", "rm", "-f", backend.netns_holder(plan)]


def test_clean_selects_the_bottles_containers_by_label(plan):  # noqa: F811
    runner = _runner({("docker", "ps"): (0, "bottle-full-guest\nbottle-full-bundle\n", "")})
    DockerBackend(Docker(runner)).remove_all(plan)
    assert runner.commands("docker", "ps") == [["docker", "ps", "-a", "--filter", f"label={SLUG_LABEL}={plan.slug}",
                                                "--format", "{{.Names}}"]]
    assert runner.commands("docker", "rm") == [["docker", "rm", "-f", "bottle-full-guest", "bottle-full-bundle"]]


def test_root_never_runs_from_the_agents_workspace(plan):  # noqa: F811
    guest = DockerBackend(Docker(_runner())).guest(plan)
    as_root = guest.exec_argv(["id"], user="root")
    as_agent = guest.exec_argv(["id"])
    assert as_root[as_root.index("-w") + 1] == "/" and as_agent[as_agent.index("-w") + 1] == "/workspace"
    assert as_agent[as_agent.index("-u") + 1] == "agent"


def test_the_bundle_has_memory_and_pids_ceilings_sized_from_its_daemons(plan):  # noqa: F811
    runner = _runner()
    DockerBackend(Docker(runner)).start_bundle(plan, {})
    (create,) = runner.commands("docker", "create")
    memory = sum(d.memory_mib for d in plan.bundle.daemons) + 64
    assert _flags(create, "--memory") == [f"{memory}m"] and _flags(create, "--memory-swap") == [f"{memory}m"]
    assert _flags(create, "--pids-limit") == [str(sum(d.pids for d in plan.bundle.daemons) + 32)]


def test_resources_bundle_overrides_the_sized_limits_and_a_tiny_one_is_refused(tmp_path):
    from bottle_tasks.plan import make_plan
    from bottle_tasks.spec import load_spec
    from tests.unit.test_plan import settings

    path = tmp_path / "small.yaml"
    path.write_text("resources: {bundle: {memory: 2g, pids: 200}}\n")
    plan = make_plan(load_spec(path), settings(tmp_path))
    assert (plan.bundle.memory_mib, plan.bundle.pids) == (2048, 200)
    path.write_text("resources: {bundle: {memory: 100m}}\n")
    with pytest.raises(BottleError, match=r"small.yaml: resources.bundle.memory 100m is below 256m"):
        make_plan(load_spec(path), settings(tmp_path))


def test_until_docker_has_a_health_verdict_the_same_check_is_run_by_hand():
    """docker checks every 10 s (many idle bundles cost little); start and the up-to-date probe do not
    wait for its first verdict, nor trust a bundle docker has found unhealthy."""
    from bottle_tasks.backends.bundle import HEALTH_COMMAND

    def state(status):
        return {"State": {"Running": True, "Health": {"Status": status}}, "Config": {"Labels": {}}}

    for exec_code, expected in ((0, True), (1, False)):
        runner = FakeRunner({("docker", "exec"): (exec_code, "", "")})
        backend = DockerBackend(Docker(runner))
        assert backend.healthy("bottle-x-bundle", state("starting")) is expected
        assert runner.calls[-1] == ["docker", "exec", "bottle-x-bundle", *HEALTH_COMMAND]
    runner = FakeRunner({("docker", "exec"): (0, "", "")})
    backend = DockerBackend(Docker(runner))
    assert backend.healthy("bottle-x-bundle", state("unhealthy")) is False
    assert backend.healthy("bottle-x-bundle", state("healthy")) is True
    assert not runner.calls                    # docker's own verdict needs no exec


def test_the_workspace_volume_is_made_with_the_bottles_labels_and_a_foreign_one_is_refused(plan):  # noqa: F811
    """docker would make the volume unlabelled on first mount, and clean, `clean all=1` and leak checks
    select by label; an unlabelled one from before holds work and is kept; another bottle's is refused."""
    name = plan.guest.workspace_volume
    runner = FakeRunner({("docker", "volume", "inspect"): (1, "", "Error: No such volume")})
    DockerBackend(Docker(runner)).ensure_workspace_volume(plan)
    create = runner.commands("docker", "volume", "create")
    assert len(create) == 1 and create[0][-1] == name
    assert f"{SLUG_LABEL}={plan.slug}" in create[0] and f"{STATE_LABEL}={plan.state_dir}" in create[0]

    legacy = FakeRunner({("docker", "volume", "inspect"): (0, json.dumps([{"Name": name, "Labels": None}]), "")})
    DockerBackend(Docker(legacy)).ensure_workspace_volume(plan)
    assert not legacy.commands("docker", "volume", "create")

    foreign = {"Name": name, "Labels": {SLUG_LABEL: plan.slug, STATE_LABEL: "/elsewhere/state/" + plan.slug}}
    other = FakeRunner({("docker", "volume", "inspect"): (0, json.dumps([foreign]), "")})
    with pytest.raises(BottleError, match=f"docker volume {name!r}"):
        DockerBackend(Docker(other)).ensure_workspace_volume(plan)
    assert not other.commands("docker", "volume", "create")
