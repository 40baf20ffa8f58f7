"""The docker backend's commands, checked against a recording runner: what it creates, with which
privileges, how secrets travel, what it refuses and what it removes."""

from __future__ import annotations

import json

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
                      ("docker", "container", "inspect"): container, ("docker", "inspect"): (0, "[]", ""), **(extra or {})}
    return runner


def _flags(argv: list[str], flag: str) -> list[str]:
    return [value for key, value in zip(argv, argv[1:]) if key == flag]


def test_the_bundle_gets_secrets_by_name_only_and_least_privilege(plan):  # noqa: F811
    runner = _runner()
    DockerBackend(Docker(runner)).start_bundle(plan, {"ANTHROPIC_API_KEY": SECRET, "GIT_TOKEN": "ghp_x" * 8})
    (create,) = runner.commands("docker", "create")
    assert SECRET not in " ".join(create) and not any("ghp_x" in arg for arg in create)
    env = _flags(create, "--env")
    assert "ANTHROPIC_API_KEY" in env and "GIT_TOKEN" in env
    # The values reach docker through its environment, never its argv.
    assert runner.envs[runner.calls.index(create)] == {"ANTHROPIC_API_KEY": SECRET, "GIT_TOKEN": "ghp_x" * 8}
    assert _flags(create, "--cap-drop") == ["ALL"] and "no-new-privileges" in _flags(create, "--security-opt")
    assert set(_flags(create, "--cap-add")) == {"NET_BIND_SERVICE", "SETUID", "SETGID", "DAC_OVERRIDE"}
    labels = dict(label.split("=", 1) for label in _flags(create, "--label"))
    assert labels[SLUG_LABEL] == plan.slug and labels[STATE_LABEL] == str(plan.state_dir)
    assert labels[ROLE_LABEL] == "bundle" and labels[FINGERPRINT_LABEL]
    assert _flags(create, "--ip") == [plan.network.bundle_ip] and _flags(create, "--network") == [plan.network.guest_side.name]
    mounts = _flags(create, "--mount")
    for state in plan.bundle.state_dirs:          # state dirs are the only writable mounts
        assert f"type=bind,source={state.host_path},target={state.target}" in mounts
    assert all(m.endswith(",readonly") for m in mounts if not any(str(s.host_path) in m for s in plan.bundle.state_dirs))
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


def test_the_guest_holds_no_capability_and_its_fence_is_applied_from_outside(plan):  # noqa: F811
    runner = _runner()
    DockerBackend(Docker(runner)).start_guest(plan)
    (create,) = runner.commands("docker", "create")
    assert _flags(create, "--cap-drop") == ["ALL"] and not _flags(create, "--cap-add")
    assert _flags(create, "--dns") == [plan.network.bundle_ip]
    assert "net.ipv6.conf.all.disable_ipv6=1" in _flags(create, "--sysctl")
    assert _flags(create, "--env-file") == [str(plan.guest.env_file.host_path)]
    assert not any("=" in e for e in _flags(create, "-e") + _flags(create, "--env"))    # no values on argv
    assert _flags(create, "--pids-limit") == [str(plan.guest.pids)]
    fences = runner.commands("docker", "run")
    assert [f[f.index("--entrypoint") + 1] for f in fences] == ["iptables-restore", "ip6tables-restore"]
    for fence in fences:
        assert _flags(fence, "--network") == [f"container:{plan.guest.name}"]
        assert set(_flags(fence, "--cap-add")) == {"NET_ADMIN", "NET_RAW"}
    rules = runner.inputs[runner.calls.index(fences[0])]
    assert f"--dport {plan.bundle.guest_ports[0][1]}" in rules and ":OUTPUT DROP" in rules


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
