"""Walking around supervise: the guest's hook matches Bash commands, so `git -C dir push`, `\\git push`
or `bash -c "git push"` slip past `Bash(git push:*)`. git-gate is the server-side gate: in a bottle that
supervises `git push` it holds every push in the supervise queue until `doit approve`, however git was
invoked; a denial or no decision in time is the push's error, and such a push never arrives."""

from __future__ import annotations

import subprocess
import time

from bottle_tasks.guest.supervise_hook import compile_pattern
from tests.integration.conftest import AGENT_GIT as AGENT
from tests.integration.test_git import _audit, _upstream_git, _wait_upstream_has
from tests.integration.test_supervise import _pending_id

RULE = "Bash(git push:*)"  # what bottle_git supervises


def _push(bottle, branch: str, push: str) -> tuple[subprocess.Popen, str]:
    """Commit on a new branch in the guest, then run `push` (a way of pushing the hook does not see) in the background."""
    prepare = bottle.exec("sh", "-c", f"cd /workspace/app && git checkout -q -b {branch} origin/main && "
                                      f"printf 'one\\ntwo\\n' > {branch.rsplit('/', 1)[1]}.txt && git add -A && "
                                      f"git commit -qm 'work on {branch}' && git rev-parse HEAD")
    assert prepare.returncode == 0, prepare.stderr
    assert not compile_pattern(RULE)("Bash", {"command": push}, "/workspace"), f"the guest hook would see {push!r}"
    proc = subprocess.Popen(bottle.exec_argv(["sh", "-c", push]), env=bottle.env.test_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, prepare.stdout.split()[-1]


def test_a_push_that_walks_around_the_guest_hook_waits_for_doit_approve(bottle_git):
    branch = f"bottle/{AGENT}/around-the-hook"
    proc, sha = _push(bottle_git, branch, f"git -C /workspace/app push origin HEAD:refs/heads/{branch}")
    request_id = _pending_id(bottle_git, branch, proc, timeout=60)
    listing = bottle_git.env.doit("supervise", f"agent={AGENT}").stdout
    block = next(b for b in listing.split("\n\n") if request_id in b)
    assert "tool:    git push" in block
    assert f"git push to app: {branch} new at {sha[:12]}" in block and "1 file changed, 2 insertions(+)" in block
    assert "around-the-hook.txt" in block, block  # the diffstat, in the input
    assert proc.poll() is None, "the push did not wait for a human"
    assert _upstream_git(bottle_git, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}").strip() == ""
    bottle_git.env.doit("approve", f"agent={AGENT}", f"id={request_id}", "reason=checked the diff")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "git-gate: the push to app waits for a human" in err and "approved by" in err, err
    assert _wait_upstream_has(bottle_git, f"refs/heads/{branch}", sha), _audit(bottle_git)[-3:]


def test_a_denied_push_is_rejected_with_the_reason_and_never_arrives(bottle_git):
    branch = f"bottle/{AGENT}/denied-bypass"
    proc, _ = _push(bottle_git, branch, f"cd /workspace/app && bash -c 'g\"\"it push origin HEAD:refs/heads/{branch}'")
    request_id = _pending_id(bottle_git, branch, proc, timeout=60)
    before = _upstream_git(bottle_git, "for-each-ref")
    bottle_git.env.doit("deny", f"agent={AGENT}", f"id={request_id}", "reason=not through a side door")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"git-gate: rejected refs/heads/{branch}: denied by" in err and "not through a side door" in err, err
    time.sleep(1)
    assert _upstream_git(bottle_git, "for-each-ref") == before
    pushes = [e for e in _audit(bottle_git) if e.get("event") == "push" and branch in str(e.get("refs"))]
    assert pushes and not pushes[-1]["accepted"] and pushes[-1]["approval"]["status"] == "denied"


def test_a_push_nobody_decides_is_denied_when_the_supervise_timeout_passes(bottle_git):
    branch = f"bottle/{AGENT}/nobody-looked"
    proc, _ = _push(bottle_git, branch, f"cd /workspace/app && \\git push origin HEAD:refs/heads/{branch}")
    _pending_id(bottle_git, branch, proc, timeout=60)
    out, err = proc.communicate(timeout=120)  # bottle_git's supervise timeout is 15 s
    assert proc.returncode != 0
    assert "no human approved the push within 15 s" in err, err
    assert _upstream_git(bottle_git, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}").strip() == ""
