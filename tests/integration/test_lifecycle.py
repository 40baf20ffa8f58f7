"""Up-to-date checks, recreation, teardown and Ctrl-C, driven through `doit` like a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bottle_tasks.backends.bundle import HEALTH_COMMAND

from bottle_tasks.labels import LABEL
from bottle_tasks.plan import GUEST_PROMPT_PATH
from bottle_tasks.settings import IMAGES_DIR, ROOT
from bottle_tasks.backends.docker import DockerBackend
from tests.integration.conftest import docker


def _count(log: Path, since: int, needle: str) -> int:
    return sum(1 for line in log.read_text().splitlines()[since:] if line.startswith(needle))


def _lines(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _container_id(name: str) -> str:
    return docker("inspect", "-f", "{{.Id}}", name, check=False).stdout.strip()


def _labelled(slug: str, kind: str) -> list[str]:
    label = f"label={LABEL}.slug={slug}"
    if kind == "container":
        return docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split()
    return docker(kind, "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()


@pytest.fixture(scope="module")
def lifecycle(bottle_env, tmp_path_factory):
    """An agent of its own, with a private copy of images/ the tests may edit."""
    images = tmp_path_factory.mktemp("images")
    shutil.copytree(IMAGES_DIR, images, dirs_exist_ok=True)
    bottle_env.write_agent("lifecycle", 'prompt: "lifecycle prompt"\nroutes: []\nenv: {STAGE: "one"}\n')
    # Its own image names too: editing its bundle Dockerfile must not move the shared bundle tag.
    extra = {"BOTTLE_IMAGES_DIR": str(images), "BOTTLE_IMAGE_PREFIX": "claude-bottle-lifecycle"}
    bottle_env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    yield bottle_env, extra, images
    bottle_env.doit("clean", "agent=lifecycle", "purge=1", extra_env=extra, check=False)
    docker("rmi", "-f", "claude-bottle-lifecycle/bundle:latest", check=False)  # purge keeps shared bundle images


def test_unchanged_start_builds_and_creates_nothing(lifecycle):
    env, extra, _ = lifecycle
    plan = env.plan("lifecycle", extra)
    ids = (_container_id(plan.guest.name), _container_id(plan.bundle.name))
    mark = _lines(env.argv_log)
    proc = env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    for verb in ("build", "save", "push", "create", "network create", "rm"):
        assert _count(env.argv_log, mark, verb) == 0, f"unchanged start ran docker {verb}:\n{proc.stdout}"
    assert (_container_id(plan.guest.name), _container_id(plan.bundle.name)) == ids
    assert "-- image_build:lifecycle" in proc.stdout and "-- bundle_build" in proc.stdout


def test_container_removed_by_hand_is_recreated_and_reprovisioned(lifecycle):
    env, extra, _ = lifecycle
    plan = env.plan("lifecycle", extra)
    docker("rm", "-f", plan.guest.name)
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    prompt = docker("exec", plan.guest.name, "cat", GUEST_PROMPT_PATH)
    assert prompt.stdout == "lifecycle prompt"
    docker("rm", "-f", plan.bundle.name)
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    # start waited for the bundle's own health check (docker's first verdict comes 10 s after the start)
    assert docker("inspect", "-f", "{{.State.Health.Status}}", plan.bundle.name).stdout.strip() in ("starting", "healthy")
    assert docker("exec", plan.bundle.name, *HEALTH_COMMAND, check=False).returncode == 0


def _reaches(container: str, host: str, port: int) -> subprocess.CompletedProcess:
    return docker("exec", container, "python3", "-c",
                  f"import socket; socket.create_connection(('{host}', {port}), timeout=3).close()", check=False)


def test_a_guest_restarted_outside_doit_is_never_unfenced(lifecycle, host_listener):
    """The fence lives in the namespace holder: a restart of the guest, or of the holder itself, probed at
    once and before any doit start, leaves the guest fenced (or cut off), never open."""
    env, extra, _ = lifecycle
    plan = env.plan("lifecycle", extra)
    gateway, bundle = plan.network.guest_side.gateway, plan.network.bundle_ip
    assert _reaches(plan.guest.name, gateway, host_listener).returncode != 0
    docker("restart", "-t", "0", plan.guest.name)
    probe = _reaches(plan.guest.name, gateway, host_listener)
    assert probe.returncode != 0 and "refused" in probe.stderr, probe.stderr
    assert _reaches(plan.guest.name, bundle, 8080).returncode == 0, "the positive control: the bundle still answers"
    # The holder restarted by hand fences its new namespace before anything can use it; the guest is left
    # in the old one, with no way out at all, until start puts it in the new one.
    holder = DockerBackend.netns_holder(plan)
    before = _container_id(plan.guest.name)
    docker("restart", "-t", "0", holder)
    assert _reaches(plan.guest.name, gateway, host_listener).returncode != 0
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    assert _container_id(plan.guest.name) != before
    probe = _reaches(plan.guest.name, gateway, host_listener)
    assert probe.returncode != 0 and "refused" in probe.stderr, probe.stderr
    assert _reaches(plan.guest.name, bundle, 8080).returncode == 0


def test_agent_file_change_recreates_the_guest_only(lifecycle):
    env, extra, _ = lifecycle
    plan = env.plan("lifecycle", extra)
    bundle_before, guest_before = _container_id(plan.bundle.name), _container_id(plan.guest.name)
    env.write_agent("lifecycle", 'prompt: "lifecycle prompt"\nroutes: []\nenv: {STAGE: "two"}\n')
    mark = _lines(env.argv_log)
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    assert _count(env.argv_log, mark, "build") == 0
    assert _container_id(plan.bundle.name) == bundle_before
    assert _container_id(plan.guest.name) != guest_before
    assert "STAGE=two" in docker("exec", plan.guest.name, "env").stdout


def test_dockerfile_and_context_changes_rebuild_exactly_their_image(lifecycle):
    env, extra, images = lifecycle
    plan = env.plan("lifecycle", extra)
    with (images / "agent" / "Dockerfile").open("a") as fh:
        fh.write('\nLABEL dev.claude-bottle.test-edit="dockerfile"\n')
    mark = _lines(env.argv_log)
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    builds = [l for l in env.argv_log.read_text().splitlines()[mark:] if l.startswith("build")]
    assert len(builds) == 1 and plan.agent_image.tag in builds[0], builds
    (images / "bundle" / "NOTES.txt").write_text("a new file in the bundle's build context\n")
    mark = _lines(env.argv_log)
    env.doit("start", "agent=lifecycle", "command=true", extra_env=extra)
    builds = [l for l in env.argv_log.read_text().splitlines()[mark:] if l.startswith("build")]
    assert len(builds) == 1 and plan.bundle_image.tag in builds[0], builds


def test_clean_keeps_work_is_idempotent_and_purge_removes_it(bottle_env):
    bottle_env.write_agent("teardown", "routes: []\n")
    bottle_env.doit("start", "agent=teardown", "command=sh -c 'echo kept > /workspace/work.txt'")
    plan = bottle_env.plan("teardown")
    bottle_env.doit("clean", "agent=teardown")
    assert _labelled("teardown", "container") == [] and _labelled("teardown", "network") == []
    assert docker("volume", "inspect", plan.guest.workspace_volume, check=False).returncode == 0
    assert plan.ca_cert.exists() and plan.state_dir.is_dir()
    bottle_env.doit("clean", "agent=teardown")          # a second clean finds nothing and succeeds
    # The work survives a restart of the bottle.
    proc = bottle_env.doit("start", "agent=teardown", "command=cat /workspace/work.txt")
    assert "kept" in proc.stdout
    bottle_env.doit("clean", "agent=teardown", "purge=1")
    assert docker("volume", "inspect", plan.guest.workspace_volume, check=False).returncode != 0
    assert not plan.state_dir.exists()
    assert _labelled("teardown", "container") == [] and _labelled("teardown", "network") == []


def test_ctrl_c_during_start_leaves_nothing_half_built(bottle_env):
    bottle_env.write_agent("interrupted", "routes: []\n")
    plan = bottle_env.plan("interrupted")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "start",
                             "agent=interrupted", "command=true"], cwd=ROOT, env=bottle_env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # Interrupt while the bundle is being brought up: its container exists but is not yet healthy.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _container_id(plan.bundle.name):
        time.sleep(0.05)
    assert _container_id(plan.bundle.name), "start never reached the bundle step"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    for name in _labelled("interrupted", "container"):
        # A container started just before the interrupt may still be in its health check's first
        # seconds; what counts is where it settles: running and healthy, not stuck or unhealthy.
        for _ in range(300):
            state = docker("inspect", "-f", "{{.State.Running}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                           name).stdout.split()
            if state[1:] != ["starting"]:
                break
            time.sleep(0.1)
        assert state[0] == "true" and state[1:] in ([], ["healthy"]), f"{name} left half-built: {state}"
    # What was finished stays usable: the next start completes the bottle.
    bottle_env.doit("start", "agent=interrupted", "command=true")
    bottle_env.doit("clean", "agent=interrupted", "purge=1")
    assert _labelled("interrupted", "container") == [] and _labelled("interrupted", "network") == []
