"""Pushes that wait for a human: the server-side half of supervise.

A repo whose ``push.approve`` is on (the host turns it on when a supervise rule covers ``git push``)
has every push the policy accepts held in its ``pre-receive`` hook: the hook files a request in the
supervise queue (``supervise_store``, the files ``doit supervise`` lists and ``doit approve`` /
``doit deny`` decide) and waits, while the client waits too. The request shows the repo and, per
ref, the commit range, the commits and the diffstat. An approval lets the push into the mirror (and
on to the upstream); a denial rejects it with the human's reason; no decision within the timeout
rejects it too. The agent sees each as its push's outcome, with ``remote: git-gate: ...`` lines while
it waits (every KEEPALIVE_S; git's own keepalives keep the connection up in between).

Unlike the guest's hook, this holds however git was invoked (``git -C dir push``, ``bash -c``,
aliases, another git binary), because every push arrives here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from bottle_tasks.sidecars.gitgate.config import SuperviseLink
from bottle_tasks.sidecars.gitgate.git import run_git
from bottle_tasks.sidecars.gitgate.policy import RefUpdate
from bottle_tasks.sidecars.supervise_store import (
    EXPIRY_GRACE_S, MAX_SUMMARY_CHARS, Store, SuperviseError, become, state_dir_owner,
)

TOOL = "git push"                # the request's tool, as doit supervise shows it
SOURCE = "git-gate"              # the request's source (supervise_store.SOURCES); the guest cannot claim it
POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 10.0
MAX_HELD_PUSHES = 8              # pushes waiting at once; each holds a connection and its git processes
MAX_COMMITS_SHOWN = 20
MAX_REFS_DESCRIBED = 10          # in detail; the others by name and ids only
MAX_DIFFSTAT_LINES = 40
DESCRIBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Verdict:
    """What the human decided about a held push: status approved, denied, expired, or error (nobody asked)."""
    status: str
    request_id: str = ""
    by: str = ""
    reason: str = ""
    timeout_seconds: int = 0

    @property
    def approved(self) -> bool:
        return self.status == "approved"

    def message(self) -> str:
        """One line for the agent: the approval, or why its push is rejected."""
        which = f"request {self.request_id}"
        why = f": {self.reason}" if self.reason else ""
        if self.status == "approved":
            return f"approved by {self.by or 'a human'}{why} ({which})"
        if self.status == "denied":
            return f"denied by {self.by or 'a human'}{why or ' (no reason given)'} ({which})"
        if self.status == "expired":
            return (f"no human approved the push within {self.timeout_seconds} s, so it is denied ({which}); "
                    "ask the user to watch doit supervise before pushing again")
        return f"could not ask a human to approve the push: {self.reason}"


def _one_line(text: str, limit: int = 500) -> str:
    """Attacker-written text (commit subjects, file names) shown to the human: printable, one line."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _git_lines(args: Sequence[str], repo_dir: Path, env: Mapping[str, str] | None) -> list[str]:
    result = run_git(args, cwd=repo_dir, env=env, timeout=DESCRIBE_TIMEOUT_S)
    if result.returncode != 0:
        return []
    return [_one_line(line) for line in result.stdout.decode("utf-8", "replace").splitlines() if line.strip()]


def _short(oid: str) -> str:
    return oid[:12]


def describe_update(update: RefUpdate, repo_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ref, its commit range, the commits it brings (at most MAX_COMMITS_SHOWN) and the diffstat
    against what the branch had (a new branch: against where it leaves the mirror's default branch)."""
    entry: dict[str, Any] = {"ref": update.ref, "old": update.old, "new": update.new}
    if update.deleted:
        entry.update(change="delete", range=f"{_short(update.old)} -> (deleted)")
        return entry
    if update.created:
        merge_base = run_git(["merge-base", "HEAD", update.new], cwd=repo_dir, env=env).stdout.decode().strip()
        base = merge_base or run_git(["hash-object", "-t", "tree", "--stdin"], cwd=repo_dir, env=env,
                                     input=b"").stdout.decode().strip()  # the empty tree: all of it is new
        revisions = [update.new, "--not", "--all"]
        entry.update(change="create", range=f"new at {_short(update.new)}"
                     + (f" (branches off {_short(merge_base)})" if merge_base else ""))
    else:
        base = update.old
        revisions = [f"{update.old}..{update.new}"]
        entry.update(change="update", range=f"{_short(update.old)}..{_short(update.new)}")
    count = run_git(["rev-list", "--count", *revisions], cwd=repo_dir, env=env).stdout.decode().strip()
    entry["commit_count"] = int(count) if count.isdigit() else 0
    entry["commits"] = _git_lines(["log", f"--max-count={MAX_COMMITS_SHOWN}", "--no-color", "--format=%h %an: %s",
                                   *revisions], repo_dir, env)
    entry["diffstat"] = _git_lines(["diff", "--no-color", "--no-ext-diff", "--no-textconv", "--find-renames",
                                    "--stat=120,80", f"--stat-count={MAX_DIFFSTAT_LINES}", base, update.new],
                                   repo_dir, env)
    return entry


def describe_push(repo: str, updates: Sequence[RefUpdate], repo_dir: Path,
                  env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """(summary, input) of the request: the summary is one line per push, the input has every ref."""
    refs = [describe_update(update, repo_dir, env) for update in updates[:MAX_REFS_DESCRIBED]]
    parts = []
    for entry in refs:
        name = entry["ref"].removeprefix("refs/heads/")
        if entry["change"] == "delete":
            parts.append(f"delete {name}")
            continue
        total = entry["diffstat"][-1] if entry["diffstat"] else "no file changes"
        parts.append(f"{name} {entry['range']}, {entry['commit_count']} commit(s), {total}")
    rest = [update.as_record() for update in updates[MAX_REFS_DESCRIBED:]]
    if rest:
        parts.append(f"and {len(rest)} more ref(s)")
    summary = _one_line(f"git push to {repo}: " + "; ".join(parts), MAX_SUMMARY_CHARS)
    return summary, {"repo": repo, "refs": refs + rest}


def _say(out: TextIO, text: str) -> None:
    out.write(f"git-gate: {text}\n")
    out.flush()


def wait_for_human(store: Store, repo: str, summary: str, details: Mapping[str, Any], timeout_s: int, out: TextIO,
                   *, poll_s: float = POLL_INTERVAL_S, keepalive_s: float = KEEPALIVE_S,
                   monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                   wanted: Callable[[], bool] = lambda: True) -> Verdict:
    """File the request and wait for the human's decision, at most timeout_s (plus the store's grace),
    or until wanted() says nobody waits for the answer any more."""
    try:
        # Only git-gate's own requests count: the guest can file a request named "git push" too, but
        # not one with git-gate as its source, and it has its own quota.
        held = store.count_pending(SOURCE)
        if held >= MAX_HELD_PUSHES:
            return Verdict("error", reason=f"{held} pushes are already waiting for a human (at most "
                                           f"{MAX_HELD_PUSHES}); wait until they are decided")
        request = store.create_request(TOOL, dict(details), summary, timeout_s, source=SOURCE)
    except (SuperviseError, OSError) as exc:
        return Verdict("error", reason=_one_line(str(exc)))
    _say(out, f"the push to {repo} waits for a human: request {request.id}, up to {timeout_s} s "
              "(on the host: doit supervise, then doit approve or doit deny)")
    started = monotonic()
    deadline = started + timeout_s + EXPIRY_GRACE_S + poll_s
    next_note = started + keepalive_s
    while True:
        try:
            current = store.get(request.id)
        except (SuperviseError, OSError) as exc:
            return Verdict("error", request.id, reason=f"the supervise queue could not be read ({_one_line(str(exc))})")
        if not current.pending:
            return Verdict(current.status, request.id, _one_line(current.by, 200), _one_line(current.reason),
                           timeout_s)
        now = monotonic()
        if now >= deadline:  # the store says expired by now; a clock that disagrees does not keep us here
            return Verdict("expired", request.id, timeout_seconds=timeout_s)
        if not wanted():
            return Verdict("error", request.id, reason="the push went away before a decision")
        if now >= next_note:
            _say(out, f"still waiting for a human to approve request {request.id} "
                      f"({max(0, int(started + timeout_s - now))} s left)")
            next_note = now + keepalive_s
        sleep(max(0.0, min(poll_s, deadline - now)))


def _as_owner(owner: tuple[int, int], state_dir: Path, work: Callable[[Store, Callable[[], bool]], Verdict]) -> Verdict:
    """Run work in a child that has become the state dir's owner (the host user): the bundle runs as
    root, and what the host's doit reads must be the host user's (supervise_store keeps it 0600).
    The child works from inside the dir (its parents need not be searchable by the owner) and gives
    up when its parent, the hook, is gone (root without CAP_KILL cannot signal it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read_end)
            os.chdir(state_dir)
            become(*owner)
            verdict = work(Store(Path(".")), lambda: os.getppid() == parent)
            os.write(write_end, json.dumps(asdict(verdict)).encode())
            code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    try:
        return Verdict(**json.loads(answer))
    except (ValueError, TypeError):
        return Verdict("error", reason="the wait for a decision ended without one")


def hold_push(link: SuperviseLink, repo: str, updates: Sequence[RefUpdate], repo_dir: Path, out: TextIO,
              env: Mapping[str, str] | None = None) -> Verdict:
    """Describe the push (as git-gate, which reads the quarantined objects), then wait for the human
    as the owner of the supervise state dir."""
    summary, details = describe_push(repo, updates, repo_dir, env)

    def work(store: Store, wanted: Callable[[], bool]) -> Verdict:
        return wait_for_human(store, repo, summary, details, link.timeout_seconds, out, wanted=wanted)

    owner = state_dir_owner(link.state_dir)
    if owner is None:
        return work(Store(link.state_dir), lambda: True)
    return _as_owner(owner, link.state_dir, work)
