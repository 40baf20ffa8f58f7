"""The push policy the pre-receive hook applies: every ref update against the repo's PushPolicy
(branch pattern, tags, deletion, force), and what every new commit adds scanned for secrets
(dlp's built-in patterns, plus pipelock's scan API when configured). Secrets are named by
pattern and commit id, never shown.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from bottle_tasks.contract import PushPolicy
from bottle_tasks.sidecars import dlp
from bottle_tasks.sidecars.configfile import pipelock_scan_token
from bottle_tasks.sidecars.gitgate.config import GateConfig
from bottle_tasks.sidecars.gitgate.git import git_error_line, is_ancestor, is_zero, run_git

_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str

    @property
    def created(self) -> bool:
        return is_zero(self.old)

    @property
    def deleted(self) -> bool:
        return is_zero(self.new)

    def as_record(self) -> dict[str, str]:
        return {"ref": self.ref, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class RefDecision:
    update: RefUpdate
    reasons: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.reasons


def parse_ref_updates(text: str) -> list[RefUpdate]:
    """pre-/post-receive stdin: one ``<old> <new> <ref>`` per line."""
    updates = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not _OID.match(parts[0]) or not _OID.match(parts[1]):
            raise ValueError(f"unexpected ref update line: {line[:200]!r}")
        updates.append(RefUpdate(parts[0], parts[1], parts[2]))
    return updates


class SecretScanner:
    """dlp's built-in patterns, then pipelock's scan API when configured. Returns pattern names only."""

    def __init__(self, pipelock: dlp.PipelockScanner | None = None):
        self.pipelock = pipelock

    def scan(self, text: str) -> list[str]:
        """Pattern names found in text. Raises dlp.DlpUnavailable when pipelock cannot give a verdict."""
        found = dlp.matching_pattern_names(text)
        if not found and self.pipelock is not None and text.strip():
            matches, _advisories = self.pipelock.scan(dlp.RequestParts("", (), text))
            found = [match.pattern for match in matches]
        return found


def added_text(diff: str) -> str:
    """The lines a (possibly combined) diff adds, plus the new file names; removed lines are dropped.

    Removing a secret must not block a push, and context lines are already in the mirror.
    """
    kept: list[str] = []
    columns = 0  # parents of the hunk being read: "@@" -> 1, "@@@" -> 2, 0 outside hunks
    for line in diff.split("\n"):
        if line.startswith("@@"):
            columns = len(line) - len(line.lstrip("@")) - 1
            continue
        if line.startswith(("diff --git ", "diff --cc ", "diff --combined ")):
            columns = 0
            continue
        if columns == 0:
            if line.startswith("+++ "):
                kept.append(line[4:])
            continue
        if "+" in line[:columns]:
            kept.append(line[columns:])
    return "\n".join(kept)


def new_commits(repo_dir: Path, new: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Commits reachable from new that no ref of the mirror reaches yet (oldest first)."""
    result = run_git(["rev-list", "--reverse", new, "--not", "--all"], cwd=repo_dir, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"git rev-list failed: {git_error_line(result.stderr)}")
    return result.stdout.decode().split()


def commit_texts(repo_dir: Path, commits: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """commit id -> its message plus what its diff adds (combined diff for merges), in one git log."""
    if not commits:
        return {}
    marker = f"\x1egit-gate-{secrets.token_hex(12)}"  # unguessable: content cannot fake a boundary
    result = run_git(
        ["log", "--no-walk=unsorted", "--stdin", "-p", "--cc", "--text", "--no-color", "--no-ext-diff",
         "--no-textconv", "--find-renames", f"--format=tformat:{marker}%H%n%B{marker}"],
        cwd=repo_dir, env=env, input=("\n".join(commits) + "\n").encode())
    if result.returncode != 0:
        raise RuntimeError(f"git log failed: {git_error_line(result.stderr)}")
    texts: dict[str, str] = {}
    output = result.stdout.decode("utf-8", errors="replace")  # secrets are ASCII
    pieces = output.split(marker)
    # pieces: ["", "<sha>\n<message>", "<diff>", "<sha>\n<message>", "<diff>", ...]
    for i in range(1, len(pieces) - 1, 2):
        sha, _, message = pieces[i].partition("\n")
        texts[sha.strip()] = message + "\n" + added_text(pieces[i + 1])
    return texts


def evaluate_push(policy: PushPolicy, updates: Sequence[RefUpdate], repo_dir: Path, scanner: SecretScanner,
                  env: Mapping[str, str] | None = None) -> list[RefDecision]:
    """The push policy: one decision per ref update. Run inside pre-receive (env carries git's quarantine)."""
    commit_findings: dict[str, list[str]] = {}  # commit -> pattern names, shared by refs
    decisions = []
    for update in updates:
        reasons: list[str] = []
        is_branch = update.ref.startswith("refs/heads/")
        is_tag = update.ref.startswith("refs/tags/")
        if is_branch:
            branch = update.ref[len("refs/heads/"):]
            if not policy.branch_allowed(branch):
                allowed = ", ".join(policy.branches) or "none"
                reasons.append(f"branch not allowed (allowed: {allowed})")
        elif is_tag:
            if not policy.tags:
                reasons.append("tags not allowed")
        else:
            reasons.append("ref not allowed (only refs/heads/* and refs/tags/*)")
        if dlp.matching_pattern_names(update.ref):
            reasons.append("the ref name looks like a secret")
        if update.deleted:
            if not policy.delete:
                reasons.append("deletion not allowed")
            decisions.append(RefDecision(update, tuple(reasons)))
            continue
        if not update.created and not policy.force:
            if is_tag:
                reasons.append("moving an existing tag not allowed (force is off)")
            elif not is_ancestor(repo_dir, update.old, update.new, env):
                reasons.append("non-fast-forward update not allowed (force is off)")
        if run_git(["rev-parse", "--verify", "--quiet", f"{update.new}^{{commit}}"], cwd=repo_dir,
                   env=env).returncode != 0:
            reasons.append("does not point to a commit")
            decisions.append(RefDecision(update, tuple(reasons)))
            continue
        try:
            reasons += scan_update(update, repo_dir, scanner, commit_findings, env)
        except dlp.DlpUnavailable as exc:
            reasons.append(f"secret scan unavailable ({exc}); try again later")
        except RuntimeError as exc:
            reasons.append(f"secret scan failed ({exc})")
        decisions.append(RefDecision(update, tuple(reasons)))
    return decisions


def scan_update(update: RefUpdate, repo_dir: Path, scanner: SecretScanner, cache: dict[str, list[str]],
                env: Mapping[str, str] | None) -> list[str]:
    reasons = []
    kind = run_git(["cat-file", "-t", update.new], cwd=repo_dir, env=env).stdout.decode().strip()
    if kind == "tag":
        tag_text = run_git(["cat-file", "tag", update.new], cwd=repo_dir, env=env).stdout.decode("utf-8", "replace")
        patterns = scanner.scan(tag_text)
        if patterns:
            reasons.append(f"secret in tag object {update.new}: {', '.join(patterns)}")
    commits = new_commits(repo_dir, update.new, env)
    unscanned = [c for c in commits if c not in cache]
    for commit, text in commit_texts(repo_dir, unscanned, env).items():
        cache[commit] = scanner.scan(text)
    for commit in commits:
        patterns = cache.get(commit)
        if patterns is None:
            raise RuntimeError(f"commit {commit} could not be read")
        if patterns:
            reasons.append(f"secret in commit {commit}: {', '.join(patterns)}")
    return reasons


def pipelock_scanner(config: GateConfig, environ: Mapping[str, str], pipelock_config: Path) -> dlp.PipelockScanner | None:
    if not config.pipelock_scan_url:
        return None
    return dlp.PipelockScanner(config.pipelock_scan_url, pipelock_scan_token(environ, pipelock_config))
