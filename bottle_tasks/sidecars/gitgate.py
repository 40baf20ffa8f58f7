"""git-gate: the guest's only git remote. Bare mirrors, a push policy, forwarding with a bundle-side identity.

    python -m bottle_tasks.sidecars.gitgate --config /etc/bottle/git-gate.yaml          # the daemon
    python -m bottle_tasks.sidecars.gitgate pre-receive  --config ... --repo <name>     # run by the hooks
    python -m bottle_tasks.sidecars.gitgate post-receive --config ... --repo <name>

Implements "git-gate" in docs/bundle-contract.md:

- Each repo in git-gate.yaml has a bare mirror ``<mirrors_dir>/<name>.git`` (created and fetched when
  absent). The mirror's ``core.hooksPath`` is ``<name>.git/git-gate/hooks``, rewritten at every start.
- The daemon serves git smart HTTP on ``listen`` by running ``git http-backend`` as CGI, for the
  configured repos only. A guest ``info/refs`` first refreshes the mirror from the upstream (at most
  every 2 s per repo); a background thread also refreshes every ``refresh_seconds``.
- The ``pre-receive`` hook checks every ref update (branch pattern, tags, deletion, force) and scans
  what every new commit adds for secrets (``dlp``'s built-in patterns, plus pipelock's scan API when
  ``pipelock_scan_url`` is set). One failure rejects the whole push, one line per reason on stderr:
  ``git-gate: rejected <ref>: <reason>``. Secrets are named by pattern and commit id, never shown.
- The ``post-receive`` hook queues accepted updates (``<name>.git/git-gate/queue/``, one JSON file per
  ref update); the daemon's forwarder pushes them to the upstream with the repo's identity, per ref in
  order, retrying failures with backoff (capped at 30 s; a new push retries at once).
- Every push decision and every forward attempt is one JSON line in ``audit_log`` and on stdout.
  The hooks cannot reach the daemon's stdout (git relays hook output to the client), so they drop
  push records in ``<name>.git/git-gate/events/`` and the daemon moves them into the audit log.

Credentials: a token identity reaches git only through the environment of the git child (a tiny
GIT_ASKPASS script prints ``$GIT_GATE_USERNAME`` / ``$GIT_GATE_PASSWORD``); it is never on an argv,
never in the CGI environment the guest's requests run under, and every log line is scrubbed of it.
Stdlib + PyYAML only: this runs inside the bundle image (needs the ``git`` and ``openssh-client`` packages).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import re
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence, TextIO


from bottle_tasks.sidecars.configfile import (
    PIPELOCK_TOKEN_ENV, check_http_url, config_failer, list_of, pipelock_scan_token, read_yaml, refuse_duplicates,
    refuse_unknown_keys, top_level_mapping,
)
from bottle_tasks.sidecars import dlp

SUPPORTED_VERSION = 1
DEFAULT_CONFIG = "/etc/bottle/git-gate.yaml"
DEFAULT_PIPELOCK_CONFIG = "/etc/bottle/pipelock.yaml"
DEFAULT_UPSTREAM_CA = "/etc/bottle/upstream-ca.pem"  # extra CAs for upstream TLS, as for egress
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
REMOTE_USER = "agent"
GUEST_REFRESH_INTERVAL_S = 2.0  # a guest info/refs refreshes the mirror at most this often
GUEST_REFRESH_TIMEOUT_S = 30.0  # ... and waits at most this long for the upstream
BACKGROUND_GIT_TIMEOUT_S = 600.0
STATE_DIR = "git-gate"  # inside each <name>.git: hooks/, queue/, events/
SHARED_DIR = ".git-gate"  # inside mirrors_dir: askpass, gitconfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SCP_URL = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:.+$")  # git@host:org/repo.git
_URL_SCHEMES = ("https://", "http://", "ssh://", "file://")
_SERVICE_PATH = re.compile(r"^/([A-Za-z0-9][A-Za-z0-9._-]*)\.git/(info/refs|git-upload-pack|git-receive-pack)$")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


# ---------------------------------------------------------------------------------------------
# configuration


class GitGateConfigError(ValueError):
    """git-gate.yaml is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Identity:
    kind: str  # "token" | "ssh" | "none"
    token_env: str = ""
    username: str = ""
    ssh_key: str = ""


@dataclass(frozen=True)
class PushPolicy:
    branches: tuple[str, ...] = ()  # fnmatch globs on the branch name (refs/heads/ stripped)
    force: bool = False
    delete: bool = False
    tags: bool = False

    def branch_allowed(self, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, glob) for glob in self.branches)


@dataclass(frozen=True)
class RepoConfig:
    name: str
    url: str
    identity: Identity
    push: PushPolicy


@dataclass(frozen=True)
class GateConfig:
    listen_host: str
    listen_port: int
    refresh_seconds: float
    mirrors_dir: Path
    audit_log: Path
    pipelock_scan_url: str
    repos: tuple[RepoConfig, ...]

    def repo(self, name: str) -> RepoConfig | None:
        return next((repo for repo in self.repos if repo.name == name), None)

    def token_envs(self) -> tuple[str, ...]:
        return tuple(sorted({r.identity.token_env for r in self.repos if r.identity.kind == "token"}))


def load_config(path: str | Path) -> GateConfig:
    return parse_config(read_yaml(path, GitGateConfigError, "git-gate config"), source=str(path))


def parse_config(data: Any, *, source: str = "git-gate.yaml") -> GateConfig:
    fail = config_failer(GitGateConfigError, source)
    top_level_mapping(data, fail)
    refuse_unknown_keys(data, {"version", "listen", "refresh_seconds", "mirrors_dir", "audit_log", "pipelock_scan_url",
                       "repos"}, "", fail)
    if data.get("version") != SUPPORTED_VERSION:
        raise fail("version", f"must be {SUPPORTED_VERSION}, got {data.get('version')!r}")
    listen = _string(data, "listen", "listen", fail, required=True)
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise fail("listen", f"must be \"ip:port\", got {listen!r}")
    refresh = data.get("refresh_seconds", 60)
    if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh <= 0:
        raise fail("refresh_seconds", f"must be a positive number, got {refresh!r}")
    mirrors_dir = _string(data, "mirrors_dir", "mirrors_dir", fail, required=True)
    if not mirrors_dir.startswith("/"):
        raise fail("mirrors_dir", f"must be an absolute path, got {mirrors_dir!r}")
    audit_log = _string(data, "audit_log", "audit_log", fail) or str(Path(mirrors_dir) / "audit.jsonl")
    scan_url = check_http_url(_string(data, "pipelock_scan_url", "pipelock_scan_url", fail), "pipelock_scan_url", fail)
    repos = tuple(_repo(item, f"repos[{i}]", fail) for i, item in enumerate(list_of(data, "repos", fail)))
    refuse_duplicates([repo.name for repo in repos], "repos", "name", fail)
    return GateConfig(host, int(port), float(refresh), Path(mirrors_dir), Path(audit_log), scan_url, repos)


def _string(mapping: dict, name: str, key: str, fail: Callable[[str, str], Exception], *,
            required: bool = False) -> str:
    value = mapping.get(name)
    if value is None:
        if required:
            raise fail(key, "is required")
        return ""
    if not isinstance(value, str):
        raise fail(key, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise fail(key, "must not be empty")
    return value


def _bool(mapping: dict, name: str, key: str, fail: Callable[[str, str], Exception]) -> bool:
    value = mapping.get(name, False)
    if not isinstance(value, bool):
        raise fail(key, "must be true or false")
    return value


def _repo(item: Any, key: str, fail: Callable[[str, str], Exception]) -> RepoConfig:
    if not isinstance(item, dict):
        raise fail(key, "must be a mapping with name, url, identity, push")
    refuse_unknown_keys(item, {"name", "url", "identity", "push"}, key + ".", fail)
    name = _string(item, "name", f"{key}.name", fail, required=True)
    if not _NAME.match(name) or name.endswith(".git"):
        raise fail(f"{key}.name", f"must be letters, digits, '.', '_' or '-' (no .git suffix), got {name!r}")
    url = _string(item, "url", f"{key}.url", fail, required=True)
    if not (url.startswith(_URL_SCHEMES) or _SCP_URL.match(url) or url.startswith("/")):
        raise fail(f"{key}.url", f"must be an https://, http://, ssh://, file:// or user@host:path URL, got {url!r}")

    raw_identity = item.get("identity") or {"kind": "none"}
    if not isinstance(raw_identity, dict):
        raise fail(f"{key}.identity", "must be a mapping with kind")
    refuse_unknown_keys(raw_identity, {"kind", "token_env", "username", "ssh_key"}, f"{key}.identity.", fail)
    kind = _string(raw_identity, "kind", f"{key}.identity.kind", fail) or "none"
    if kind not in ("token", "ssh", "none"):
        raise fail(f"{key}.identity.kind", f"must be token, ssh or none, got {kind!r}")
    token_env = _string(raw_identity, "token_env", f"{key}.identity.token_env", fail)
    username = _string(raw_identity, "username", f"{key}.identity.username", fail)
    ssh_key = _string(raw_identity, "ssh_key", f"{key}.identity.ssh_key", fail)
    if kind == "token":
        if not _ENV_NAME.match(token_env):
            raise fail(f"{key}.identity.token_env", f"kind token needs an environment variable name, got {token_env!r}")
        username = username or "x-access-token"
        if "\n" in username:
            raise fail(f"{key}.identity.username", "must be one line")
        identity = Identity("token", token_env=token_env, username=username)
    elif kind == "ssh":
        if not ssh_key.startswith("/"):
            raise fail(f"{key}.identity.ssh_key", f"kind ssh needs the absolute path of a key, got {ssh_key!r}")
        identity = Identity("ssh", ssh_key=ssh_key)
    else:
        identity = Identity("none")

    raw_push = item.get("push") or {}
    if not isinstance(raw_push, dict):
        raise fail(f"{key}.push", "must be a mapping")
    refuse_unknown_keys(raw_push, {"branches", "force", "delete", "tags"}, f"{key}.push.", fail)
    branches = raw_push.get("branches") or []
    if not isinstance(branches, list) or not all(isinstance(b, str) and b for b in branches):
        raise fail(f"{key}.push.branches", "must be a list of non-empty fnmatch globs")
    push = PushPolicy(
        branches=tuple(branches),
        force=_bool(raw_push, "force", f"{key}.push.force", fail),
        delete=_bool(raw_push, "delete", f"{key}.push.delete", fail),
        tags=_bool(raw_push, "tags", f"{key}.push.tags", fail),
    )
    return RepoConfig(name, url, identity, push)


# ---------------------------------------------------------------------------------------------
# layout and git


@dataclass(frozen=True)
class MirrorPaths:
    root: Path  # <mirrors_dir>/<name>.git

    @classmethod
    def of(cls, config: GateConfig, repo: RepoConfig) -> MirrorPaths:
        return cls(config.mirrors_dir / f"{repo.name}.git")

    @property
    def hooks(self) -> Path:
        return self.root / STATE_DIR / "hooks"

    @property
    def queue(self) -> Path:
        return self.root / STATE_DIR / "queue"

    @property
    def events(self) -> Path:
        return self.root / STATE_DIR / "events"


def shared_dir(config: GateConfig) -> Path:
    return config.mirrors_dir / SHARED_DIR


def is_zero(oid: str) -> bool:
    return set(oid) == {"0"}


def run_git(args: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            input: bytes | None = None, timeout: float = BACKGROUND_GIT_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """``git <args>``; on timeout git gets SIGTERM first, so it removes its lock files."""
    process = subprocess.Popen(
        ["git", *args], cwd=cwd, env=dict(env) if env is not None else None,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        err += f"\ngit-gate: git {args[0]} timed out after {timeout:.0f}s".encode()
        return subprocess.CompletedProcess(process.args, 124, out, err)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def is_ancestor(repo_dir: Path, old: str, new: str, env: Mapping[str, str] | None = None) -> bool:
    return run_git(["merge-base", "--is-ancestor", old, new], cwd=repo_dir, env=env).returncode == 0


# ---------------------------------------------------------------------------------------------
# push policy (the pre-receive hook)


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


def builtin_patterns(text: str) -> list[str]:
    """dlp.scan_text's verdict (built-in patterns over text and its percent-decoded forms), with the
    decoded forms computed once rather than once per pattern: diffs can be megabytes."""
    views = dlp.decoded_views(text)
    return [name for name, pattern in dlp.BUILTIN_PATTERNS if any(pattern.search(view) for view in views)]


class SecretScanner:
    """dlp's built-in patterns, then pipelock's scan API when configured. Returns pattern names only."""

    def __init__(self, pipelock: dlp.PipelockScanner | None = None):
        self.pipelock = pipelock

    def scan(self, text: str) -> list[str]:
        """Pattern names found in text. Raises dlp.DlpUnavailable when pipelock cannot give a verdict."""
        found = builtin_patterns(text)
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
        raise RuntimeError(f"git rev-list failed: {first_line(result.stderr)}")
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
        raise RuntimeError(f"git log failed: {first_line(result.stderr)}")
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
        if builtin_patterns(update.ref):
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


# ---------------------------------------------------------------------------------------------
# spool directories: the hooks write, the daemon reads


def write_spool(directory: Path, record: Mapping[str, Any]) -> Path:
    """One JSON file, named so that names sort in write order; readers never see half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
    temporary = directory / f".{name}.tmp"
    temporary.write_text(json.dumps(record) + "\n")
    os.replace(temporary, directory / name)
    return directory / name


def read_spool(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".json") and not name.startswith("."))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        try:
            entries.append((directory / name, json.loads((directory / name).read_text())))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
    return entries


def pending_refs(paths: MirrorPaths) -> set[str]:
    return {str(entry.get("ref")) for _path, entry in read_spool(paths.queue)}


# ---------------------------------------------------------------------------------------------
# hook entry points


def pipelock_scanner(config: GateConfig, environ: Mapping[str, str], pipelock_config: Path) -> dlp.PipelockScanner | None:
    if not config.pipelock_scan_url:
        return None
    return dlp.PipelockScanner(config.pipelock_scan_url, pipelock_scan_token(environ, pipelock_config))


def hook_pre_receive(config: GateConfig, repo: RepoConfig, stdin: str, stderr: TextIO, *,
                     environ: Mapping[str, str] = os.environ,
                     pipelock_config: Path = Path(DEFAULT_PIPELOCK_CONFIG)) -> int:
    paths = MirrorPaths.of(config, repo)
    updates = parse_ref_updates(stdin)
    scanner = SecretScanner(pipelock_scanner(config, environ, pipelock_config))
    decisions = evaluate_push(repo.push, updates, paths.root, scanner, environ)
    rejected = [d for d in decisions if not d.accepted]
    for decision in rejected:
        for reason in decision.reasons:
            stderr.write(f"git-gate: rejected {decision.update.ref}: {reason}\n")
    stderr.flush()
    reasons = [f"{d.update.ref}: {reason}" for d in rejected for reason in d.reasons]
    write_spool(paths.events, {
        "ts": round(time.time(), 3), "event": "push", "repo": repo.name,
        "refs": [{**d.update.as_record(), "reasons": list(d.reasons)} for d in decisions],
        "accepted": not rejected, "reason": "; ".join(reasons),
    })
    return 1 if rejected else 0


def hook_post_receive(config: GateConfig, repo: RepoConfig, stdin: str, stderr: TextIO, *,
                      environ: Mapping[str, str] = os.environ) -> int:
    paths = MirrorPaths.of(config, repo)
    for update in parse_ref_updates(stdin):
        rewrite = (not update.created and not update.deleted
                   and (update.ref.startswith("refs/tags/") or not is_ancestor(paths.root, update.old, update.new, environ)))
        write_spool(paths.queue, {**update.as_record(), "force": rewrite, "queued_at": round(time.time(), 3)})
        stderr.write(f"git-gate: accepted {update.ref}; forwarding it to the upstream\n")
    stderr.flush()
    return 0


def hook_main(argv: Sequence[str]) -> int:
    hook = argv[0]
    parser = argparse.ArgumentParser(prog=f"python -m bottle_tasks.sidecars.gitgate {hook}")
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    parser.add_argument("--repo", required=True)
    parser.add_argument("--pipelock-config", type=Path, default=Path(DEFAULT_PIPELOCK_CONFIG))
    args = parser.parse_args(list(argv[1:]))
    try:
        config = load_config(args.config)
        repo = config.repo(args.repo)
        if repo is None:
            raise GitGateConfigError(f"{args.config}: repos: no repo named {args.repo!r}")
        stdin = sys.stdin.read()
        if hook == "pre-receive":
            return hook_pre_receive(config, repo, stdin, sys.stderr, pipelock_config=args.pipelock_config)
        return hook_post_receive(config, repo, stdin, sys.stderr)
    except Exception as exc:  # fail closed, and never with a traceback that could quote content
        sys.stderr.write(f"git-gate: {hook} failed ({type(exc).__name__}: {dlp.redact(str(exc))[:300]}); "
                         f"{'push rejected' if hook == 'pre-receive' else 'the push is in the mirror but not queued'}\n")
        return 1


def hook_script(python: str, package_root: Path, config_path: Path, repo: str, hook: str,
                pipelock_config: Path) -> str:
    q = shlex.quote
    return (
        "#!/bin/sh\n"
        "# Written by git-gate at every start (bottle_tasks/sidecars/gitgate.py); edits are lost.\n"
        f"PYTHONPATH={q(str(package_root))}; export PYTHONPATH\n"
        f"exec {q(python)} -m bottle_tasks.sidecars.gitgate {hook} --config {q(str(config_path))} "
        f"--repo {q(repo)} --pipelock-config {q(str(pipelock_config))}\n"
    )


ASKPASS_SCRIPT = """#!/bin/sh
# git-gate's GIT_ASKPASS: the credential comes from this process's environment, never from argv.
case "$1" in
  Username*) printf '%s\\n' "$GIT_GATE_USERNAME" ;;
  *) printf '%s\\n' "$GIT_GATE_PASSWORD" ;;
esac
"""

GITCONFIG = """# git-gate's global git config (GIT_CONFIG_GLOBAL for every git it runs).
[safe]
\t# The mirrors live on a host volume owned by the host user; the bundle runs as root.
\tdirectory = *
[protocol "ext"]
\tallow = never
[credential]
\thelper =
"""


# ---------------------------------------------------------------------------------------------
# logging


class Scrubber:
    """Replaces token values (raw, and as base64 user:token) and URL user info in log text."""

    def __init__(self, identities: Iterable[tuple[str, str]]):  # (username, token)
        needles: set[str] = set()
        for username, token in identities:
            if not token:
                continue
            needles.add(token)
            for plain in (f"{username}:{token}", f":{token}"):
                needles.add(base64.b64encode(plain.encode()).decode().rstrip("="))
        self.needles = tuple(sorted(needles, key=len, reverse=True))

    def text(self, value: str) -> str:
        for needle in self.needles:
            value = value.replace(needle, "[REDACTED]")
        return _USERINFO.sub("[REDACTED]@", value)


class AuditLog:
    """One JSON line per record: appended to the audit file (when audit=True) and printed on stdout."""

    def __init__(self, path: Path | None, out: TextIO, scrubber: Scrubber):
        self.path = path
        self.out = out
        self.scrubber = scrubber
        self._lock = threading.Lock()

    def emit(self, record: Mapping[str, Any], *, audit: bool = True) -> None:
        record = {"ts": round(time.time(), 3), **record}
        # Token values, then anything that looks like a secret (a ref name can carry one).
        line = dlp.redact(self.scrubber.text(json.dumps(record, ensure_ascii=True)))
        with self._lock:
            if audit and self.path is not None:
                try:
                    with open(self.path, "a", encoding="utf-8") as audit_file:
                        audit_file.write(line + "\n")
                except OSError as exc:
                    self.out.write(json.dumps({"event": "error", "reason": f"cannot write audit log: {exc}"}) + "\n")
            self.out.write(line + "\n")
            self.out.flush()


def first_line(stderr: bytes | str) -> str:
    """The most telling line of git's stderr: the first fatal/error/rejection, else the first line."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:", "!", "remote: error", "git-gate:")):
            return line[:300]
    return lines[0][:300] if lines else ""


# ---------------------------------------------------------------------------------------------
# smart HTTP: git http-backend as CGI


class GitCgiServer(ThreadingHTTPServer):
    """Serves ``/<name>.git/{info/refs,git-upload-pack,git-receive-pack}`` for the named repos only.

    ``before(repo, service)`` runs before an ``info/refs`` advertisement (git-gate refreshes there);
    ``after(repo, service)`` after each RPC. Subclasses may override ``authorize``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], project_root: Path, repo_names: Iterable[str],
                 cgi_env: Mapping[str, str], *, before: Callable[[str, str], None] | None = None,
                 after: Callable[[str, str], None] | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None):
        self.project_root = project_root
        self.repo_names = frozenset(repo_names)
        self.cgi_env = dict(cgi_env)
        self.before = before
        self.after = after
        self.log = log
        super().__init__(address, GitCgiHandler)

    def authorize(self, handler: GitCgiHandler) -> bool:
        """True to serve the request; otherwise send a response yourself and return False."""
        return True


class GitCgiHandler(BaseHTTPRequestHandler):
    server: GitCgiServer
    server_version = "git-gate"
    protocol_version = "HTTP/1.0"  # one request per connection: the response body streams until close

    def do_GET(self) -> None:
        self.handle_git()

    def do_POST(self) -> None:
        self.handle_git()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged as JSON by handle_git

    def plain(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_git(self) -> None:
        path, _, query = self.path.partition("?")
        match = _SERVICE_PATH.match(path)
        if not match or match[1] not in self.server.repo_names:
            self.plain(404, "git-gate: no such repository")
            return
        repo, what = match[1], match[2]
        if what == "info/refs":
            service = dict(part.partition("=")[::2] for part in query.split("&") if part).get("service", "")
            if self.command != "GET" or service not in ("git-upload-pack", "git-receive-pack"):
                self.plain(403, "git-gate: only the smart HTTP protocol is served")
                return
        else:
            service = what
            if self.command != "POST":
                self.plain(405, "git-gate: POST only")
                return
        if not self.server.authorize(self):
            return
        if what == "info/refs" and self.server.before is not None:
            self.server.before(repo, service)
        status = self.run_cgi(path, query)
        if what != "info/refs" and self.server.after is not None:
            self.server.after(repo, service)
        if self.server.log is not None:
            self.server.log({"event": "http", "repo": repo, "method": self.command, "service": service,
                             "advertisement": what == "info/refs", "status": status,
                             "gzip": self.headers.get("Content-Encoding", "") in ("gzip", "x-gzip"),
                             "chunked": self.headers.get("Transfer-Encoding", "").lower() == "chunked"})

    def cgi_environment(self, path: str, query: str) -> dict[str, str]:
        env = dict(self.server.cgi_env)
        env.update({
            "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": "git-gate", "REQUEST_METHOD": self.command,
            "PATH_INFO": path, "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0], "REMOTE_USER": REMOTE_USER,
            "GIT_PROJECT_ROOT": str(self.server.project_root), "GIT_HTTP_EXPORT_ALL": "1",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        })
        if self.headers.get("Content-Length"):
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        for name, value in self.headers.items():
            lowered = name.lower()
            if lowered in ("authorization", "proxy-authorization", "cookie", "content-type", "content-length"):
                continue
            # HTTP_CONTENT_ENCODING (gzip request bodies) and HTTP_GIT_PROTOCOL (v2) are read by http-backend.
            env["HTTP_" + re.sub(r"[^A-Z0-9]", "_", name.upper())] = value
        return env

    def request_body(self) -> Iterable[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    return
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 65536))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(8)  # CRLF after the chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def run_cgi(self, path: str, query: str) -> int:
        process = subprocess.Popen(["git", "http-backend"], env=self.cgi_environment(path, query),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdin and process.stdout and process.stderr
        errors: list[bytes] = []

        def feed(stdin: IO[bytes]) -> None:
            try:
                for chunk in self.request_body():
                    stdin.write(chunk)
            except (OSError, ValueError):
                pass
            finally:
                try:
                    stdin.close()
                except OSError:
                    pass

        def drain(stderr: IO[bytes]) -> None:
            errors.append(stderr.read(1 << 16))
            stderr.read()

        feeder = threading.Thread(target=feed, args=(process.stdin,), daemon=True)
        drainer = threading.Thread(target=drain, args=(process.stderr,), daemon=True)
        feeder.start()
        drainer.start()
        status, sent = 502, False
        try:
            status, reason, headers = self.cgi_headers(process.stdout)
            sent = True
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            while True:
                chunk = process.stdout.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
            self.wfile.flush()
        except (OSError, ValueError):
            process.kill()  # the client went away, or http-backend broke its output
            if not sent:
                try:
                    self.plain(502, "git-gate: git http-backend failed")
                except OSError:
                    pass
        finally:
            process.stdout.close()
            process.wait()
            feeder.join(timeout=5)
            drainer.join(timeout=5)
        message = b"".join(errors).decode("utf-8", "replace").strip()
        if message and self.server.log is not None:
            self.server.log({"event": "http-backend", "status": status, "reason": first_line(message)})
        return status

    @staticmethod
    def cgi_headers(stdout: IO[bytes]) -> tuple[int, str, list[tuple[str, str]]]:
        status, reason, headers = 200, "OK", []
        while True:
            line = stdout.readline(65536)
            if not line:
                raise ValueError("http-backend ended before its headers")
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                return status, reason, headers
            name, _, value = text.partition(":")
            value = value.strip()
            if name.lower() == "status":
                code, _, reason = value.partition(" ")
                status = int(code)
            else:
                headers.append((name, value))


# ---------------------------------------------------------------------------------------------
# the daemon


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.initial_s * 2 ** max(0, failures - 1))


@dataclass
class _RefRetry:
    failures: int = 0
    due: float = 0.0


@dataclass
class _RepoState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_refresh: float = float("-inf")  # monotonic time of the last attempt
    last_ok: bool | None = None


class MissingToken(ValueError):
    pass


def write_ca_bundle(upstream_ca: Path, destination: Path) -> Path | None:
    """System CAs plus upstream_ca in one file for GIT_SSL_CAINFO (which replaces, not extends, the
    default store); None when there is no upstream_ca, so git keeps its default."""
    try:
        extra = upstream_ca.read_text()
    except OSError:
        return None
    if "-----BEGIN CERTIFICATE-----" not in extra:
        return None
    system = ssl.get_default_verify_paths().cafile or SYSTEM_CA_BUNDLE
    try:
        base = Path(system).read_text()
    except OSError:
        base = ""
    destination.write_text(base.rstrip("\n") + "\n" + extra.strip("\n") + "\n")
    return destination


class Gate:
    """Mirrors, refresh, forwarding, audit and the HTTP server for one git-gate.yaml."""

    def __init__(self, config: GateConfig, config_path: Path, *, environ: Mapping[str, str] = os.environ,
                 out: TextIO = sys.stdout, python: str = sys.executable,
                 pipelock_config: Path = Path(DEFAULT_PIPELOCK_CONFIG), upstream_ca: Path = Path(DEFAULT_UPSTREAM_CA),
                 backoff: Backoff = Backoff()):
        missing = [f"repos[{i}].identity.token_env: {r.identity.token_env}"
                   for i, r in enumerate(config.repos)
                   if r.identity.kind == "token" and not environ.get(r.identity.token_env)]
        if missing:
            raise MissingToken(f"token variables not set in the bundle environment: {', '.join(missing)}")
        self.config = config
        self.config_path = config_path.resolve()
        self.environ = dict(environ)
        self.python = python
        self.pipelock_config = pipelock_config
        self.upstream_ca = upstream_ca
        self.ca_bundle: Path | None = None  # set by setup() when upstream_ca exists
        self.backoff = backoff
        self.tokens = {name: environ[name] for name in config.token_envs()}
        self.audit = AuditLog(config.audit_log, out, Scrubber(
            (r.identity.username, self.tokens[r.identity.token_env]) for r in config.repos if r.identity.kind == "token"))
        self.repo_state = {repo.name: _RepoState() for repo in config.repos}
        self.retries: dict[tuple[str, str], _RefRetry] = {}
        self._wake = threading.Event()
        self._retry_now = threading.Event()
        self._stop = threading.Event()
        self._drain_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.server: GitCgiServer | None = None

    # -- environments -------------------------------------------------------------------------

    @property
    def gitconfig(self) -> Path:
        return shared_dir(self.config) / "gitconfig"

    @property
    def askpass(self) -> Path:
        return shared_dir(self.config) / "askpass"

    def base_env(self) -> dict[str, str]:
        """The daemon's environment without any token variable, with git-gate's global git config."""
        env = {k: v for k, v in self.environ.items() if k not in self.tokens and not k.startswith("GIT_")}
        env["GIT_CONFIG_GLOBAL"] = str(self.gitconfig)
        if "GIT_CONFIG_NOSYSTEM" in self.environ:
            env["GIT_CONFIG_NOSYSTEM"] = self.environ["GIT_CONFIG_NOSYSTEM"]
        return env

    def cgi_env(self) -> dict[str, str]:
        """What http-backend, receive-pack and the hooks run with: a whitelist, no token variables."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONDONTWRITEBYTECODE", "GIT_CONFIG_NOSYSTEM",
                PIPELOCK_TOKEN_ENV)
        env = {k: self.environ[k] for k in keep if k in self.environ}
        env["GIT_CONFIG_GLOBAL"] = str(self.gitconfig)
        return env

    def upstream_env(self, repo: RepoConfig) -> dict[str, str]:
        """Environment for a git that talks to the upstream: the repo's identity, no prompts, no helpers."""
        env = self.base_env()
        env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_HTTP_LOW_SPEED_LIMIT": "1000", "GIT_HTTP_LOW_SPEED_TIME": "60"})
        env.pop("SSH_ASKPASS", None)
        if self.ca_bundle is not None:
            env["GIT_SSL_CAINFO"] = str(self.ca_bundle)
        identity = repo.identity
        if identity.kind == "token":
            env.update({"GIT_ASKPASS": str(self.askpass), "GIT_GATE_USERNAME": identity.username,
                        "GIT_GATE_PASSWORD": self.tokens[identity.token_env]})
        elif identity.kind == "ssh":
            known_hosts = self.config.mirrors_dir / "known_hosts"
            env["GIT_SSH_COMMAND"] = " ".join(shlex.quote(part) for part in (
                "ssh", "-i", identity.ssh_key, "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"))
        return env

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Shared files, then each mirror: created when absent, config and hooks (re)written."""
        shared = shared_dir(self.config)
        shared.mkdir(parents=True, exist_ok=True)
        self.gitconfig.write_text(GITCONFIG)
        self.askpass.write_text(ASKPASS_SCRIPT)
        self.askpass.chmod(0o755)
        self.ca_bundle = write_ca_bundle(self.upstream_ca, shared / "ca-bundle.pem")
        self.config.audit_log.parent.mkdir(parents=True, exist_ok=True)
        package_root = Path(__file__).resolve().parents[2]
        env = self.base_env()
        for repo in self.config.repos:
            paths = MirrorPaths.of(self.config, repo)
            if not (paths.root / "HEAD").is_file():
                result = run_git(["init", "--bare", "--quiet", str(paths.root)], env=env, timeout=60)
                if result.returncode != 0:
                    raise OSError(f"git init --bare {paths.root} failed: {first_line(result.stderr)}")
            paths.hooks.mkdir(parents=True, exist_ok=True)
            paths.queue.mkdir(parents=True, exist_ok=True)
            paths.events.mkdir(parents=True, exist_ok=True)
            for hook in ("pre-receive", "post-receive"):
                script = paths.hooks / hook
                script.write_text(hook_script(self.python, package_root, self.config_path, repo.name, hook,
                                              self.pipelock_config))
                script.chmod(0o755)
            for key, value in (("http.receivepack", "true"), ("core.hooksPath", str(paths.hooks)),
                               ("receive.fsckObjects", "true"), ("receive.denyNonFastForwards", "false"),
                               ("uploadpack.allowFilter", "true")):
                result = run_git(["config", key, value], cwd=paths.root, env=env, timeout=60)
                if result.returncode != 0:
                    raise OSError(f"git config {key} in {paths.root} failed: {first_line(result.stderr)}")

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, repo: RepoConfig, *, min_interval: float = 0.0, timeout: float = BACKGROUND_GIT_TIMEOUT_S) -> bool:
        """Fetch the upstream's branches and tags into the mirror (no prune; refs awaiting forward are kept)."""
        state = self.repo_state[repo.name]
        with state.lock:
            if time.monotonic() - state.last_refresh < min_interval:
                return bool(state.last_ok)
            state.last_refresh = time.monotonic()
            paths = MirrorPaths.of(self.config, repo)
            keep = sorted(ref for ref in pending_refs(paths) if ref.startswith(("refs/heads/", "refs/tags/")))
            env = self.upstream_env(repo)
            result = run_git(["fetch", "--quiet", "--no-write-fetch-head", "--no-auto-gc", "--", repo.url,
                              "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", *(f"^{ref}" for ref in keep)],
                             cwd=paths.root, env=env, timeout=timeout)
            ok = result.returncode == 0
            if ok:
                self.fix_head(repo, paths, env, timeout)
            if not ok or state.last_ok is not True:
                self.audit.emit({"event": "refresh", "repo": repo.name, "accepted": ok,
                                 "reason": "" if ok else first_line(result.stderr)}, audit=False)
            state.last_ok = ok
            return ok

    def fix_head(self, repo: RepoConfig, paths: MirrorPaths, env: Mapping[str, str], timeout: float) -> None:
        """Point the mirror's HEAD at the upstream's default branch when its current target does not exist."""
        head = run_git(["symbolic-ref", "--quiet", "HEAD"], cwd=paths.root, env=env).stdout.decode().strip()
        if head and run_git(["rev-parse", "--verify", "--quiet", head], cwd=paths.root, env=env).returncode == 0:
            return
        result = run_git(["ls-remote", "--symref", "--", repo.url, "HEAD"], cwd=paths.root, env=env, timeout=timeout)
        for line in result.stdout.decode().splitlines():
            if line.startswith("ref: ") and line.endswith("\tHEAD"):
                target = line[len("ref: "):-len("\tHEAD")]
                if target.startswith("refs/heads/"):
                    run_git(["symbolic-ref", "HEAD", target], cwd=paths.root, env=env)
                return

    def refresher(self) -> None:
        while not self._stop.is_set():
            for repo in self.config.repos:
                if self._stop.is_set():
                    return
                self.refresh(repo, min_interval=GUEST_REFRESH_INTERVAL_S)
            self._stop.wait(self.config.refresh_seconds)

    # -- forwarding ---------------------------------------------------------------------------

    def forward(self, repo: RepoConfig, entry: Mapping[str, Any], attempt: int) -> bool:
        ref, new = str(entry["ref"]), str(entry["new"])
        deleting = is_zero(new)
        if deleting:
            refspec = f":{ref}"
        else:
            refspec = f"{'+' if entry.get('force') and repo.push.force else ''}{new}:{ref}"
        paths = MirrorPaths.of(self.config, repo)
        result = run_git(["push", "--quiet", "--no-verify", "--porcelain", "--", repo.url, refspec],
                         cwd=paths.root, env=self.upstream_env(repo))
        ok = result.returncode == 0
        reason = ""
        if not ok:
            reason = first_line(result.stderr) or first_line(result.stdout) or f"git push exited {result.returncode}"
        self.audit.emit({"event": "forward", "repo": repo.name,
                         "refs": [{"ref": ref, "old": str(entry.get("old", "")), "new": new}],
                         "accepted": ok, "result": "ok" if ok else "failed", "reason": reason, "attempt": attempt,
                         "force": refspec.startswith("+")})
        return ok

    def forward_pending(self) -> float:
        """One pass over every queue: the oldest entry of each ref whose retry is due. Returns seconds to wait."""
        if self._retry_now.is_set():
            self._retry_now.clear()
            for retry in self.retries.values():
                retry.due = 0.0
        wait = 5.0  # also picks up entries a hook queued without a request finishing here
        for repo in self.config.repos:
            paths = MirrorPaths.of(self.config, repo)
            self.drain_events(repo)
            done: set[str] = set()
            for path, entry in read_spool(paths.queue):
                ref = str(entry.get("ref"))
                if ref in done:
                    continue  # per ref in order: a later entry waits for the one before it
                retry = self.retries.setdefault((repo.name, ref), _RefRetry())
                now = time.monotonic()
                if retry.due > now:
                    wait = min(wait, retry.due - now)
                    done.add(ref)
                    continue
                if self.forward(repo, entry, retry.failures + 1):
                    path.unlink(missing_ok=True)
                    self.retries.pop((repo.name, ref), None)
                else:
                    retry.failures += 1
                    retry.due = time.monotonic() + self.backoff.delay(retry.failures)
                    wait = min(wait, self.backoff.delay(retry.failures))
                    done.add(ref)
                if self._stop.is_set():
                    return 0.0
        return wait

    def forwarder(self) -> None:
        while not self._stop.is_set():
            wait = self.forward_pending()
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def drain_events(self, repo: RepoConfig) -> None:
        """Move the push records the hooks spooled into the audit log (and stdout)."""
        with self._drain_lock:
            for path, record in read_spool(MirrorPaths.of(self.config, repo).events):
                self.audit.emit(record)  # keeps the hook's own "ts": when the push was decided
                path.unlink(missing_ok=True)

    # -- HTTP hooks ---------------------------------------------------------------------------

    def before_advertisement(self, repo_name: str, service: str) -> None:
        repo = self.config.repo(repo_name)
        if repo is not None:
            self.refresh(repo, min_interval=GUEST_REFRESH_INTERVAL_S, timeout=GUEST_REFRESH_TIMEOUT_S)

    def after_rpc(self, repo_name: str, service: str) -> None:
        if service != "git-receive-pack":
            return
        repo = self.config.repo(repo_name)
        if repo is not None:
            self.drain_events(repo)
        self._retry_now.set()  # a new push: retry every failed forward now
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> GitCgiServer:
        self.setup()
        server = GitCgiServer(
            (self.config.listen_host, self.config.listen_port), self.config.mirrors_dir,
            [repo.name for repo in self.config.repos], self.cgi_env(),
            before=self.before_advertisement, after=self.after_rpc,
            log=lambda record: self.audit.emit(record, audit=False))
        self.server = server
        host, port = server.server_address[:2]
        self.audit.emit({"event": "start", "listen": f"{host}:{port}",
                         "repos": [repo.name for repo in self.config.repos]}, audit=False)
        for target, name in ((server.serve_forever, "http"), (self.refresher, "refresh"), (self.forwarder, "forward")):
            thread = threading.Thread(target=target, name=f"git-gate-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return server

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)


def serve_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.gitgate",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help=f"default {DEFAULT_CONFIG}")
    parser.add_argument("--pipelock-config", type=Path, default=Path(DEFAULT_PIPELOCK_CONFIG),
                        help=f"where the scan API token is read (default {DEFAULT_PIPELOCK_CONFIG}; "
                             f"{PIPELOCK_TOKEN_ENV} overrides)")
    parser.add_argument("--upstream-ca", type=Path, default=Path(DEFAULT_UPSTREAM_CA),
                        help=f"extra CAs trusted for upstream TLS when the file exists (default {DEFAULT_UPSTREAM_CA})")
    args = parser.parse_args(list(argv))
    try:
        config = load_config(args.config)
        gate = Gate(config, args.config, pipelock_config=args.pipelock_config, upstream_ca=args.upstream_ca)
        gate.start()
    except (GitGateConfigError, MissingToken, OSError) as exc:
        print(f"git-gate: {exc}", file=sys.stderr, flush=True)
        return 2
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(1.0):
        pass
    gate.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("pre-receive", "post-receive"):
        return hook_main(argv)
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
