"""`doit status`, `doit logs` and `doit shell` on running bottles, driven through doit like a user would.

The docker bottles are the session's (probe-a, probe-b); the smolmachines checks are functions that
test_smol_bottle.py runs on its own machine (smol_a), so no bottle is started for this module.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bottle_tasks.fence_record import read_fence
from bottle_tasks.settings import ROOT
from tests.integration.conftest import Bottle, docker
from tests.waiting import wait_for


def _mark(log: Path | None) -> int:
    return len(log.read_text().splitlines()) if log and log.exists() else 0


def _since(log: Path | None, mark: int) -> list[str]:
    return log.read_text().splitlines()[mark:] if log and log.exists() else []


def _block(bottle: Bottle) -> str:
    """A request egress refuses (no route for unrouted.test); the request id its 403 names."""
    proc = bottle.exec("curl", "-sS", "-m", "10", "-i", "http://unrouted.test/observe-probe")
    assert " 403 " in proc.stdout.splitlines()[0], proc.stdout + proc.stderr
    return re.search(r"(?im)^x-bottle-request-id: (\w+)", proc.stdout).group(1)


def _output(proc: subprocess.CompletedProcess) -> list[str]:
    """The command's own lines, without doit's ".  task" line."""
    return [line for line in proc.stdout.splitlines() if not line.startswith(".  ")]


# ---- checks both backends run -------------------------------------------------------------------


def check_status(bottle: Bottle, backend: str) -> list[str]:
    """status of one running, freshly proved bottle: one engine listing, nothing flagged."""
    docker_mark, smol_mark = _mark(bottle.env.argv_log), _mark(bottle.env.smolvm_argv_log)
    block = _output(bottle.env.doit("status", f"agent={bottle.agent}"))
    assert re.fullmatch(rf"{bottle.agent}  {backend}  up .+", block[0]), block
    assert re.fullmatch(r"  guest running  bundle healthy  fence proved \d+\S* ago", block[1]), block
    assert block[2].startswith(f"  {len(bottle.plan.routes)} route"), block
    assert block[3].startswith("  workspace "), block
    assert not any(line.startswith("  !") for line in block), block
    # One listing for every container, at most one volume inspect, never an inspect per container
    # (loading a smolmachines plan lists the engine's networks: that is planning, not status).
    # The fake smolvm answers `machine ls` from its stand-in containers (smolvm-fake-*): its docker calls are not status's.
    calls = [c for c in _since(bottle.env.argv_log, docker_mark) if "smolvm-fake-" not in c]
    assert len([c for c in calls if c.startswith("ps -a --no-trunc --filter label=dev.claude-bottle.slug")]) == 1, calls
    assert len([c for c in calls if c.startswith("volume inspect")]) <= 1, calls
    assert not [c for c in calls if c.startswith(("inspect", "container inspect", "ps")) and not c.startswith("ps -a --no")], calls
    if backend == "smolmachines":
        smol_calls = _since(bottle.env.smolvm_argv_log, smol_mark)
        assert smol_calls == ["machine ls --json"], smol_calls
    record = read_fence(bottle.plan.state_dir)
    assert record is not None and record.backend == backend and record.proved_at <= datetime.now(timezone.utc)
    return block


def check_logs(bottle: Bottle) -> None:
    """A block shows with its request id and fix; kind and json filter; the daemons' starts are there."""
    request_id = _block(bottle)
    readable = wait_for(lambda: [line for line in _output(bottle.env.doit("logs", f"agent={bottle.agent}",
                                                                          "kind=block", "since=10m"))
                                 if f"[id {request_id}]" in line], 30, "the block in doit logs", 0.2)
    (line,) = readable
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3}  egress     BLOCK  ", line), line
    assert "unrouted.test:80 /observe-probe" in line and "route_not_allowed: " in line, line
    everything = bottle.env.doit("logs", f"agent={bottle.agent}", "kind=block", "since=10m").stdout
    assert '    fix: ' in everything and '- {"host": "unrouted.test"}' in everything, everything
    stored = [json.loads(raw) for raw in _output(bottle.env.doit("logs", f"agent={bottle.agent}", "json=1",
                                                                 "kind=block"))]
    assert stored and all(r["decision"] in ("block", "deny", "expire") for r in stored), stored
    assert any(r.get("request_id") == request_id for r in stored)
    daemons = _output(bottle.env.doit("logs", f"agent={bottle.agent}", "kind=daemon"))
    assert any("daemon_start" in line and "egress" in line for line in daemons), daemons
    assert not any("BLOCK" in line for line in daemons), daemons


def check_shell(bottle: Bottle) -> None:
    """doit shell, fed commands on a pipe (no terminal, so no tty): the agent, or root with user=root."""
    for user_args, expected in (((), "agent /workspace"), (("user=root",), "root /")):
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "shell",
                               f"agent={bottle.agent}", *user_args], input="echo $(id -un) $(pwd)\nexit 0\n",
                              cwd=ROOT, env=bottle.env.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert expected in _output(proc), proc.stdout + proc.stderr


# ---- the docker backend ---------------------------------------------------------------------------


def test_status_of_a_running_docker_bottle(bottle_a):
    block = check_status(bottle_a, "docker")
    assert block[3].endswith(f"volume {bottle_a.plan.guest.workspace_volume}"), block
    every = bottle_a.env.doit("status").stdout
    assert f"\n{bottle_a.agent}  docker  up " in "\n" + every


def test_logs_show_a_block_with_its_id_and_fix_and_filter_by_kind(bottle_a):
    check_logs(bottle_a)


def _ctrl_c_as_on_a_terminal() -> None:
    # A command started in the background by a non-interactive shell (nohup .ci/run &) inherits
    # SIGINT ignored, and Python then never turns it into KeyboardInterrupt; a terminal's Ctrl-C
    # reaches a process whose SIGINT is at its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_logs_follow_prints_a_new_block_as_it_happens_and_stops_on_ctrl_c(bottle_a):
    follower = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "logs",
                                 f"agent={bottle_a.agent}", "follow=1", "kind=block", "since=1m"],
                                cwd=ROOT, env={**bottle_a.env.env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_on_a_terminal)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line.startswith(".  logs") for line in seen), 60, "doit logs to start")
        request_id = _block(bottle_a)
        wait_for(lambda: any(f"[id {request_id}]" in line for line in seen), 30, "the new block, followed")
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(timeout=30)
    reader.join(10)
    assert code == 0, (code, seen, follower.stderr.read())
    assert len([line for line in seen if f"[id {request_id}]" in line]) == 1, seen


def test_shell_as_the_agent_and_as_root(bottle_a):
    check_shell(bottle_a)


def test_shell_and_status_of_a_bottle_that_was_never_started(bottle_env):
    bottle_env.write_agent("probe-never", "routes: []\n")
    shell = bottle_env.doit("shell", "agent=probe-never", check=False)
    assert shell.returncode != 0
    assert "bottle probe-never is not running: doit start agent=probe-never first" in shell.stdout + shell.stderr
    status = bottle_env.doit("status", "agent=probe-never", check=False)
    assert status.returncode != 0 and "no bottle 'probe-never' on this machine" in status.stdout + status.stderr


def test_status_flags_a_guest_restarted_outside_doit(bottle_b):
    """A `docker restart` of the guest keeps it in its fenced namespace; status says it happened."""
    proved = read_fence(bottle_b.plan.state_dir).proved_at
    # docker's uptime words are exact to the second only after the proof is that old
    while (datetime.now(timezone.utc) - proved).total_seconds() < 3:
        time.sleep(0.5)
    docker("restart", "-t", "1", bottle_b.plan.guest.name)
    block = _output(bottle_b.env.doit("status", f"agent={bottle_b.agent}"))
    assert "  ! the guest was restarted outside doit after the proof (its namespace, and the fence, stayed)" in block
    assert bottle_b.exec("true").returncode == 0      # the neighbour is still usable by the other tests
