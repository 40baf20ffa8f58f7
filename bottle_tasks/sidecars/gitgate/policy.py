"""The push policy the pre-receive hook applies: every ref update against the repo's PushPolicy
(branch pattern, tags, deletion, force), and what every new commit adds scanned for secrets
(dlp's built-in patterns, plus pipelock's scan API when configured). Secrets are named by
pattern and commit id, never shown.
"""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from bottle_tasks.contract import PushPolicy
from bottle_tasks.sidecars import dlp, pipelock_scan
from bottle_tasks.sidecars.configfile import pipelock_scan_token
from bottle_tasks.sidecars.gitgate.config import GateConfig
from bottle_tasks.sidecars.gitgate.git import BACKGROUND_GIT_TIMEOUT_S, git_error_line, is_ancestor, is_zero, run_git

_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# What the secret scan reads, so that memory and time stay bounded whatever the push holds (a pack of
# 1 MB can inflate to gigabytes). It reads each commit's text as a stream, a window at a time. An
# object bigger than MAX_SCAN_OBJECT_BYTES (git would hold it whole to diff it), or more than
# MAX_SCAN_BYTES of text in one push, rejects the push: what cannot be scanned is not forwarded.
MAX_SCAN_OBJECT_BYTES = 32 * 1024 * 1024
MAX_SCAN_BYTES = 64 * 1024 * 1024
SCAN_WINDOW_CHARS = 1024 * 1024
SCAN_OVERLAP_CHARS = 4096          # longer than any pattern's match
LINE_PIECE_BYTES = 64 * 1024       # a longer line is read (and scanned) in pieces


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

    def __init__(self, pipelock: pipelock_scan.PipelockClient | None = None):
        self.pipelock = pipelock

    def scan(self, text: str) -> list[str]:
        """Pattern names found in text. Raises pipelock_scan.DlpUnavailable when pipelock cannot give a verdict."""
        found = dlp.matching_pattern_names(text)
        if not found and self.pipelock is not None and text.strip():
            # PipelockClient.scan, also when handed egress's PipelockScanner (whose scan keeps the old shape).
            matches = pipelock_scan.PipelockClient.scan(self.pipelock, dlp.RequestParts("", (), text))
            found = list(dict.fromkeys(match.pattern for match in matches))  # a rule matched twice is named once
        return found


class ScanRefused(Exception):
    """The push is more than the secret scan reads; it is rejected (git-gate forwards nothing it has not scanned)."""


@dataclass
class ScanBudget:
    """How much text one push may make the scan read, in all (its refs share it)."""

    limit: int = MAX_SCAN_BYTES
    spent: int = 0

    def spend(self, n: int) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise ScanRefused(f"the push adds more than {_mib(self.limit)} of text, more than the secret scan "
                              "reads in one push; push it in smaller pieces")


class _Window:
    """The text of one commit, scanned in windows of SCAN_WINDOW_CHARS as it streams in; each window
    starts with the last SCAN_OVERLAP_CHARS of the one before, so a secret across a boundary is seen."""

    def __init__(self, scanner: SecretScanner, budget: ScanBudget):
        self.scanner = scanner
        self.budget = budget
        self.parts: list[str] = []
        self.size = 0
        self.fresh = False  # text arrived since the last scan
        self.found: list[str] = []

    def feed(self, text: str) -> None:
        if not text:
            return
        self.budget.spend(len(text))
        self.parts.append(text)
        self.size += len(text)
        self.fresh = True
        if self.size >= SCAN_WINDOW_CHARS:
            self._scan()

    def _scan(self) -> None:
        text = "".join(self.parts)
        self.found += [name for name in self.scanner.scan(text) if name not in self.found]
        tail = text[-SCAN_OVERLAP_CHARS:]
        self.parts, self.size, self.fresh = [tail], len(tail), False

    def finish(self) -> list[str]:
        if self.fresh:
            self._scan()
        return self.found


def new_commits(repo_dir: Path, new: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Commits reachable from new that no ref of the mirror reaches yet (oldest first)."""
    result = run_git(["rev-list", "--reverse", new, "--not", "--all"], cwd=repo_dir, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"git rev-list failed: {git_error_line(result.stderr)}")
    return result.stdout.decode().split()


class _Git:
    """A git whose stdout is read as a stream; stderr kept (its first 64 KiB); killed if left early
    or when it runs longer than timeout."""

    def __init__(self, args: Sequence[str], repo_dir: Path, env: Mapping[str, str] | None, stdin: Any = None,
                 timeout: float = BACKGROUND_GIT_TIMEOUT_S):
        self.process = subprocess.Popen(["git", *args], cwd=repo_dir, env=dict(env) if env is not None else None,
                                        stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.errors: list[bytes] = []
        self.timeout = timeout
        self.timed_out = False
        self._drain = threading.Thread(target=self._read_errors, daemon=True)
        self._drain.start()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.process.kill()  # its stdout ends, so the reader stops

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        try:
            self.errors.append(self.process.stderr.read(1 << 16))
            self.process.stderr.read()
        except (OSError, ValueError):
            pass

    def lines(self, piece: int) -> Iterator[bytes]:
        """stdout in pieces of at most piece bytes; a longer line comes in several."""
        assert self.process.stdout is not None
        return iter(lambda: self.process.stdout.readline(piece), b"")

    def close(self, what: str) -> None:
        """Wait for a git that was read to the end; RuntimeError when it failed."""
        code = self.process.wait()
        self._drain.join(timeout=5)
        if self.timed_out:
            raise RuntimeError(f"git {what} timed out after {self.timeout:.0f} s")
        if code != 0:
            raise RuntimeError(f"git {what} failed: {git_error_line(b''.join(self.errors))}")

    def __enter__(self) -> "_Git":
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._drain.join(timeout=5)  # stderr ends with the process
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def oversized_objects(repo_dir: Path, new: str, limit: int, env: Mapping[str, str] | None = None,
                      most: int = 5) -> list[str]:
    """The objects new brings (not reachable from any ref of the mirror) larger than limit, as
    ``<type> <id> (<size>, <path>)``: at most ``most`` of them. Streams: no object is read."""
    listing = subprocess.Popen(["git", "rev-list", "--objects", new, "--not", "--all"], cwd=repo_dir,
                               env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    found: list[str] = []
    try:
        with _Git(["cat-file", "--batch-check=%(objectsize) %(objecttype) %(objectname) %(rest)"], repo_dir, env,
                  stdin=listing.stdout) as sizes:
            assert listing.stdout is not None
            listing.stdout.close()  # cat-file holds it now
            for line in sizes.lines(8192):
                size_text, _, rest = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
                if size_text.isdigit() and int(size_text) > limit:
                    kind, _, rest = rest.partition(" ")
                    oid, _, path = rest.partition(" ")
                    found.append(f"{kind} {oid} ({_mib(int(size_text))}{', ' + path if path else ''})")
                    if len(found) >= most:
                        return found
            sizes.close("cat-file")
    finally:
        if listing.poll() is None:
            listing.kill()
        if listing.wait() not in (0, -signal.SIGKILL, -signal.SIGPIPE) and not found:
            raise RuntimeError("git rev-list --objects failed")
    return found


def scan_commits(repo_dir: Path, commits: Sequence[str], scanner: SecretScanner, budget: ScanBudget,
                 env: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """commit id -> the pattern names found in its message plus what its diff adds (combined diff
    for merges; removed and context lines are dropped, the new file names kept). One git log,
    read as a stream: at most a window of each commit's text is in memory at a time."""
    if not commits:
        return {}
    marker = f"\x1egit-gate-{secrets.token_hex(12)}"  # unguessable: content cannot fake a boundary
    found: dict[str, list[str]] = {}
    with _Git(["log", "--no-walk=unsorted", "--stdin", "-p", "--cc", "--text", "--no-color", "--no-ext-diff",
               "--no-textconv", "--find-renames", "--irreversible-delete",
               f"--format=tformat:{marker}%H%n%B{marker}"], repo_dir, env, stdin=subprocess.PIPE) as log:
        assert log.process.stdin is not None
        try:  # git reads every revision before it writes anything
            log.process.stdin.write(("\n".join(commits) + "\n").encode())
        finally:
            log.process.stdin.close()
        sha, window = "", _Window(scanner, budget)
        in_message, columns, keep, line_start = False, 0, False, True
        for raw in log.lines(LINE_PIECE_BYTES):
            piece = raw.decode("utf-8", errors="replace")  # secrets are ASCII
            starts, line_start = line_start, raw.endswith(b"\n")
            if starts and piece.startswith(marker) and piece[len(marker):].strip():  # "<marker><id>": a commit
                if sha:
                    found[sha] = window.finish()
                sha, window = piece[len(marker):].strip(), _Window(scanner, budget)
                in_message, columns, keep = True, 0, False
            elif not sha:
                continue
            elif in_message:
                # A message whose last line has no newline ends in the marker; one split across two
                # pieces is missed, and the commit's whole diff is then scanned: more, never less.
                text, ends, _ = piece.partition(marker)
                window.feed(text)
                in_message = not ends
            elif not starts:
                if keep:
                    window.feed(piece)  # the rest of a long added line
            elif piece.startswith("@@"):
                columns, keep = len(piece) - len(piece.lstrip("@")) - 1, False  # "@@" -> 1 parent, "@@@" -> 2
            elif piece.startswith(("diff --git ", "diff --cc ", "diff --combined ")):
                columns, keep = 0, False
            elif columns == 0:
                keep = piece.startswith("+++ ")  # the new file name
                if keep:
                    window.feed(piece[4:])
            else:
                keep = "+" in piece[:columns]
                if keep:
                    window.feed(piece[columns:])
        if sha:
            found[sha] = window.finish()
        log.close("log")
    return found


def evaluate_push(policy: PushPolicy, updates: Sequence[RefUpdate], repo_dir: Path, scanner: SecretScanner,
                  env: Mapping[str, str] | None = None, budget: ScanBudget | None = None) -> list[RefDecision]:
    """The push policy: one decision per ref update. Run inside pre-receive (env carries git's quarantine)."""
    commit_findings: dict[str, list[str]] = {}  # commit -> pattern names, shared by refs
    budget = budget if budget is not None else ScanBudget()
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
            reasons += scan_update(update, repo_dir, scanner, commit_findings, env, budget)
        except ScanRefused as exc:
            reasons.append(str(exc))
        except pipelock_scan.DlpUnavailable as exc:
            reasons.append(f"secret scan unavailable ({exc}); try again later")
        except RuntimeError as exc:
            reasons.append(f"secret scan failed ({exc})")
        decisions.append(RefDecision(update, tuple(reasons)))
    return decisions


def scan_update(update: RefUpdate, repo_dir: Path, scanner: SecretScanner, cache: dict[str, list[str]],
                env: Mapping[str, str] | None, budget: ScanBudget | None = None) -> list[str]:
    budget = budget if budget is not None else ScanBudget()
    big = oversized_objects(repo_dir, update.new, MAX_SCAN_OBJECT_BYTES, env)
    if big:
        return [f"{what} is larger than the {_mib(MAX_SCAN_OBJECT_BYTES)} the secret scan reads; git-gate forwards "
                "nothing it has not scanned" for what in big]
    reasons = []
    kind = run_git(["cat-file", "-t", update.new], cwd=repo_dir, env=env).stdout.decode().strip()
    if kind == "tag":
        tag_text = run_git(["cat-file", "tag", update.new], cwd=repo_dir, env=env).stdout.decode("utf-8", "replace")
        budget.spend(len(tag_text))
        patterns = scanner.scan(tag_text)
        if patterns:
            reasons.append(f"secret in tag object {update.new}: {', '.join(patterns)}")
    commits = new_commits(repo_dir, update.new, env)
    unscanned = [c for c in commits if c not in cache]
    cache.update(scan_commits(repo_dir, unscanned, scanner, budget, env))
    for commit in commits:
        patterns = cache.get(commit)
        if patterns is None:
            raise RuntimeError(f"commit {commit} could not be read")
        if patterns:
            reasons.append(f"secret in commit {commit}: {', '.join(patterns)}")
    return reasons


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")


def pipelock_scanner(config: GateConfig, environ: Mapping[str, str], pipelock_config: Path) -> pipelock_scan.PipelockClient | None:
    if not config.pipelock_scan_url:
        return None
    return pipelock_scan.PipelockClient(config.pipelock_scan_url, pipelock_scan_token(environ, pipelock_config))
