"""The bundle's init supervisor, run as a real process with fake daemons on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.waiting import wait_for

from bottle_tasks.sidecars.daemon import Backoff, split_host_port
from bottle_tasks.sidecars.daemon_table import (
    DEFAULT_DAEMON_TABLE, UnknownDaemon, parse_daemon_names, parse_daemon_table, select_daemons,
)
from bottle_tasks.sidecars.init import main as init_main

REPO_ROOT = Path(__file__).resolve().parents[2]

# A daemon that greets on both streams and then idles until it is signalled.
CHATTY = "import sys, time; print('hello out'); print('hello err', file=sys.stderr); time.sleep(600)"


def listener_script(port: int) -> str:
    """A daemon that becomes ready by accepting TCP connections on 127.0.0.1:port."""
    return (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(8)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.close()\n"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




class InitProcess:
    def __init__(self, tmp_path: Path, table: dict[str, Any], daemons: str, extra_env: dict[str, str] | None = None) -> None:
        self.run_dir = tmp_path / "run"
        table_file = tmp_path / "table.json"
        table_file.write_text(json.dumps(table))
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "BOTTLE_RUN_DIR": str(self.run_dir),
            "BOTTLE_DAEMON_TABLE": str(table_file),
            "BUNDLE_DAEMONS": daemons,
            **(extra_env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bottle_tasks.sidecars.init"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def daemon(self, name: str) -> dict[str, Any]:
        status = self.status()
        return status["daemons"][name] if status else {}

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bottle_tasks.sidecars.health"],
            env=self.env, capture_output=True, text=True, timeout=10,
        )

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        stdout, stderr = self.process.communicate(timeout=15)
        return self.process.returncode, stdout, stderr


@pytest.fixture
def start_init(tmp_path: Path) -> Iterator[Callable[[dict[str, Any], str], InitProcess]]:
    started: list[InitProcess] = []

    def start(table: dict[str, Any], daemons: str, extra_env: dict[str, str] | None = None) -> InitProcess:
        init = InitProcess(tmp_path, table, daemons, extra_env)
        started.append(init)
        return init

    yield start
    for init in started:
        if init.process.poll() is None:
            init.process.kill()
            init.process.communicate()


def python_daemon(script: str, probe: dict[str, str] | None = None) -> dict[str, Any]:
    return {"command": [sys.executable, "-c", script], "probe": probe}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- as a process


def test_starts_named_daemons_only_and_prefixes_their_output(start_init) -> None:
    init = start_init(
        {"chatty": python_daemon(CHATTY), "unused": python_daemon(CHATTY)}, "chatty"
    )
    wait_for(lambda: init.daemon("chatty").get("ready"), what="chatty ready")
    status = init.status()
    assert status["selected"] == ["chatty"]
    assert set(status["daemons"]) == {"chatty"}
    chatty_pid = status["daemons"]["chatty"]["pid"]

    code, stdout, _ = init.stop()

    assert code == 0
    assert "[chatty] hello out\n" in stdout
    assert "[chatty] hello err\n" in stdout
    assert "[init] " in stdout
    assert not pid_alive(chatty_pid), "SIGTERM was forwarded to the daemon"
    final = init.status()["daemons"]["chatty"]
    assert final["running"] is False and final["ready"] is False


def test_restarts_a_killed_daemon_with_a_new_pid(start_init) -> None:
    init = start_init({"chatty": python_daemon(CHATTY)}, "chatty")
    first_pid = wait_for(lambda: init.daemon("chatty").get("pid"), what="first pid")
    assert init.daemon("chatty")["restarts"] == 0

    os.kill(first_pid, signal.SIGKILL)

    restarted = wait_for(
        lambda: (d := init.daemon("chatty")).get("running") and d["pid"] != first_pid and d,
        what="restart",
    )
    assert restarted["restarts"] == 1
    assert restarted["last_exit_code"] == -signal.SIGKILL
    assert init.stop()[0] == 0


def test_readiness_follows_the_probe(start_init) -> None:
    port = free_port()
    init = start_init(
        {
            "listener": python_daemon(listener_script(port), {"tcp": f"127.0.0.1:{port}"}),
            "never": python_daemon("import time; time.sleep(600)", {"tcp": f"127.0.0.1:{free_port()}"}),
        },
        "listener,never",
    )
    wait_for(lambda: init.daemon("listener").get("ready"), what="listener ready")
    never = init.daemon("never")
    assert never["running"] is True and never["ready"] is False
    init.stop()


def test_health_verdict_tracks_the_supervisor(start_init) -> None:
    port = free_port()
    init = start_init(
        {"listener": python_daemon(listener_script(port), {"tcp": f"127.0.0.1:{port}"})},
        "listener",
    )
    wait_for(lambda: init.health().returncode == 0, what="healthy")
    assert "healthy" in init.health().stdout

    os.kill(init.daemon("listener")["pid"], signal.SIGKILL)
    # Between the kill and the restart being ready, health may say no; then yes again.
    wait_for(lambda: init.daemon("listener").get("restarts") == 1, what="restart recorded")
    wait_for(lambda: init.health().returncode == 0, what="healthy again")

    init.stop()
    unhealthy = init.health()
    assert unhealthy.returncode == 1
    assert unhealthy.stdout.count("\n") == 1


def test_crash_looping_daemon_backs_off(start_init) -> None:
    init = start_init({"crasher": python_daemon("raise SystemExit(3)")}, "crasher")
    wait_for(lambda: init.daemon("crasher").get("restarts", 0) >= 3, what="three restarts")
    time.sleep(1.0)
    # Delays 0.25, 0.5, 1, 2, 4 s: far fewer than one restart per 100 ms tick.
    assert init.daemon("crasher")["restarts"] <= 6
    assert init.daemon("crasher")["last_exit_code"] == 3
    assert init.stop()[0] == 0


def test_missing_executable_is_retried_not_fatal(start_init) -> None:
    init = start_init({"ghost": {"command": ["/nonexistent/ghostd"], "probe": None}}, "ghost")
    wait_for(lambda: init.daemon("ghost").get("restarts", 0) >= 1, what="retry")
    assert init.daemon("ghost")["last_exit_code"] == 127
    code, stdout, _ = init.stop()
    assert code == 0
    assert "[init] ghost: cannot start" in stdout


def test_unknown_daemon_name_exits_nonzero_listing_the_known_ones(start_init) -> None:
    init = start_init({"chatty": python_daemon(CHATTY)}, "chatty,bogus")
    _, stderr = init.process.communicate(timeout=10)
    assert init.process.returncode != 0
    assert "bogus" in stderr and "known daemons: chatty" in stderr


def test_empty_selection_idles_and_is_healthy(start_init) -> None:
    init = start_init({"chatty": python_daemon(CHATTY)}, " ")
    wait_for(lambda: init.status(), what="status.json")
    assert init.status()["daemons"] == {}
    assert init.health().returncode == 0
    code, stdout, _ = init.stop()
    assert code == 0
    assert "BUNDLE_DAEMONS is empty" in stdout


def test_sigint_also_stops_cleanly(start_init) -> None:
    init = start_init({"chatty": python_daemon(CHATTY)}, "chatty")
    pid = wait_for(lambda: init.daemon("chatty").get("pid"), what="pid")
    init.process.send_signal(signal.SIGINT)
    init.process.communicate(timeout=15)
    assert init.process.returncode == 0
    assert not pid_alive(pid)


@pytest.mark.parametrize("content", [None, "{not json", '["a list"]', '{"x": {"command": []}}',
                                     '{"x": {"command": ["true"], "probe": {"udp": "127.0.0.1:1"}}}'])
def test_missing_or_invalid_table_exits_2_with_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None) -> None:
    table = tmp_path / "daemons.json"
    if content is not None:
        table.write_text(content)
    assert init_main({"BOTTLE_DAEMON_TABLE": str(table), "BUNDLE_DAEMONS": "x"}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(table) in err


def test_the_table_defaults_to_etc_bottle_daemons_json(capsys: pytest.CaptureFixture[str]) -> None:
    if Path(DEFAULT_DAEMON_TABLE).exists():
        pytest.skip(f"{DEFAULT_DAEMON_TABLE} exists on this machine")
    assert DEFAULT_DAEMON_TABLE == "/etc/bottle/daemons.json"
    assert init_main({"BUNDLE_DAEMONS": "dns"}) == 2
    assert DEFAULT_DAEMON_TABLE in capsys.readouterr().err


# --------------------------------------------------------------------------- pure parts


def test_parse_daemon_names() -> None:
    assert parse_daemon_names("egress, pipelock,,dns,egress ") == ["egress", "pipelock", "dns"]
    assert parse_daemon_names("") == []


def test_select_daemons_rejects_unknown_names() -> None:
    table = parse_daemon_table({name: python_daemon(CHATTY) for name in ("dns", "egress", "git-gate", "pipelock",
                                                                          "supervise")})
    assert [d.name for d in select_daemons(table, ["dns", "egress"])] == ["dns", "egress"]
    with pytest.raises(UnknownDaemon, match="known daemons: dns, egress, git-gate, pipelock, supervise"):
        select_daemons(table, ["dns", "gitgate"])


def test_backoff_doubles_and_is_capped() -> None:
    backoff = Backoff(initial_s=0.25, cap_s=4.0)
    assert [backoff.delay(n) for n in range(0, 8)] == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_split_host_port() -> None:
    assert split_host_port("10.243.7.2:8080") == ("10.243.7.2", 8080)
    assert split_host_port("[::1]:53") == ("::1", 53)
    with pytest.raises(ValueError):
        split_host_port("localhost")


def test_each_daemon_gets_only_its_own_secrets(start_init, tmp_path: Path) -> None:
    """A daemon whose entry names no secret (git-gate's children, the DNS sink) never sees the model key,
    even when the bundle's own environment carried it; the one that names it gets it."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"API_KEY": "sk-ant-secret-value", "GIT_TOKEN": "ghp-secret-value"}))
    secrets.chmod(0o600)

    def dumper(name: str) -> dict[str, Any]:
        out = tmp_path / f"{name}.env.json"
        return python_daemon("import json, os, time; json.dump({k: os.environ.get(k) for k in ('API_KEY', 'GIT_TOKEN')}, "
                             f"open({str(out)!r}, 'w')); time.sleep(600)")

    table = {"egress": {**dumper("egress"), "secrets": ["API_KEY"]},
             "gitgate": {**dumper("gitgate"), "secrets": ["GIT_TOKEN"]},
             "dns": dumper("dns")}
    init = start_init(table, "egress,gitgate,dns",
                      {"BOTTLE_SECRETS_FILE": str(secrets), "API_KEY": "leaked-through-the-container-env"})

    def seen() -> dict[str, Any] | None:
        try:
            return {n: json.loads((tmp_path / f"{n}.env.json").read_text()) for n in ("egress", "gitgate", "dns")}
        except (OSError, ValueError):
            return None

    assert wait_for(seen, what="every daemon's environment") == {
        "egress": {"API_KEY": "sk-ant-secret-value", "GIT_TOKEN": None},
        "gitgate": {"API_KEY": None, "GIT_TOKEN": "ghp-secret-value"},
        "dns": {"API_KEY": None, "GIT_TOKEN": None}}
    init.stop()


def test_an_unreadable_secrets_file_stops_init_with_its_name(start_init, tmp_path: Path) -> None:
    bad = tmp_path / "secrets.json"
    bad.write_text("{not json")
    init = start_init({"a": python_daemon(CHATTY)}, "a", {"BOTTLE_SECRETS_FILE": str(bad)})
    code = init.process.wait(timeout=15)
    assert code == 2 and f"{bad}: the secrets file is not valid JSON" in init.process.stderr.read()


AUDITING = """
from bottle_tasks.sidecars.audit import AuditWriter
import time
AuditWriter.from_env("egress").emit("request", "block", reason_code="route_not_allowed", host="evil.test")
time.sleep(60)
"""
PIPELOCK_LIKE = """
import json, time
print(json.dumps({"event": "blocked", "url": "https://evil.test/x", "scanner": "domain_blocklist"}), flush=True)
print(json.dumps({"event": "tunnel_open", "target": "ok.test:443"}), flush=True)
time.sleep(60)
"""


def test_daemons_reach_the_audit_sink_through_inits_pipe_and_restarts_are_recorded(start_init, tmp_path) -> None:
    from bottle_tasks.sidecars import audit

    directory = tmp_path / "audit"
    table = {"audit": {"command": [sys.executable, "-m", "bottle_tasks.sidecars.audit", "--dir", str(directory)],
                       "probe": None, "audit_sink": True},
             "egress": python_daemon(AUDITING),
             "pipelock": {**python_daemon(PIPELOCK_LIKE), "audit_stdout": "pipelock"}}
    init = start_init(table, "audit,egress,pipelock", {"BOTTLE_SLUG": "demo"})
    sink_pid = wait_for(lambda: init.daemon("audit").get("pid"), what="the sink")
    wait_for(lambda: {r["source"] for r in audit.read_records(directory)} >= {"egress", "pipelock", "init"},
             what="lines from egress, pipelock and init")
    os.kill(sink_pid, signal.SIGKILL)   # a restarted sink reads the same pipe: nothing written meanwhile is lost
    os.kill(init.daemon("egress")["pid"], signal.SIGKILL)
    wait_for(lambda: any(r["event"] == "daemon_exit" and r["detail"]["daemon"] == "egress"
                         for r in audit.read_records(directory)), what="egress's exit in the stream")
    wait_for(lambda: sum(r["source"] == "egress" for r in audit.read_records(directory)) == 2,
             what="the restarted egress's line")
    records = list(audit.read_records(directory))
    assert {r["bottle"] for r in records} == {"demo"}
    assert [r["host"] for r in records if r["source"] == "pipelock"] == ["evil.test"]   # not the tunnel_open
    assert init.stop()[0] == 0
