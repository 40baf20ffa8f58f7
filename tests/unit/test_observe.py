"""`doit logs` and `doit shell`: which audit records each filter keeps, how a record reads (escape
sequences spelled out, colour only where asked), following the stream across rotations, and the
shell's argv on a running and a stopped guest."""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import datetime, timedelta, timezone

import pytest

from bottle_tasks import observe
from bottle_tasks.backends.docker import DockerBackend
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.sidecars import audit
from bottle_tasks.sidecars.audit import AuditFile, audit_record, encode_line, records_since
from bottle_tasks.tasks import observe as observe_tasks
from tests.unit.fakes import FakeRunner
from tests.unit.test_plan import plan  # noqa: F401  (the fixture: agents/example.yaml on docker)

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=timezone.utc)


def _at(seconds_ago: float) -> str:
    return audit.utc_stamp((NOW - timedelta(seconds=seconds_ago)).timestamp())


SAMPLES = {
    "egress-block": audit_record("egress", "request", "block", reason_code="route_not_allowed", reason="no route",
                                 host="evil.test", port=443, method="GET", path="/", ts=_at(5)),
    "egress-allow": audit_record("egress", "request", "allow", host="api.anthropic.com", port=443, ts=_at(5)),
    "dlp-redact": audit_record("pipelock", "request", "redact", reason_code="dlp_match", dlp_pattern="aws_key",
                               dlp_where="body", ts=_at(5)),
    "git-push": audit_record("git-gate", "push", "block", reason_code="push_refused", ts=_at(5)),
    "held": audit_record("egress", "request", "hold", reason_code="unknown_host", ts=_at(5)),
    "approved": audit_record("host", "decision", "approve", ts=_at(5)),
    "expired": audit_record("supervise", "expired", "expire", ts=_at(5)),
    "approval-request": audit_record("egress", "approval_request", "info", ts=_at(5)),
    "daemon-start": audit_record("init", "daemon_start", "info", ts=_at(5)),
    "daemon-exit-elsewhere": audit_record("egress", "daemon_exit", "warn", ts=_at(5)),
}


def _kept(kinds: str) -> set[str]:
    keep = observe.LogFilter(observe.parse_kinds(kinds))
    return {name for name, record in SAMPLES.items() if keep(record)}


@pytest.mark.parametrize("kinds, expected", [
    ("block", {"egress-block", "git-push", "expired"}),
    ("dlp", {"dlp-redact"}),
    ("git", {"git-push"}),
    ("supervise", {"held", "approved", "expired", "approval-request"}),
    ("daemon", {"daemon-start", "daemon-exit-elsewhere"}),
    ("git,dlp", {"git-push", "dlp-redact"}),
    (" Block , daemon ", {"egress-block", "git-push", "expired", "daemon-start", "daemon-exit-elsewhere"}),
    ("", set(SAMPLES)),
])
def test_each_kind_keeps_exactly_its_records_and_several_kinds_add_up(kinds, expected):
    assert _kept(kinds) == expected


def test_a_deny_is_a_block_and_a_supervise_record(tmp_path):
    deny = audit_record("host", "decision", "deny", ts=_at(1))
    assert observe.LogFilter(("block",))(deny) and observe.LogFilter(("supervise",))(deny)
    assert not observe.LogFilter(("git",))(deny)


def test_an_unknown_kind_is_refused_with_the_valid_ones_listed():
    with pytest.raises(BottleError) as error:
        observe.parse_kinds("block,blocks")
    message = str(error.value)
    assert "'blocks'" in message and "'block'" not in message
    for kind in ("block", "dlp", "git", "supervise", "daemon"):
        assert kind in message


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("45M", 2700)])
def test_since_durations_count_back_from_now(text, seconds):
    assert observe.parse_since(text, NOW) == NOW - timedelta(seconds=seconds)


def test_since_takes_an_iso_time_utc_or_local():
    assert observe.parse_since("2026-12-02T11:30:00Z", NOW) == datetime(2026, 12, 2, 11, 30, tzinfo=timezone.utc)
    local = observe.parse_since("2026-12-02T11:30", NOW)
    assert local == datetime(2026, 12, 2, 11, 30).astimezone()   # a time without a zone is the host's local time
    assert observe.parse_since("", NOW) is None


@pytest.mark.parametrize("bad", ["10", "5x", "1h30m", "-1m", "yesterday", "2026-13-01"])
def test_a_bad_since_is_one_clear_error(bad):
    with pytest.raises(BottleError, match=r"since=.* is neither a duration \(30s, 10m, 2h, 1d\) nor an ISO time"):
        observe.parse_since(bad, NOW)


def test_since_drops_older_records_and_records_without_a_time():
    keep = observe.LogFilter(since=observe.parse_since("1m", NOW))
    assert keep(audit_record("egress", "request", "allow", ts=_at(59)))
    assert not keep(audit_record("egress", "request", "allow", ts=_at(61)))
    assert not keep({**audit_record("egress", "request", "allow"), "ts": "not a time"})
    both = observe.LogFilter(("block",), observe.parse_since("1m", NOW))
    assert not both(audit_record("egress", "request", "block", ts=_at(120)))
    assert not both(audit_record("egress", "request", "allow", ts=_at(1)))


# ---- how a record reads -------------------------------------------------------------------------

PLUS_TWO = timezone(timedelta(hours=2))


def test_a_record_reads_as_one_line_with_its_fix_indented_under_it():
    record = audit_record("egress", "request", "block", reason_code="route_not_allowed", reason="no route for x.test",
                          method="POST", host="x.test", port=8443, path="/upload", request_id="r-42",
                          fix="routes:\n  - host: x.test", ts="2026-12-02T10:04:05.678Z")
    lines = observe.format_record(record, zone=PLUS_TWO).split("\n")
    assert lines[0].split() == ["12:04:05.678", "egress", "BLOCK", "POST", "x.test:8443", "/upload",
                                "route_not_allowed:", "no", "route", "for", "x.test", "[id", "r-42]"]
    assert lines[1:] == ["    fix: routes:", "           - host: x.test"]


def test_a_record_without_a_host_shows_its_event_and_a_dlp_finding_says_what_and_where():
    daemon = observe.format_record(audit_record("init", "daemon_exit", "warn", reason_code="daemon_exited",
                                                reason="egress exited 1", ts="2026-12-02T10:00:00.000Z"), zone=timezone.utc)
    assert daemon.split() == ["10:00:00.000", "init", "WARN", "daemon_exit", "daemon_exited:", "egress", "exited", "1"]
    found = observe.format_record(audit_record("pipelock", "request", "block", reason_code="dlp_match", host="a.test",
                                               dlp_pattern="aws_access_key", dlp_where="header:authorization"))
    assert "(dlp aws_access_key in header:authorization)" in found


def test_escape_sequences_the_agent_put_in_host_path_or_fix_never_reach_the_terminal():
    record = audit_record("egress", "request", "block", reason_code="route_not_allowed", reason="no\x07route",
                          method="GET\x1b[2J", host="evil\x1b]0;owned\x07.test", path="/\x1b[31mred\u202e",
                          fix="routes:\n  - host: \x1b[1mevil", request_id="id\x1b[K")
    record["port"] = "443\x1b[H"       # a forged line need not keep the schema
    text = observe.format_record(record, colour=True)
    assert "\x07" not in text and "\u202e" not in text
    # The only escape sequences left are the two of the coloured decision.
    assert text.count("\x1b") == 2 and f"{observe.RED}BLOCK{observe.RESET}" in text
    for spelled in ("evil\\x1b]0;owned\\x07.test", "/\\x1b[31mred\\u202e", "GET\\x1b[2J", "443\\x1b[H",
                    "no\\x07route", "host: \\x1b[1mevil", "[id id\\x1b[K]"):
        assert spelled in text, spelled


@pytest.mark.parametrize("decision, colour", [("block", observe.RED), ("deny", observe.RED), ("hold", observe.YELLOW),
                                              ("warn", observe.YELLOW), ("allow", observe.GREEN),
                                              ("approve", observe.GREEN), ("learn", observe.GREEN)])
def test_decisions_are_coloured_only_when_asked(decision, colour):
    record = audit_record("egress", "request", decision, host="a.test", ts="2026-12-02T10:00:00.000Z")
    assert f"{colour}{decision.upper()}{observe.RESET}" in observe.format_record(record, colour=True)
    plain = observe.format_record(record, colour=False)
    assert "\x1b" not in plain and f" {decision.upper()} " in plain
    # Colour does not move the columns after it.
    stripped = observe.format_record(record, colour=True).replace(colour, "").replace(observe.RESET, "")
    assert stripped == plain


def test_undramatic_decisions_stay_plain_even_with_colour():
    record = audit_record("egress", "request", "info", host="a.test")
    assert "\x1b" not in observe.format_record(record, colour=True)


class _Terminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_colour_needs_a_terminal_and_no_NO_COLOR():
    assert observe.use_colour(_Terminal(True), {})
    assert not observe.use_colour(_Terminal(False), {})
    assert not observe.use_colour(_Terminal(True), {"NO_COLOR": "1"})
    assert observe.use_colour(_Terminal(True), {"NO_COLOR": ""})    # no-color.org: set and non-empty


def test_json_shows_the_stored_line_and_the_filter_still_applies():
    raw = encode_line(audit_record("egress", "request", "block", host="evil\x1b.test", ts=_at(1)))
    shown = observe.render_line(raw, observe.LogFilter(("block",)), as_json=True)
    assert shown == raw.decode().rstrip("\n") and json.loads(shown)["host"] == "evil\x1b.test"
    assert "\x1b" not in shown      # stored as \u001b: JSON escapes it
    assert observe.render_line(raw, observe.LogFilter(("git",)), as_json=True) is None
    assert observe.render_line(b"not json\n", observe.LogFilter(), as_json=True) is None
    assert observe.render_line(b"[1, 2]\n", observe.LogFilter()) is None


# ---- reading the stream --------------------------------------------------------------------------


def _line(n: int, ts: str | None = None) -> bytes:
    return encode_line(audit_record("egress", "request", "allow", host=f"h{n}.test", reason=f"line {n}",
                                    ts=ts or _at(1)))


class _Collected(io.TextIOBase):
    """What print_logs printed, with a wait for the n-th line (the test's timeout, never a sleep)."""

    def __init__(self):
        self.text = ""
        self.changed = threading.Condition()

    def write(self, text):
        with self.changed:
            self.text += text
            self.changed.notify_all()
        return len(text)

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.text.splitlines()) >= count and self.text.endswith("\n"),
                                         timeout)


def _follow(directory, **options):
    out, notes, stop = _Collected(), _Collected(), threading.Event()
    thread = threading.Thread(target=observe_tasks.print_logs, args=(directory, observe.LogFilter()),
                              kwargs={"follow": True, "as_json": True, "colour": False, "out": out, "notes": notes,
                                      "stop": stop, "interval": 0.01, **options}, daemon=True)
    thread.start()
    return out, notes, stop, thread


def test_logs_print_every_generation_oldest_first_and_stop_when_not_following(tmp_path):
    file = AuditFile(tmp_path, rotate_bytes=10 ** 9)
    written = []
    for n in range(6):
        file.append([_line(n)])
        written.append(_line(n).decode().rstrip("\n"))
        if n in (1, 3):
            file._rotate()
    out, notes = _Collected(), _Collected()
    shown = observe_tasks.print_logs(tmp_path, observe.LogFilter(), follow=False, as_json=True, colour=False,
                                     out=out, notes=notes, stop=threading.Event())
    assert (shown, out.lines(), notes.text) == (6, written, "")


def test_follow_survives_rotation_without_losing_or_repeating_a_line(tmp_path):
    file = AuditFile(tmp_path, rotate_bytes=10 ** 9)
    file.append([_line(0)])
    out, _, stop, thread = _follow(tmp_path)
    expected = [_line(0)]
    try:
        assert out.wait_for(1)
        n = 1
        for burst in range(5):      # more rotations than generations kept: .3 falls off, already read
            # Lines written just before a rotation sit in the renamed file: they must be read from it.
            batch = [_line(n), _line(n + 1)]
            file.append(batch)
            file._rotate()
            file.append([_line(n + 2)])
            expected += [*batch, _line(n + 2)]
            n += 3
            assert out.wait_for(len(expected)), (burst, out.lines())
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert out.lines() == [line.decode().rstrip("\n") for line in expected]


def test_follow_starts_over_when_the_file_is_replaced_by_a_smaller_one_or_cut_short(tmp_path):
    file = AuditFile(tmp_path, rotate_bytes=10 ** 9)
    file.append([_line(n) for n in range(3)])
    out, _, stop, thread = _follow(tmp_path)
    try:
        assert out.wait_for(3)
        replacement = tmp_path / "fresh"
        replacement.write_bytes(_line(10) + _line(11))
        os.replace(replacement, file.path)          # a new inode, shorter than what was read
        assert out.wait_for(5), out.lines()
        with open(file.path, "wb") as same_inode:   # cut short in place: smaller than what was read
            same_inode.write(_line(20))
        assert out.wait_for(6), out.lines()
        file.append([_line(21)])
        assert out.wait_for(7), out.lines()
    finally:
        stop.set()
        thread.join(10)
    assert [json.loads(line)["reason"] for line in out.lines()] == \
        ["line 0", "line 1", "line 2", "line 10", "line 11", "line 20", "line 21"]


def test_with_no_audit_file_logs_says_so_and_follow_waits_for_it(tmp_path):
    out, notes = _Collected(), _Collected()
    assert observe_tasks.print_logs(tmp_path / "audit", observe.LogFilter(), follow=False, as_json=False,
                                    colour=False, out=out, notes=notes, stop=threading.Event()) == 0
    assert out.text == "" and notes.lines() == [f"no audit records yet: {tmp_path / 'audit' / 'audit.jsonl'} does not exist"]
    out, notes, stop, thread = _follow(tmp_path / "audit")
    try:
        assert notes.wait_for(1) and "waiting for the first" in notes.text
        AuditFile(tmp_path / "audit").append([_line(7)])
        assert out.wait_for(1)
    finally:
        stop.set()
        thread.join(10)
    assert json.loads(out.lines()[0])["reason"] == "line 7"


def test_follow_prints_only_what_the_filter_keeps(tmp_path):
    file = AuditFile(tmp_path)
    out, notes, stop = _Collected(), _Collected(), threading.Event()
    thread = threading.Thread(target=observe_tasks.print_logs, args=(tmp_path, observe.LogFilter(("block",))),
                              kwargs={"follow": True, "as_json": False, "colour": False, "out": out, "notes": notes,
                                      "stop": stop, "interval": 0.01, "zone": timezone.utc}, daemon=True)
    thread.start()
    try:
        file.append([_line(1), encode_line(audit_record("egress", "request", "block", host="b.test",
                                                        ts="2026-12-02T09:00:00.000Z"))])
        assert out.wait_for(1)
    finally:
        stop.set()
        thread.join(10)
    assert out.lines() == ["09:00:00.000  egress     BLOCK    b.test"]


def test_records_since_reads_back_from_the_end_into_the_previous_generation_only_when_needed(tmp_path):
    file = AuditFile(tmp_path, rotate_bytes=10 ** 9)
    file.append([_line(n, _at(7200 - n)) for n in range(3)])          # two hours ago
    file.append([_line(n, _at(1800 - n)) for n in range(3, 5)])       # half an hour ago
    file._rotate()
    file.append([_line(n, _at(60 - n)) for n in range(5, 8)])         # a minute ago
    hour_ago = NOW - timedelta(hours=1)
    assert [r["reason"] for r in records_since(tmp_path, hour_ago)] == [f"line {n}" for n in (7, 6, 5, 4, 3)]
    assert [r["reason"] for r in records_since(tmp_path, NOW - timedelta(minutes=5))] == ["line 7", "line 6", "line 5"]
    # Small chunks: a line split across two reads comes out whole.
    lines = list(audit._lines_backwards(file.path, chunk=7))
    assert [json.loads(raw)["reason"] for raw in lines] == ["line 7", "line 6", "line 5"]


# ---- doit shell -----------------------------------------------------------------------------------

RUNNING = {"Name": "/g", "Id": "c0ffee", "State": {"Running": True}, "Config": {"Labels": {}}, "HostConfig": {}}


def _docker_backend(running: bool):
    answer = (0, json.dumps([RUNNING]), "") if running else (1, "", "Error: No such container")
    return DockerBackend(Docker(FakeRunner({("docker", "container", "inspect"): answer})))


def test_shell_runs_a_login_shell_as_the_agent_or_root_with_a_tty_only_when_asked(plan, monkeypatch):  # noqa: F811
    monkeypatch.setattr(observe_tasks, "backend", lambda _plan: _docker_backend(True))
    as_agent = observe_tasks.shell_argv(plan, "agent", tty=True)
    assert as_agent[:6] == ["docker", "exec", "-i", "-t", "-u", "agent"]
    assert as_agent[-4:] == [plan.guest.name, "sh", "-c", observe_tasks.SHELL_SCRIPT]
    assert "exec bash -l" in observe_tasks.SHELL_SCRIPT and observe_tasks.SHELL_SCRIPT.endswith("exec sh -l")
    as_root = observe_tasks.shell_argv(plan, "root", tty=False)
    assert as_root[:7] == ["docker", "exec", "-i", "-u", "root", "-w", "/"] and "-t" not in as_root


def test_shell_on_a_bottle_that_is_not_running_says_to_start_it(plan, monkeypatch):  # noqa: F811
    monkeypatch.setattr(observe_tasks, "backend", lambda _plan: _docker_backend(False))
    with pytest.raises(BottleError, match=f"bottle {plan.slug} is not running: doit start agent={plan.agent} first"):
        observe_tasks.shell_argv(plan, "agent", tty=False)


def test_shell_refuses_a_user_other_than_the_agent_or_root(plan, monkeypatch):  # noqa: F811
    monkeypatch.setattr(observe_tasks, "backend", lambda _plan: _docker_backend(True))
    with pytest.raises(BottleError, match="user=bob: the shell runs as agent .* or as root"):
        observe_tasks.shell_argv(plan, "bob", tty=False)


# ---- the tasks as doit runs them ------------------------------------------------------------------


@pytest.fixture
def console(monkeypatch, tmp_path):
    """This test's state dir, the checkout's agents, and a docker on PATH that answers `ps` with one
    bundle and fails anything else."""
    from doit.doit_cmd import reset_vars

    from bottle_tasks.settings import ROOT
    from bottle_tasks.tasks.common import new_run

    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(ROOT / "agents"))
    monkeypatch.setenv("BOTTLE_SMOLVM_BIN", str(tmp_path / "no-smolvm"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ps = json.dumps({"Names": "bottle-example-bundle", "State": "running", "Status": "Up 4 minutes (healthy)",
                     "Labels": f"dev.claude-bottle.slug=example,dev.claude-bottle.role=bundle,"
                               f"dev.claude-bottle.state={tmp_path / 'state' / 'example'}", "Mounts": ""})
    (bin_dir / "docker").write_text(f"#!/bin/sh\n[ \"$1\" = ps ] && {{ cat <<'JSON'\n{ps}\nJSON\nexit 0; }}\n"
                                    "echo \"unexpected docker $*\" >&2; exit 3\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    reset_vars()
    new_run()
    yield tmp_path / "state" / "example"
    reset_vars()
    new_run()


def _run(task: dict):
    first = task["actions"][0]
    fn, args = first if isinstance(first, tuple) else (first, [])
    return fn(*args)


def test_the_logs_task_prints_through_the_filter_and_a_bad_kind_fails_cleanly(console, capsys):
    from doit.doit_cmd import set_var
    from doit.exceptions import TaskFailed

    AuditFile(console / "audit").append([
        encode_line(audit_record("egress", "request", "block", reason_code="route_not_allowed", host="x.test",
                                 port=443, ts=_at(1))),
        encode_line(audit_record("egress", "request", "allow", host="a.test", port=443, ts=_at(1)))])
    set_var("agent", "example")
    set_var("kind", "block")
    assert _run(observe_tasks.task_logs()) is None
    out = capsys.readouterr().out
    assert "BLOCK    x.test:443  route_not_allowed" in out and "a.test" not in out and "\x1b" not in out
    set_var("kind", "git")
    assert _run(observe_tasks.task_logs()) is None
    assert capsys.readouterr().out == "no audit records match kind=git for example\n"
    set_var("kind", "blok")
    failed = _run(observe_tasks.task_logs())
    assert isinstance(failed, TaskFailed) and "kind=blok: unknown kind 'blok'; use one or more of block" in str(failed)


def test_the_logs_task_without_an_agent_says_which_to_name(console):
    from doit.exceptions import TaskFailed

    failed = _run(observe_tasks.task_logs())
    assert isinstance(failed, TaskFailed) and "agent=<name>" in str(failed)


def test_the_status_task_lists_the_bottle_docker_knows_and_refuses_an_unknown_one(console, capsys):
    from doit.doit_cmd import set_var
    from doit.exceptions import TaskFailed

    assert _run(observe_tasks.task_status()) is None
    status = capsys.readouterr().out
    # A bundle and no docker guest may be smolmachines: smolvm is asked, and its absence is said.
    assert status.startswith("example  ?  up 4 minutes\n  guest unknown ("), status
    assert "no-smolvm is not installed" in status.split("\n")[1]
    assert "bundle healthy  fence -" in status
    set_var("agent", "nobody")
    failed = _run(observe_tasks.task_status())
    assert isinstance(failed, TaskFailed) and "no bottle 'nobody' on this machine" in str(failed)
