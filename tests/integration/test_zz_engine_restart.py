"""Invariant 10: a Docker engine restart under a running bottle leaves it fenced or down, never up and open.

It restarts the engine, so it stops every container on the machine: the module sorts last among the
integration tests, and it runs only in CI or when BOTTLE_TEST_ENGINE_RESTART=1 says this machine's
engine may be restarted (CI always runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bottle_tasks.backends.docker import DockerBackend
from tests.integration.conftest import Env, _bottle, _teardown, docker
from tests.integration.test_lifecycle import _reaches

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("BOTTLE_TEST_ENGINE_RESTART")),
    reason="restarts the Docker engine: set BOTTLE_TEST_ENGINE_RESTART=1 to allow it here (CI runs it)")

AGENT = "probe-engine"


def _engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _wait(condition, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def restart_engine() -> None:
    """systemd's docker.service where there is one; otherwise the running dockerd, started again with
    its own command line (how .ci/run starts it)."""
    if shutil.which("systemctl") and subprocess.run(["systemctl", "is-active", "--quiet", "docker"]).returncode == 0:
        subprocess.run(["systemctl", "restart", "docker"], check=True)
    else:
        pid = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout.split()
        assert len(pid) == 1, f"expected one dockerd, found {pid}"
        argv = Path(f"/proc/{pid[0]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        os.kill(int(pid[0]), 15)
        _wait(lambda: not Path(f"/proc/{pid[0]}").exists(), "dockerd to stop")
        log = open("/var/log/dockerd.log", "ab")
        subprocess.Popen([a.decode() for a in argv], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    _wait(_engine_answers, "the Docker engine to answer again")


def test_an_engine_restart_leaves_the_bottle_fenced_or_down(bottle_env: Env, host_listener):
    bottle_env.write_agent(AGENT, "routes: []\n")
    bottle = _bottle(bottle_env, AGENT)
    plan = bottle.plan
    holder = DockerBackend.netns_holder(plan)
    gateway = plan.network.guest_side.gateway
    try:
        assert _reaches(plan.guest.name, gateway, host_listener).returncode != 0
        restart_engine()
        # The holder comes back by itself and fences its new namespace first; the guest stays down.
        _wait(lambda: docker("exec", holder, "test", "-e", "/run/bottle-fenced", check=False).returncode == 0,
              "the namespace holder to come back fenced")
        running = docker("inspect", "-f", "{{.State.Running}}", plan.guest.name).stdout.strip()
        if running == "true":         # an engine that restarts it anyway must have it fenced
            assert _reaches(plan.guest.name, gateway, host_listener).returncode != 0
        # Whoever starts it by hand, it joins the fenced namespace: probed at once, before any doit start.
        docker("start", plan.guest.name)
        probe = _reaches(plan.guest.name, gateway, host_listener)
        assert probe.returncode != 0 and "refused" in probe.stderr, probe.stderr
        assert _reaches(plan.guest.name, plan.network.bundle_ip, 8080).returncode == 0 or \
            docker("inspect", "-f", "{{.State.Health.Status}}", plan.bundle.name).stdout.strip() != "healthy"
        # And start brings the whole bottle back, fenced.
        bottle_env.doit("start", f"agent={AGENT}", "command=true")
        probe = _reaches(plan.guest.name, gateway, host_listener)
        assert probe.returncode != 0 and "refused" in probe.stderr, probe.stderr
        assert _reaches(plan.guest.name, plan.network.bundle_ip, 8080).returncode == 0
    finally:
        if not _engine_answers():
            restart_engine()
        _teardown(bottle)
