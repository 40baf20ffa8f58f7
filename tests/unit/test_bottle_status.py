"""`doit status`: docker ps and smolvm ls output as they come, the state dir's files, the fence record
start writes, and the block status prints from them, with the number of engine calls it costs."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bottle_tasks import bottle_status as bs
from bottle_tasks.backends.smolmachines import Smolvm
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.fence_record import FENCE_FILE, FenceRecord, fence_document, read_fence
from bottle_tasks.labels import ROLE_LABEL, SLUG_LABEL, STATE_LABEL
from bottle_tasks.settings import ROOT
from bottle_tasks.sidecars.overlay import approve_route
from bottle_tasks.sidecars.audit import AuditFile, audit_record, encode_line, utc_stamp
from bottle_tasks.sidecars.supervise_store import Store
from bottle_tasks.tasks import observe as observe_tasks
from tests.unit.fakes import FakeRunner
from tests.unit.test_plan import plan, settings  # noqa: F401  (plan: the fixture)

FAKE_SMOLVM = ROOT / "tests" / "fakes" / "smolvm"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def ps_line(slug: str, role: str, state_dir: str, *, state: str = "running", status: str = "Up 3 hours",
            mounts: str = "", name: str | None = None) -> str:
    """One line of `docker ps -a --no-trunc --format '{{json .}}'` as docker prints it."""
    labels = (f"dev.claude-bottle.agent={slug},{SLUG_LABEL}={slug},{STATE_LABEL}={state_dir},{ROLE_LABEL}={role},"
              "dev.claude-bottle.fingerprint=0123456789abcdef0123")
    return json.dumps({
        "Command": '"sleep infinity"', "CreatedAt": "2026-12-02 09:00:00 +0000 UTC", "ID": "f" * 64,
        "Image": f"claude-bottle/agent:{slug}", "Labels": labels, "LocalVolumes": "1" if mounts else "0",
        "Mounts": mounts, "Names": name or f"bottle-{slug}-{role}", "Networks": f"bottle-{slug}-internal",
        "Ports": "", "RunningFor": "3 hours ago", "Size": "0B", "State": state, "Status": status})


# ---- docker ps ------------------------------------------------------------------------------------

def test_labels_split_on_commas_that_start_a_new_label_only():
    assert bs.parse_labels("a=1,dev.claude-bottle.state=/home/u/odd,dir,b=x=y,c=") == \
        {"a": "1", "dev.claude-bottle.state": "/home/u/odd,dir", "b": "x=y", "c": ""}
    assert bs.parse_labels("") == {}


def test_ps_lines_become_containers_and_noise_is_skipped():
    out = "\n".join([ps_line("alpha", "guest", "/s/alpha", mounts="bottle-alpha-workspace"), "", "garbage", "[1]"])
    (container,) = bs.parse_ps(out)
    assert (container.name, container.slug, container.role, container.state_dir, container.mounts) == \
        ("bottle-alpha-guest", "alpha", "guest", "/s/alpha", ("bottle-alpha-workspace",))


@pytest.mark.parametrize("state, status, expected", [
    ("running", "Up 3 hours (healthy)", "healthy"),
    ("running", "Up 3 hours (unhealthy)", "unhealthy"),
    ("running", "Up 2 seconds (health: starting)", "starting"),
    ("running", "Up 3 hours", "running"),
    ("exited", "Exited (137) 5 minutes ago", "exited"),
    ("created", "Created", "created"),
    ("restarting", "Restarting (1) 3 seconds ago", "restarting"),
])
def test_health_in_words(state, status, expected):
    assert bs.health(bs.Container("c", state, status)) == expected


def test_a_missing_container_is_missing():
    assert bs.health(None) == "missing"


@pytest.mark.parametrize("status, low, high", [
    ("Up Less than a second", 0, 1),
    ("Up 1 second", 1, 2),
    ("Up 45 seconds (healthy)", 45, 46),
    ("Up About a minute", 60, 120),
    ("Up 12 minutes (Paused)", 720, 780),
    ("Up About an hour (healthy)", 1800, 7200),
    ("Up 3 hours", 3 * 3600 - 1800, 4 * 3600),
    ("Up 4 days", 4 * 86400 - 1800, 5 * 86400),
    ("Up 3 weeks", 21 * 86400 - 1800, 28 * 86400),
    ("Up 5 months", 150 * 86400 - 1800, 180 * 86400),
    ("Up 2 years", 730 * 86400 - 1800, 1095 * 86400),
])
def test_docker_uptime_words_become_the_least_and_most_they_can_mean(status, low, high):
    assert bs.uptime_bounds(status) == (low, high)


@pytest.mark.parametrize("status", ["Exited (0) 2 hours ago", "Created", "Up for ever", ""])
def test_a_container_that_is_not_up_has_no_uptime(status):
    assert bs.uptime_bounds(status) is None


def test_a_restart_is_claimed_only_when_certain():
    proved = NOW - timedelta(hours=3)
    fresh = bs.Container("g", "running", "Up 5 minutes")
    old = bs.Container("g", "running", "Up 3 hours")       # could be 2.5 h to 4 h: started before or after
    assert bs.started_after(fresh, proved, NOW)
    assert not bs.started_after(old, proved, NOW)
    assert not bs.started_after(None, proved, NOW)


# ---- one bottle, formatted ------------------------------------------------------------------------

def _fence(hours_ago: float, epoch: str = "e1", backend: str = "docker") -> FenceRecord:
    return FenceRecord(NOW - timedelta(hours=hours_ago), epoch, backend, workspace_volume="bottle-alpha-workspace")


def _docker_bottle(guest="Up 3 hours", holder="Up 3 hours (healthy)", bundle="Up 3 hours (healthy)",
                   guest_state="running", **facts):
    containers = tuple(bs.parse_ps("\n".join([
        ps_line("alpha", "guest", "/s/alpha", state=guest_state, status=guest, mounts="bottle-alpha-workspace"),
        ps_line("alpha", "fence", "/s/alpha", status=holder, name="bottle-alpha-guestnet"),
        ps_line("alpha", "bundle", "/s/alpha", status=bundle)])))
    defaults = dict(fence=_fence(3.2), routes=3, approved_routes=1, pending=2, blocks_last_hour=4,
                    workspace=bs.Workspace(volume="bottle-alpha-workspace", size=5 * 1024 * 1024))
    return bs.BottleFacts("alpha", Path("/s/alpha"), containers, **{**defaults, **facts})


def test_a_healthy_docker_bottle_reads_as_one_block():
    assert bs.format_bottle(_docker_bottle(), NOW).split("\n") == [
        "alpha  docker  up 3 hours",
        "  guest running  bundle healthy  fence proved 3h12m ago",
        "  3 routes (+1 approved), 2 pending approvals, 4 blocks in the last hour",
        "  workspace 5.0 MiB in volume bottle-alpha-workspace",
    ]


def test_a_holder_restarted_after_the_proof_is_flagged_with_the_fix():
    text = bs.format_bottle(_docker_bottle(holder="Up 5 minutes (healthy)", guest="Up 5 minutes"), NOW)
    assert "  ! the fence holder was restarted outside doit after the proof: doit start agent=alpha" in text


def test_a_guest_restarted_in_its_namespace_is_flagged_as_such():
    text = bs.format_bottle(_docker_bottle(guest="Up 5 minutes"), NOW)
    assert "  ! the guest was restarted outside doit after the proof (its namespace, and the fence, stayed)" in text
    assert "fence holder was restarted" not in text


def test_an_unhealthy_holder_shows_next_to_the_running_guest_and_a_down_guest_has_no_fence():
    assert "guest running, fence holder unhealthy" in bs.format_bottle(_docker_bottle(holder="Up 3 hours (unhealthy)"), NOW)
    stopped = bs.format_bottle(_docker_bottle(guest="Exited (137) 1 minute ago", guest_state="exited"), NOW)
    assert "  guest exited  bundle healthy  fence -" in stopped


def test_without_a_record_the_fence_says_no_proof_and_counts_drop_what_does_not_apply():
    text = bs.format_bottle(_docker_bottle(fence=None, pending=None, approved_routes=0, routes=1,
                                           blocks_last_hour=1), NOW)
    assert "fence no proof recorded" in text
    assert "  1 route, 1 block in the last hour" in text and "approv" not in text


def _smol_bottle(machine_epoch="c1:42", state="running", **facts):
    bundle = tuple(bs.parse_ps(ps_line("gamma", "bundle", "/s/gamma", status="Up 2 hours (healthy)")))
    machine = bs.Machine("bottle-gamma-guest", state, {SLUG_LABEL: "gamma"}, machine_epoch)
    defaults = dict(machine=machine, fence=_fence(2.2, "c1:42", "smolmachines"), routes=0,
                    workspace=bs.Workspace(path="/s/gamma/workspace", size=1536))
    return bs.BottleFacts("gamma", Path("/s/gamma"), bundle, **{**defaults, **facts})


def test_a_smolmachines_bottle_compares_the_machines_boot_with_the_proved_one():
    same = bs.format_bottle(_smol_bottle(), NOW)
    assert same.split("\n")[:2] == ["gamma  smolmachines  up 2 hours", "  guest running  bundle healthy  fence proved 2h12m ago"]
    assert "workspace 1.5 KiB in /s/gamma/workspace" in same and "!" not in same
    rebooted = bs.format_bottle(_smol_bottle(machine_epoch="c1:99"), NOW)
    assert "  ! the guest machine was restarted outside doit after the proof: doit start agent=gamma" in rebooted


def test_a_smolmachines_guest_smolvm_could_not_list_is_unknown_with_the_reason():
    text = bs.format_bottle(_smol_bottle(machine=None, machines_problem="smolvm not found"), NOW)
    assert "guest unknown (smolvm not found)" in text


def test_a_bottle_with_nothing_running_is_down():
    down = bs.BottleFacts("beta", Path("/s/beta"), fence=None, routes=2,
                          workspace=bs.Workspace(volume="bottle-beta-workspace", missing=True))
    assert bs.format_bottle(down, NOW).split("\n") == [
        "beta  ?  down", "  guest missing  bundle missing  fence -", "  2 routes",
        "  workspace volume bottle-beta-workspace (missing)"]


def test_what_docker_and_the_state_dir_say_is_printable_before_it_is_shown():
    facts = bs.BottleFacts("evil\x1b[2J", Path("/s"), workspace=bs.Workspace(path="/s/\x1b]0;x\x07"))
    text = bs.format_bottle(facts, NOW)
    assert "\x1b" not in text and "\x07" not in text and "evil\\x1b[2J" in text


def test_no_bottles_at_all_says_how_to_start_one():
    assert bs.format_status([], NOW) == "no bottles on this machine (doit start agent=<name> starts one)"


# ---- gathering: the engine calls and the state dir's files ------------------------------------------


def _audit(state: Path, *records: dict) -> None:
    AuditFile(state / "audit").append([encode_line(r) for r in records])


def _stamp(seconds_ago: float) -> str:
    return utc_stamp(NOW.timestamp() - seconds_ago)


@pytest.fixture
def machine(tmp_path):
    """alpha: a docker bottle, up; beta: only its state dir; gamma: smolmachines, its bundle up."""
    root = tmp_path / "state"
    alpha, beta, gamma = root / "alpha", root / "beta", root / "gamma"
    for state in (alpha, beta, gamma):
        (state / "config").mkdir(parents=True)
    (alpha / "config" / "routes.yaml").write_text("version: 1\nroutes:\n  - host: a.test\n  - host: b.test\n")
    approve_route(alpha / "policy" / "overlay.json", "c.test", 443, request_id="req-00000001", by="alice")
    approve_route(alpha / "policy" / "overlay.json", "c.test", 8443, request_id="req-00000002", by="alice")
    (beta / "config" / "routes.yaml").write_text("version: 1\nroutes: []\n")
    (gamma / "config" / "routes.yaml").write_text("routes:\n  - host: a.test\n")
    Store(alpha / "supervise").create_request("Bash", {"command": "git push"}, "push it", 300)
    _audit(alpha,
           audit_record("egress", "request", "block", host="x.test", ts=_stamp(7200)),     # too old
           audit_record("egress", "request", "block", host="x.test", ts=_stamp(600)),
           audit_record("egress", "request", "allow", host="a.test", ts=_stamp(300)),
           audit_record("host", "decision", "deny", ts=_stamp(60)))
    (alpha / FENCE_FILE).write_text(json.dumps({"proved_at": _stamp(3 * 3600 + 600), "epoch": "t0", "backend": "docker",
                                                "workspace": {"volume": "bottle-alpha-workspace"}}))
    (gamma / FENCE_FILE).write_text(json.dumps({"proved_at": _stamp(7200 + 60), "epoch": "c1:42",
                                                "backend": "smolmachines",
                                                "workspace": {"path": str(gamma / "workspace")}}))
    (gamma / "workspace" / "src").mkdir(parents=True)
    (gamma / "workspace" / "src" / "main.py").write_bytes(b"x" * 1000)
    (gamma / "workspace" / "README").write_bytes(b"y" * 24)
    os.symlink("/etc/passwd", gamma / "workspace" / "link")        # not followed, not counted
    (tmp_path / "not-a-bottle").mkdir()
    volume = tmp_path / "volumes" / "bottle-alpha-workspace" / "_data"
    volume.mkdir(parents=True)
    (volume / "work.txt").write_bytes(b"z" * 2048)
    ps = "\n".join([
        ps_line("alpha", "guest", str(alpha), mounts="bottle-alpha-workspace"),
        ps_line("alpha", "fence", str(alpha), status="Up 3 hours (healthy)", name="bottle-alpha-guestnet"),
        ps_line("alpha", "bundle", str(alpha), status="Up 3 hours (healthy)"),
        ps_line("gamma", "bundle", str(gamma), status="Up 2 hours (healthy)"),
    ]) + "\n"
    volumes = json.dumps([{"Name": "bottle-alpha-workspace", "Mountpoint": str(volume), "Driver": "local"}])
    runner = FakeRunner({("docker", "ps"): (0, ps, ""), ("docker", "volume", "inspect"): (1, volumes, "")})
    return settings(tmp_path), runner, root


class FakeSmolvm:
    def __init__(self, machines=None, problem: Exception | None = None):
        self.listed = machines or []
        self.problem = problem
        self.calls = 0

    def machines(self):
        self.calls += 1
        if self.problem:
            raise self.problem
        return self.listed


GAMMA_MACHINE = {"name": "bottle-gamma-guest", "state": "running", "created_at": "c1", "pid": 42,
                 "labels": {SLUG_LABEL: "gamma", STATE_LABEL: "/s/gamma"}}


def test_status_of_every_bottle_costs_one_ps_one_volume_inspect_and_one_smolvm_call(machine):
    s, runner, root = machine
    smolvm = FakeSmolvm([GAMMA_MACHINE, {"name": "someone-elses", "state": "running", "labels": {}}])
    facts = observe_tasks.gather_status(s, Docker(runner), None, NOW, smolvm=smolvm)
    assert [c[:3] for c in runner.calls] == [["docker", "ps", "-a"], ["docker", "volume", "inspect"]]
    assert runner.calls[0] == ["docker", "ps", "-a", "--no-trunc", "--filter", f"label={SLUG_LABEL}",
                               "--format", "{{json .}}"]
    assert runner.calls[1][3:] == ["bottle-alpha-workspace", "bottle-beta-workspace"]
    assert smolvm.calls == 1
    text = bs.format_status(facts, NOW)
    assert text.split("\n\n") == [
        "alpha  docker  up 3 hours\n"
        "  guest running  bundle healthy  fence proved 3h10m ago\n"
        "  2 routes (+1 approved), 1 pending approval, 2 blocks in the last hour\n"
        "  workspace 2.0 KiB in volume bottle-alpha-workspace",
        "beta  ?  down\n"
        "  guest missing  bundle missing  fence -\n"
        "  0 routes, 0 blocks in the last hour\n"
        "  workspace volume bottle-beta-workspace (missing)",
        "gamma  smolmachines  up 2 hours\n"
        "  guest running  bundle healthy  fence proved 2h01m ago\n"
        "  1 route, 0 blocks in the last hour\n"
        f"  workspace 1.0 KiB in {root / 'gamma' / 'workspace'}",
    ]


def test_status_of_one_bottle_and_no_smolvm_call_when_none_can_be_smol(machine):
    s, runner, _ = machine
    smolvm = FakeSmolvm(problem=AssertionError("smolvm must not be asked"))
    (alpha,) = observe_tasks.gather_status(s, Docker(runner), "alpha", NOW, smolvm=smolvm)
    assert alpha.slug == "alpha" and alpha.backend == "docker" and smolvm.calls == 0
    assert observe_tasks.gather_status(s, Docker(runner), "nobody", NOW, smolvm=smolvm) == []


def test_status_without_smolvm_still_shows_the_rest(machine):
    s, runner, _ = machine
    smolvm = FakeSmolvm(problem=BottleError("smolvm is not installed (looked for smolvm on PATH)\nmore"))
    gamma = next(f for f in observe_tasks.gather_status(s, Docker(runner), None, NOW, smolvm=smolvm) if f.slug == "gamma")
    assert gamma.guest == "unknown (smolvm is not installed (looked for smolvm on PATH))"
    assert gamma.backend == "smolmachines"      # from its fence record


def test_a_volume_root_cannot_read_is_named_not_measured(machine, monkeypatch):
    s, runner, _ = machine
    monkeypatch.setattr(observe_tasks.os, "access", lambda path, mode: False)
    alpha = observe_tasks.gather_status(s, Docker(runner), "alpha", NOW)[0]
    assert alpha.workspace.words() == "volume bottle-alpha-workspace"


def test_the_workspace_walk_stops_at_its_limit_and_says_at_least(tmp_path):
    for n in range(5):
        (tmp_path / f"f{n}").write_bytes(b"x" * 100)
    assert observe_tasks.dir_size(tmp_path) == (500, False)
    size, capped = observe_tasks.dir_size(tmp_path, limit=3)
    assert capped and size == 300
    assert bs.Workspace(path="/w", size=size, capped=capped).words() == ">300 B in /w"


def test_smolvm_machine_ls_json_is_one_call_the_fake_smolvm_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER", "/nonexistent/docker")       # a created machine needs no docker
    runner_calls = []

    def run(argv, **options):
        from bottle_tasks.runner import run as real_run
        runner_calls.append(argv)
        return real_run(argv, **options)

    smolvm = Smolvm(str(FAKE_SMOLVM), runner=run)
    smolvm("machine", "create", "--name", "bottle-gamma-guest", "--label", f"{SLUG_LABEL}=gamma")
    runner_calls.clear()
    machines, problem = observe_tasks.list_machines(smolvm)
    assert runner_calls == [[str(FAKE_SMOLVM), "machine", "ls", "--json"]] and problem == ""
    assert machines["gamma"].name == "bottle-gamma-guest" and machines["gamma"].state == "created"


def test_a_smolvm_that_is_missing_is_a_reason_not_a_crash(tmp_path):
    machines, problem = observe_tasks.list_machines(Smolvm(str(tmp_path / "no-smolvm")))
    assert machines == {} and problem


# ---- the fence record start writes ---------------------------------------------------------------


class FakeBackend:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def start_guest(self, plan):
        if self.fail:
            raise BottleError("the fence canary reached the outside")

    def fence_epoch(self, plan):
        return "2026-12-02T09:00:00.000000001Z"


def test_start_records_when_and_on_which_boot_it_proved_the_fence(plan, monkeypatch):  # noqa: F811
    from bottle_tasks.tasks import bottle

    monkeypatch.setattr(bottle, "backend", lambda _plan: FakeBackend())
    plan.state_dir.mkdir(parents=True)
    before = datetime.now(timezone.utc)
    assert bottle._start_guest(plan) == {"fenced_start": "2026-12-02T09:00:00.000000001Z"}
    path = plan.state_dir / FENCE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document == {**fence_document(plan, "2026-12-02T09:00:00.000000001Z"), "proved_at": document["proved_at"]}
    record = read_fence(plan.state_dir)
    assert before - timedelta(seconds=1) <= record.proved_at <= datetime.now(timezone.utc)
    assert (record.epoch, record.backend, record.workspace_volume) == \
        ("2026-12-02T09:00:00.000000001Z", "docker", plan.guest.workspace_volume)
    from bottle_tasks.fence_record import forget_fence
    forget_fence(plan)
    assert read_fence(plan.state_dir) is None


def test_a_start_whose_fence_failed_records_no_proof(plan, monkeypatch):  # noqa: F811
    from bottle_tasks.tasks import bottle

    monkeypatch.setattr(bottle, "backend", lambda _plan: FakeBackend(fail=True))
    plan.state_dir.mkdir(parents=True)
    with pytest.raises(BottleError):
        bottle._start_guest(plan)
    assert not (plan.state_dir / FENCE_FILE).exists()


def test_a_host_directory_workspace_is_recorded_as_a_path(tmp_path):
    from bottle_tasks.plan import make_plan
    from bottle_tasks.spec import load_spec

    smol = make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path, BOTTLE_BACKEND="smolmachines"))
    document = fence_document(smol, "c1:42")
    assert document["workspace"] == {"path": str(smol.state_dir / "workspace")} and document["backend"] == "smolmachines"


@pytest.mark.parametrize("document", [None, [], {"epoch": "x"}, {"proved_at": "yesterday"}])
def test_a_fence_record_that_is_not_one_is_ignored(document):
    assert FenceRecord.parse(document) is None


def test_a_bundle_docker_has_not_checked_yet_gets_the_check_run_once():
    from bottle_tasks.backends.bundle import HEALTH_COMMAND
    from bottle_tasks.bottle_status import Container
    from bottle_tasks.docker_cli import Docker
    from bottle_tasks.labels import ROLE_LABEL
    from bottle_tasks.tasks.observe import first_health_verdict
    from tests.unit.fakes import FakeRunner

    starting = Container("bottle-x-bundle", "running", "Up 3 seconds (health: starting)", {ROLE_LABEL: "bundle"})
    for code, word in ((0, "(healthy)"), (1, "(health: starting)")):
        runner = FakeRunner({("docker", "exec"): (code, "", "")})
        assert word in first_health_verdict(Docker(runner), starting).status
        assert runner.calls == [["docker", "exec", "bottle-x-bundle", *HEALTH_COMMAND]]
    runner = FakeRunner()
    for other in (Container("bottle-x-guest", "running", "Up 3 seconds (health: starting)", {ROLE_LABEL: "guest"}),
                  Container("bottle-x-bundle", "running", "Up 3 hours (healthy)", {ROLE_LABEL: "bundle"})):
        assert first_health_verdict(Docker(runner), other) == other
    assert runner.calls == []
