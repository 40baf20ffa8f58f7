"""Invariant 3: the real token reaches its upstream, and appears nowhere in the guest or on argv."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

from tests.integration.conftest import FAKE_TOKEN, GIT_TOKEN, docker


def test_real_token_arrives_upstream_and_the_guest_sees_only_the_placeholder(bottle_a):
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "https://api.anthropic.com/v1/echo-token",
                         "-H", "x-api-key: bottle-placeholder-ANTHROPIC_API_KEY")
    assert proc.returncode == 0, proc.stderr
    # The upstream echoes what it got; egress puts the placeholder back before the guest sees it.
    assert FAKE_TOKEN not in proc.stdout
    echoed = json.loads(proc.stdout)
    assert echoed["path"] == "/v1/echo-token"
    arrived = [r for r in bottle_a.upstream_log() if r.get("path") == "/v1/echo-token"]
    assert arrived, "the request never reached the upstream"
    headers = {k.lower(): v for k, v in arrived[-1]["headers"].items()}
    assert headers["x-api-key"] == FAKE_TOKEN


def test_token_is_injected_even_without_the_placeholder_header(bottle_a):
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "https://api.anthropic.com/v1/no-header")
    assert proc.returncode == 0, proc.stderr
    arrived = [r for r in bottle_a.upstream_log() if r.get("path") == "/v1/no-header"]
    assert {k.lower(): v for k, v in arrived[-1]["headers"].items()}["x-api-key"] == FAKE_TOKEN


def test_uncredentialed_route_gets_no_token(bottle_a):
    bottle_a.exec("curl", "-sS", "-m", "10", "https://upstream.test/no-token", "-H", "x-api-key: mine")
    arrived = [r for r in bottle_a.upstream_log() if r.get("path") == "/no-token"]
    assert FAKE_TOKEN not in json.dumps(arrived[-1])


def test_token_appears_nowhere_in_the_guest(bottle_a):
    # Exercise the credentialed route first, so a leak on that path would have happened.
    bottle_a.exec("curl", "-sS", "-m", "10", "https://api.anthropic.com/v1/warmup")
    guest = bottle_a.plan.guest.name
    env = bottle_a.exec("env").stdout
    assert "ANTHROPIC_API_KEY=bottle-placeholder-ANTHROPIC_API_KEY" in env
    assert FAKE_TOKEN not in env
    environ = bottle_a.exec("sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'", user="root").stdout
    assert "ANTHROPIC_API_KEY" in environ and FAKE_TOKEN not in environ
    cmdlines = bottle_a.exec("sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", user="root").stdout
    assert cmdlines and FAKE_TOKEN not in cmdlines
    # Every file of the guest's filesystem, read from the host (root inside holds no DAC caps),
    # then the workspace volume, which `docker export` leaves out.
    hits, scanned = _files_containing(guest, FAKE_TOKEN.encode())
    assert scanned > 1000 and not hits, f"token found in {hits}"
    placeholder_hits, _ = _files_containing(guest, b"You are a test agent.")
    assert placeholder_hits, "the scan would not have found the prompt file that is there"
    grep = bottle_a.exec("grep", "-rlF", "-f", "-", "/workspace", "/home/agent", input=FAKE_TOKEN + "\n")
    assert grep.returncode == 1 and grep.stdout == "", grep.stdout + grep.stderr
    assert FAKE_TOKEN not in docker("inspect", guest).stdout
    logs = docker("logs", guest)
    assert FAKE_TOKEN not in logs.stdout + logs.stderr
    assert FAKE_TOKEN not in bottle_a.bundle_log()
    image = docker("image", "inspect", bottle_a.plan.agent_image.tag).stdout
    assert FAKE_TOKEN not in image


def test_token_never_travels_on_the_tools_argv(bottle_a):
    log = bottle_a.env.argv_log.read_text()
    assert "create --name bottle-probe-a-bundle" in log, "the docker shim did not see the bundle being created"
    assert FAKE_TOKEN not in log
    # The bundle gets its secrets as a file on stdin (`docker cp -`), not even their names on argv.
    assert "cp - bottle-probe-a-bundle:/var/lib/bottle" in log
    assert "--env ANTHROPIC_API_KEY" not in log


def test_no_bottle_container_shows_a_token_in_docker_inspect(bottle_a, bottle_git):
    for bottle in (bottle_a, bottle_git):
        names = docker("ps", "-a", "--filter", f"label=dev.claude-bottle.slug={bottle.plan.slug}",
                       "--format", "{{.Names}}").stdout.split()
        assert bottle.plan.bundle.name in names and bottle.plan.guest.name in names
        inspected = docker("inspect", *names).stdout
        for secret in (FAKE_TOKEN, GIT_TOKEN):
            assert secret not in inspected, f"a token is in docker inspect of {names}"
        assert "ANTHROPIC_API_KEY=" not in json.dumps([c["Config"]["Env"] for c in json.loads(inspected)
                                                        if c["Name"].lstrip("/") == bottle.plan.bundle.name])


MODULES = {"egress": "bottle_tasks.sidecars.egress", "git-gate": "bottle_tasks.sidecars.gitgate",
           "dns": "bottle_tasks.sidecars.dnssink", "supervise": "bottle_tasks.sidecars.supervise"}


def _daemon_environ(bottle, daemon: str) -> str:
    """The environment of a bundle daemon's processes and of everything under them (git-gate's git
    children), read from the host: a daemon that dropped to another uid is not dumpable from inside."""
    rows = [line.split(None, 2) for line in docker("top", bottle.plan.bundle.name, "-eo", "pid,ppid,args").stdout.splitlines()[1:]]
    pids = {pid for pid, _, args in rows if MODULES[daemon] in args}
    for _ in range(3):
        pids |= {pid for pid, ppid, _ in rows if ppid in pids}
    assert pids, f"no {daemon} process in the bundle"
    environs = []
    for pid in pids:
        try:
            environs.append(Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace").replace("\0", "\n"))
        except FileNotFoundError:
            continue          # a short-lived child gone meanwhile
    return "\n".join(environs)


def test_each_daemon_holds_only_its_own_secret(bottle_git):
    bottle_git.exec("sh", "-c", "cd /workspace/app && git fetch -q origin")       # git-gate has run git children
    assert FAKE_TOKEN in _daemon_environ(bottle_git, "egress")
    assert GIT_TOKEN not in _daemon_environ(bottle_git, "egress")
    assert GIT_TOKEN in _daemon_environ(bottle_git, "git-gate")
    for daemon in ("git-gate", "dns", "supervise"):
        environ = _daemon_environ(bottle_git, daemon)
        assert environ and FAKE_TOKEN not in environ and "ANTHROPIC_API_KEY=" not in environ, daemon
    assert GIT_TOKEN not in _daemon_environ(bottle_git, "dns")


def _files_containing(container: str, needle: bytes) -> tuple[list[str], int]:
    export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
    hits, scanned = [], 0
    with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                scanned += 1
                data = tar.extractfile(member).read()
                if needle in data:
                    hits.append(member.name)
    assert export.wait() == 0
    return hits, scanned
