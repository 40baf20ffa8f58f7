"""Invariant 5 and 7 for git: the guest works on repos cloned through git-gate; pushes reach the
upstream only when policy allows them, with an identity that never enters the guest; nothing pushed
is lost when the upstream is down or the bottle is cleaned."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from bottle_tasks.bundle_plan import GIT_MIRRORS_DIR
from bottle_tasks.sidecars.supervise_store import Store, SuperviseError
from tests.integration.conftest import AGENT_GIT as AGENT, GIT_TOKEN, Bottle, docker
from tests.integration.test_tokens import _files_containing

def _upstream_git(bottle: Bottle, *args: str) -> str:
    return docker("exec", bottle.upstream, "git", "--git-dir", "/srv/git/app.git", *args, check=False).stdout


def _guest_git(bottle: Bottle, script: str):
    return bottle.exec("sh", "-c", f"cd /workspace/app && {script}")


def _audit(bottle: Bottle) -> list[dict]:
    path = bottle.plan.git.gate_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def approving_pushes(bottle: Bottle) -> Iterator[list[str]]:
    """The bottle supervises `git push`, so git-gate holds every push for a human: approve each one
    (the host side of `doit approve`, without a doit start per decision). Yields the approved ids."""
    store, stop, approved = Store(bottle.plan.supervise.state_dir), threading.Event(), []

    def approve() -> None:
        while not stop.is_set():
            for request in store.list_pending():
                if request.tool == "git push":
                    try:
                        store.decide(request.id, "approve", "integration test", "a push the test makes")
                        approved.append(request.id)
                    except SuperviseError:
                        pass
            stop.wait(0.2)

    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    try:
        yield approved
    finally:
        stop.set()
        thread.join(timeout=10)


def _wait_upstream_has(bottle: Bottle, ref: str, sha: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _upstream_git(bottle, "rev-parse", ref).strip() == sha:
            return True
        time.sleep(0.5)
    return False


def test_repo_is_cloned_through_git_gate_with_the_agents_identity(bottle_git):
    log = _guest_git(bottle_git, "git log --format=%s -1 && git remote get-url origin && git config user.email")
    lines = log.stdout.split()
    assert "initial" in log.stdout, log.stdout + log.stderr
    assert lines[-2] == f"{bottle_git.plan.git.url}/app.git" and lines[-1] == "probe@bottle.test"


def test_a_guest_fetch_sees_new_upstream_commits(bottle_git):
    script = """
set -e
tmp=$(mktemp -d) && git clone -q /srv/git/app.git "$tmp/c" && cd "$tmp/c"
git config user.email up@test && git config user.name up
echo more >> README.md && git commit -qam "upstream moved on" && git push -q origin main && git rev-parse HEAD
"""
    sha = docker("exec", bottle_git.upstream, "sh", "-c", script).stdout.split()[-1]
    # A fetch refreshes the mirror on demand, at most once every 2 s per repo.
    deadline = time.monotonic() + 10
    while True:
        fetched = _guest_git(bottle_git, "git fetch -q origin && git rev-parse origin/main")
        if fetched.stdout.split()[-1:] == [sha] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert fetched.stdout.split()[-1] == sha, fetched.stdout + fetched.stderr


def test_push_to_an_allowed_branch_reaches_the_upstream(bottle_git):
    branch = f"bottle/{AGENT}/feature"
    with approving_pushes(bottle_git) as approved:
        push = _guest_git(bottle_git, f"git checkout -q -b {branch} && echo change > f.txt && git add f.txt && "
                                      f"git commit -qm 'agent change' && git push -q origin {branch} && git rev-parse HEAD")
    assert push.returncode == 0, push.stderr
    assert len(approved) == 1, "git-gate did not hold the push for a human"
    sha = push.stdout.split()[-1]
    assert _wait_upstream_has(bottle_git, f"refs/heads/{branch}", sha), _audit(bottle_git)


# A fresh fake AWS key in $K, made in the guest.
_FAKE_KEY_SH = ("K=AKIA$(python3 -c 'import secrets,string; "
                "print(\"\".join(secrets.choice(string.ascii_uppercase+\"234567\") for _ in range(16)))')")


@pytest.mark.parametrize("case,script,reason", [
    ("protected branch", "git checkout -q main && git reset -q --hard origin/main && echo x >> README.md && git commit -qam 'to main' && git push origin main",
     "not allowed"),
    ("force push", "git checkout -q bottle/probe-git/feature && git commit -q --amend -m rewritten && "
                   "git push -f origin bottle/probe-git/feature", "force"),
    ("deletion", "git push origin :bottle/probe-git/feature", "delet"),
    ("secret in the diff", "git checkout -q -b bottle/probe-git/leak && echo \"aws_key = AKIA$(python3 -c "
                           "'import secrets,string; print(\"\".join(secrets.choice(string.ascii_uppercase+\"234567\") for _ in range(16)))')\" "
                           "> leak.txt && git add leak.txt && git commit -qm leak && git push origin bottle/probe-git/leak",
     "secret"),
    # git-gate scans every place of a push, not only what the diff adds (tests/unit/test_gitgate_scan.py)
    ("secret in the author", f"{_FAKE_KEY_SH} && git checkout -q -B bottle/probe-git/author origin/main && "
                             "git commit -q --allow-empty --author=\"Dev $K <dev@example.invalid>\" -m author && "
                             "git push origin bottle/probe-git/author", "secret in the author of commit"),
    ("secret as a rename target", f"{_FAKE_KEY_SH} && git checkout -q -B bottle/probe-git/rename origin/main && "
                                  "git mv README.md \"$K.md\" && git commit -qm rename && "
                                  "git push origin bottle/probe-git/rename", "secret in the file names of commit"),
    ("secret cut across two lines", f"{_FAKE_KEY_SH} && git checkout -q -B bottle/probe-git/split origin/main && "
                                    "printf '%s\\n%s\\n' \"${K%??????????}\" \"${K#??????????}\" > split.txt && "
                                    "git add split.txt && git commit -qm split && git push origin bottle/probe-git/split",
     "joined across line breaks"),
])
def test_pushes_against_policy_are_rejected_with_a_reason(bottle_git, case, script, reason):
    before = _upstream_git(bottle_git, "for-each-ref")
    proc = _guest_git(bottle_git, script)
    assert proc.returncode != 0, f"{case}: push was accepted\n{proc.stdout}{proc.stderr}"
    assert "git-gate: rejected" in proc.stderr and reason in proc.stderr.lower(), proc.stderr
    time.sleep(1)
    assert _upstream_git(bottle_git, "for-each-ref") == before, f"{case}: something reached the upstream"
    rejected = [e for e in _audit(bottle_git) if e.get("event") == "push" and not e.get("accepted")]
    assert rejected, "the rejection was not audited"


def test_identity_never_enters_the_guest(bottle_git):
    guest = bottle_git.plan.guest.name
    hits, scanned = _files_containing(guest, GIT_TOKEN.encode())
    assert scanned > 1000 and not hits, hits
    assert GIT_TOKEN not in bottle_git.exec("env").stdout
    assert GIT_TOKEN not in docker("inspect", guest).stdout
    grep = bottle_git.exec("grep", "-rlF", "-f", "-", "/workspace", "/home/agent", input=GIT_TOKEN + "\n")
    assert grep.returncode == 1, grep.stdout
    assert GIT_TOKEN not in (bottle_git.plan.git.gate_dir / "audit.jsonl").read_text()
    assert GIT_TOKEN not in bottle_git.bundle_log()
    # It did reach the upstream: the accepted push above authenticated with it.
    assert any(json.loads(l).get("authorized") for l in docker("logs", bottle_git.upstream).stdout.splitlines()
               if l.startswith('{"event": "git"'))


def test_push_while_upstream_is_down_is_forwarded_when_it_is_back(bottle_git):
    docker("stop", "-t", "0", bottle_git.upstream)
    try:
        branch = f"bottle/{AGENT}/offline"
        with approving_pushes(bottle_git):
            push = _guest_git(bottle_git, f"git checkout -q -b {branch} main && echo later > later.txt && git add later.txt && "
                                          f"git commit -qm 'made offline' && git push -q origin {branch} && git rev-parse HEAD")
        assert push.returncode == 0, push.stderr
        sha = push.stdout.split()[-1]
        time.sleep(2)
        failed = [e for e in _audit(bottle_git) if e.get("event") == "forward" and not e.get("ok", e.get("accepted"))]
        assert failed, "no failed forward was recorded while the upstream was down"
    finally:
        docker("start", bottle_git.upstream)
    assert _wait_upstream_has(bottle_git, f"refs/heads/{branch}", sha, timeout=90), _audit(bottle_git)[-3:]


def test_mirror_and_pushed_commits_survive_clean(bottle_git):
    """clean keeps the gate's repo (its state dir) and the agent's shared objects it borrows."""
    repo, objects = bottle_git.plan.git.gate_dir / "app.git", bottle_git.plan.git.mirrors_dir
    bottle_git.env.doit("clean", f"agent={AGENT}")
    assert repo.is_dir() and (objects / "app.objects").is_dir()
    branch = f"refs/heads/bottle/{AGENT}/feature"
    shown = docker("run", "--rm", "-v", f"{repo}:/m:ro", "-v", f"{objects}:{GIT_MIRRORS_DIR}:ro", "--entrypoint", "git",
                   "claude-bottle-test/upstream:latest", "--git-dir", "/m", "log", "-1", "--format=%H %T", branch,
                   "--").stdout.split()
    assert len(shown) == 2, f"{branch} or its objects did not survive clean"
    bottle_git.env.doit("start", f"agent={AGENT}", "command=true")   # later tests find the bottle up again
