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
