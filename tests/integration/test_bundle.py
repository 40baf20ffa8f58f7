"""The bundle's init brings back any daemon that dies, and the bottle works again afterwards."""

from __future__ import annotations

import json

from tests.integration.conftest import docker
from tests.waiting import wait_for


def _status(bottle) -> dict:
    out = docker("exec", bottle.plan.bundle.name, "cat", "/run/bottle/status.json").stdout
    return json.loads(out)["daemons"]




def test_killed_daemons_come_back(bottle_a):
    container = bottle_a.plan.bundle.name
    for daemon in bottle_a.plan.bundle.daemon_names:
        before = _status(bottle_a)[daemon]
        assert before["running"] and before["ready"], before
        # As the daemon's own user: root in the bundle holds no CAP_KILL over the DNS sink's `nobody`.
        uid = docker("exec", container, "stat", "-c", "%u", f"/proc/{before['pid']}").stdout.strip()
        docker("exec", "-u", uid, container, "kill", "-9", str(before["pid"]))
        after = wait_for(lambda: (s := _status(bottle_a)[daemon])["pid"] != before["pid"] and s["ready"] and s,
                         timeout=30, what=f"{daemon} back")
        assert after["restarts"] == before["restarts"] + 1
        wait_for(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip() == "healthy",
                 timeout=30, what=f"bundle healthy after {daemon} restarted")
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "https://upstream.test/after-restarts")
    assert proc.returncode == 0 and "/after-restarts" in proc.stdout, proc.stderr


def test_a_process_flood_in_the_bundle_meets_its_ceiling_not_the_hosts(bottle_b):
    """The bundle runs with --pids-limit and --memory sized from its daemons: a flood of processes (what a
    guest could make a daemon spawn) stops at the bundle's limit, and the bundle is healthy again after."""
    plan, container = bottle_b.plan, bottle_b.plan.bundle.name
    host_config = json.loads(docker("inspect", container).stdout)[0]["HostConfig"]
    assert host_config["PidsLimit"] == plan.bundle.pids
    assert host_config["Memory"] == host_config["MemorySwap"] == plan.bundle.memory_mib * 1024 * 1024
    attempts = plan.bundle.pids + 50        # bounded: more than the limit, never endless
    flood = f"""
import os, signal, time
children, refused = [], 0
for _ in range({attempts}):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(len(children), refused)
"""
    out = docker("exec", container, "python", "-c", flood).stdout.split()
    started, refused = int(out[0]), int(out[1])
    assert refused > 0 and started < plan.bundle.pids, f"{started} of {attempts} forks succeeded: no pids ceiling"
    assert started > 10, "the flood never got going; the test would prove nothing"
    wait_for(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip() == "healthy",
             timeout=60, what="the bundle healthy after the flood")
