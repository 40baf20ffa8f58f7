"""The git-gate daemon: the gate's repos, their refresh from the upstream, and the wiring of the smart
HTTP server (``smart_http``), the hooks (``hooks``), the forwarder (``forwarder``) and the audit log.

- Each repo in git-gate.yaml has a bare repo ``<state_dir>/<name>.git`` of this gate's own (created
  when absent): its refs, config and hooks, and the objects its guest pushed. The objects fetched
  from the upstream go to ``<mirrors_dir>/<name>.objects``, shared by the gates of the agent's bottles
  (``shared``), which each gate's repo borrows as an alternate: one download serves every gate.
- A guest ``info/refs`` first refreshes the repo from the upstream (at most every 2 s per repo); a
  background thread also refreshes every ``refresh_seconds``. A refresh takes the objects' lock, so
  gates fetch one at a time and a later one finds the objects there. It never prunes, and leaves
  alone the refs this gate has accepted and not forwarded yet.
- A push's pack is at most ``max_push_bytes`` (``receive.maxInputSize``, set in the environment of
  this gate's receive-pack); its request body at most that plus BODY_SLACK_BYTES.

Credentials: a token identity reaches git only through the environment of the git child (a tiny
GIT_ASKPASS script prints ``$GIT_GATE_USERNAME`` / ``$GIT_GATE_PASSWORD``); it is never on an argv,
never in the CGI environment the guest's requests run under, and every log line is scrubbed of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import bottle_tasks
from bottle_tasks.contract import GitRepo
from bottle_tasks.sidecars import gitgate as gitgate_package
from bottle_tasks.sidecars.configfile import PIPELOCK_TOKEN_ENV
from bottle_tasks.sidecars.daemon import Backoff, install_stop_handlers, wait_for_stop_signal
from bottle_tasks.sidecars.files import atomic_write, open_directory
from bottle_tasks.sidecars.gitgate.audit import AuditLog
from bottle_tasks.sidecars.gitgate.config import (
    DEFAULT_CONFIG, DEFAULT_PIPELOCK_CONFIG, DEFAULT_UPSTREAM_CA, GateConfig, GitGateConfigError, load_config,
)
from bottle_tasks.sidecars.gitgate.forwarder import FORWARD_BACKOFF, Forwarder
from bottle_tasks.sidecars.gitgate.git import BACKGROUND_GIT_TIMEOUT_S, git_error_line, run_git
from bottle_tasks.sidecars.gitgate.hooks import HOOKS, MirrorPaths, gate_environment, hook_script, queued_refs
from bottle_tasks.sidecars.gitgate.shared import hold_mirror
from bottle_tasks.sidecars.gitgate.smart_http import BODY_SLACK_BYTES, GitCgiServer, HttpLimits
from bottle_tasks.sidecars.scrub import SecretScrubber

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_REFRESH_INTERVAL_S = 2.0  # a guest info/refs refreshes the repo at most this often
GUEST_REFRESH_TIMEOUT_S = 30.0  # ... and waits at most this long for the upstream (and another gate's fetch)
SETUP_LOCK_TIMEOUT_S = BACKGROUND_GIT_TIMEOUT_S + 60  # a start waits at most this long for another gate's fetch
GATE_FILES_DIR = ".git-gate"  # inside state_dir: askpass, gitconfig, ca-bundle.pem
# A repo's config (per-push settings go in the receive-pack environment).
MIRROR_CONFIG = (("http.receivepack", "true"), ("receive.fsckObjects", "true"),
                 ("receive.denyNonFastForwards", "false"), ("uploadpack.allowFilter", "true"))
PACKAGE_ROOT = Path(bottle_tasks.__file__).resolve().parent.parent  # on the hooks' PYTHONPATH


ASKPASS_SCRIPT = """#!/bin/sh
# git-gate's GIT_ASKPASS: the credential comes from this process's environment, never from argv.
case "$1" in
  Username*) printf '%s\\n' "$GIT_GATE_USERNAME" ;;
  *) printf '%s\\n' "$GIT_GATE_PASSWORD" ;;
esac
"""

GITCONFIG = """# git-gate's global git config (GIT_CONFIG_GLOBAL for every git it runs).
[safe]
\t# The repos live on a host volume owned by the host user; the bundle runs as root.
\tdirectory = *
[core]
\t# The shared objects dir is every bundle of the agent's to write: take objects from it, nothing else.
\t# No refs of an alternate (git runs for-each-ref in the repo around one named .../objects), and
\t# no commit graph, multi-pack index or bitmap, which git would believe without reading the objects.
\talternateRefsCommand = true
\tcommitGraph = false
\tmultiPackIndex = false
[pack]
\tuseBitmaps = false
[fetch]
\twriteCommitGraph = false
[gc]
\t# A gc with the shared objects dir as its own would prune what other gates' refs need.
\tauto = 0
[maintenance]
\tauto = false
[protocol "ext"]
\tallow = never
[credential]
\thelper =
"""


@dataclass
class _RepoState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_refresh: float = float("-inf")  # monotonic time of the last attempt
    last_ok: bool | None = None


class MissingTokenError(ValueError):
    """A token identity's variable is unset or empty; the message names the variable, never a value."""


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
    return atomic_write(destination, base.rstrip("\n") + "\n" + extra.strip("\n") + "\n")


def ensure_shared_objects(mirrors_dir: Path, name: str) -> Path:
    """<mirrors_dir>/<name>.objects, a plain dir with the layout git needs (under the objects' lock).
    A mirrors dir from before per-gate repos had a whole repo, <name>.git: its objects move here
    (what it held unforwarded is among them), the rest of it, config and hooks, is removed unread."""
    objects = mirrors_dir / f"{name}.objects"
    legacy = mirrors_dir / f"{name}.git"
    if not os.path.lexists(objects) and (legacy / "objects").is_dir() and not (legacy / "objects").is_symlink():
        os.rename(legacy / "objects", objects)
    if os.path.lexists(legacy):
        if legacy.is_dir() and not legacy.is_symlink():
            shutil.rmtree(legacy, ignore_errors=True)
        else:
            legacy.unlink(missing_ok=True)
    for part in ("", "pack", "info"):
        (objects / part).mkdir(parents=True, exist_ok=True)
    try:
        os.close(open_directory(objects))
    except OSError as exc:
        raise OSError(exc.errno, f"{objects}: not a plain directory ({exc.strerror}); git-gate follows no link "
                                 "here: remove it") from None
    return objects


def move_legacy_queue(paths: MirrorPaths) -> None:
    """Before the spools, a repo kept its pushes waiting to be forwarded in git-gate/queue/: move them
    into this gate's spool, so nothing pushed is lost."""
    try:
        names = os.listdir(paths.legacy_queue)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        source = paths.legacy_queue / name
        if name.endswith(".json") and source.is_file() and not source.is_symlink():
            os.replace(source, paths.queue / name)


class Gate:
    """This gate's repos, refresh, forwarding, audit and the HTTP server for one git-gate.yaml."""

    def __init__(self, config: GateConfig, config_path: Path, *, environ: Mapping[str, str] = os.environ,
                 out: TextIO = sys.stdout, python: str = sys.executable,
                 pipelock_config: Path = Path(DEFAULT_PIPELOCK_CONFIG), upstream_ca: Path = Path(DEFAULT_UPSTREAM_CA),
                 backoff: Backoff = FORWARD_BACKOFF):
        missing = [f"repos[{i}].identity.token_env: {r.identity.token_env}"
                   for i, r in enumerate(config.repos)
                   if r.identity.kind == "token" and not environ.get(r.identity.token_env)]
        if missing:
            raise MissingTokenError(f"token variables not set in the bundle environment: {', '.join(missing)}")
        self.config = config
        self.config_path = config_path.resolve()
        self.environ = dict(environ)
        self.python = python
        self.pipelock_config = pipelock_config
        self.upstream_ca = upstream_ca
        self.ca_bundle: Path | None = None  # set by setup() when upstream_ca exists
        self.tokens = {name: environ[name] for name in config.token_envs()}
        self.audit = AuditLog(config.audit_log, out, SecretScrubber.credentials(
            (r.identity.username, self.tokens[r.identity.token_env]) for r in config.repos if r.identity.kind == "token"))
        self.forwarder = Forwarder(config, self.audit, self.upstream_env, backoff)
        self.repo_state = {repo.name: _RepoState() for repo in config.repos}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server: GitCgiServer | None = None

    # -- environments -------------------------------------------------------------------------

    @property
    def files_dir(self) -> Path:
        return self.config.state_dir / GATE_FILES_DIR

    @property
    def gitconfig(self) -> Path:
        return self.files_dir / "gitconfig"

    @property
    def askpass(self) -> Path:
        return self.files_dir / "askpass"

    def base_env(self) -> dict[str, str]:
        """The daemon's environment without any token variable, with git-gate's global git config."""
        env = {k: v for k, v in self.environ.items() if k not in self.tokens and not k.startswith("GIT_")}
        env["GIT_CONFIG_GLOBAL"] = str(self.gitconfig)
        if "GIT_CONFIG_NOSYSTEM" in self.environ:
            env["GIT_CONFIG_NOSYSTEM"] = self.environ["GIT_CONFIG_NOSYSTEM"]
        return env

    def cgi_env(self) -> dict[str, str]:
        """What http-backend, receive-pack and the hooks run with: a whitelist, no token variables, and
        what the hooks need to know of this gate (its config, its push size limit)."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONDONTWRITEBYTECODE", "GIT_CONFIG_NOSYSTEM",
                PIPELOCK_TOKEN_ENV)
        env = {k: self.environ[k] for k in keep if k in self.environ}
        env["GIT_CONFIG_GLOBAL"] = str(self.gitconfig)
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "receive.maxInputSize",
                    "GIT_CONFIG_VALUE_0": str(self.config.max_push_bytes)})
        env.update(gate_environment(self.python, PACKAGE_ROOT, self.config_path, self.pipelock_config))
        return env

    def upstream_env(self, repo: GitRepo) -> dict[str, str]:
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
            known_hosts = self.config.state_dir / "known_hosts"
            env["GIT_SSH_COMMAND"] = " ".join(shlex.quote(part) for part in (
                "ssh", "-i", identity.ssh_key, "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"))
        return env

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """This gate's files, then each repo: its spools, the shared objects dir, and its own repo,
        created when absent, with its config, hooks and alternate written where they differ."""
        atomic_write(self.gitconfig, GITCONFIG)
        atomic_write(self.askpass, ASKPASS_SCRIPT, mode=0o755)
        self.ca_bundle = write_ca_bundle(self.upstream_ca, self.files_dir / "ca-bundle.pem")
        self.config.audit_log.parent.mkdir(parents=True, exist_ok=True)
        env = self.base_env()
        for repo in self.config.repos:
            paths = MirrorPaths.of(self.config, repo)
            paths.queue.mkdir(parents=True, exist_ok=True)
            paths.events.mkdir(parents=True, exist_ok=True)
            with hold_mirror(self.config.mirrors_dir, repo.name, SETUP_LOCK_TIMEOUT_S):
                ensure_shared_objects(self.config.mirrors_dir, repo.name)
            self.ensure_repo(repo, paths, env)
            move_legacy_queue(paths)

    def ensure_repo(self, repo: GitRepo, paths: MirrorPaths, env: Mapping[str, str]) -> None:
        if not (paths.root / "HEAD").is_file():
            result = run_git(["init", "--bare", "--quiet", str(paths.root)], env=env, timeout=60)
            if result.returncode != 0:
                raise OSError(f"git init --bare {paths.root} failed: {git_error_line(result.stderr)}")
        for hook in HOOKS:
            try:
                if (paths.hooks / hook).read_text() == hook_script(repo.name, hook):
                    continue
            except (OSError, UnicodeDecodeError):
                pass
            atomic_write(paths.hooks / hook, hook_script(repo.name, hook), mode=0o755)
        alternates = paths.root / "objects" / "info" / "alternates"
        if not alternates.is_file() or alternates.read_text() != f"{paths.objects}\n":
            atomic_write(alternates, f"{paths.objects}\n")
        for key, value in self.repo_config(paths):
            if run_git(["config", "--get", key], cwd=paths.root, env=env).stdout.decode().strip() == value:
                continue
            result = run_git(["config", key, value], cwd=paths.root, env=env, timeout=60)
            if result.returncode != 0:
                raise OSError(f"git config {key} in {paths.root} failed: {git_error_line(result.stderr)}")

    @staticmethod
    def repo_config(paths: MirrorPaths) -> tuple[tuple[str, str], ...]:
        return (*MIRROR_CONFIG, ("core.hooksPath", str(paths.hooks)))

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, repo: GitRepo, *, min_interval: float = 0.0, timeout: float = BACKGROUND_GIT_TIMEOUT_S) -> bool:
        """Bring the upstream's branches and tags into this gate's repo, unless it did within
        min_interval; waits at most about timeout for the other gates' fetches and the upstream."""
        state = self.repo_state[repo.name]
        with state.lock:
            if time.monotonic() - state.last_refresh < min_interval:
                return bool(state.last_ok)
            state.last_refresh = time.monotonic()
            deadline = state.last_refresh + timeout
            try:
                # One gate fetches at a time: the next finds the objects there and only lists the refs.
                with hold_mirror(self.config.mirrors_dir, repo.name, timeout):
                    ok, reason = self.fetch(repo, max(1.0, deadline - time.monotonic()))
            except OSError as exc:  # the lock refused, git missing, a dir gone: this refresh fails, the next tries
                ok, reason = False, str(exc)
            if not ok or state.last_ok is not True:
                self.audit.emit({"event": "refresh", "repo": repo.name, "accepted": ok, "reason": reason}, audit=False)
            state.last_ok = ok
            return ok

    def fetch(self, repo: GitRepo, timeout: float) -> tuple[bool, str]:
        """The fetch itself (no prune), into the shared objects, leaving alone every ref this gate has
        accepted and not forwarded."""
        paths = MirrorPaths.of(self.config, repo)
        env = self.upstream_env(repo)
        keep = sorted(ref for ref in queued_refs(paths) if ref.startswith(("refs/heads/", "refs/tags/")))
        # New objects go to the shared dir; this repo's own (what its guest pushed) stay readable.
        fetch_env = {**env, "GIT_OBJECT_DIRECTORY": str(paths.objects),
                     "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(paths.root / "objects")}
        # The refs left alone go on stdin: a guest's push can hold more of them than the system takes as arguments.
        result = run_git(["fetch", "--quiet", "--no-write-fetch-head", "--no-auto-gc", "--stdin", "--", repo.url,
                          "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                         cwd=paths.root, env=fetch_env, input="".join(f"^{ref}\n" for ref in keep).encode(),
                         timeout=timeout)
        if result.returncode != 0:
            return False, git_error_line(result.stderr)
        self.fix_head(repo, paths, env, timeout)
        return True, ""

    def fix_head(self, repo: GitRepo, paths: MirrorPaths, env: Mapping[str, str], timeout: float) -> None:
        """Point the repo's HEAD at the upstream's default branch when its current target does not exist."""
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

    def refresh_periodically(self) -> None:
        while not self._stop.is_set():
            for repo in self.config.repos:
                if self._stop.is_set():
                    return
                # Half a period: a guest's refresh that recent serves this pass too.
                self.refresh(repo, min_interval=self.config.refresh_seconds / 2)
            self._stop.wait(self.config.refresh_seconds)

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
            self.audit.relay_spooled(MirrorPaths.of(self.config, repo).events)
        self.forwarder.retry_now()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> GitCgiServer:
        self.setup()
        server = GitCgiServer(
            (self.config.listen_host, self.config.listen_port), self.config.state_dir,
            [repo.name for repo in self.config.repos], self.cgi_env(),
            before=self.before_advertisement, after=self.after_rpc,
            log=lambda record: self.audit.emit(record, audit=False),
            limits=HttpLimits(max_body_bytes=self.config.max_push_bytes + BODY_SLACK_BYTES))
        self.server = server
        host, port = server.server_address[:2]
        self.audit.emit({"event": "start", "listen": f"{host}:{port}",
                         "repos": [repo.name for repo in self.config.repos]}, audit=False)
        for target, name in ((server.serve_forever, "http"), (self.refresh_periodically, "refresh"),
                             (self.forwarder.run, "forward")):
            thread = threading.Thread(target=target, name=f"git-gate-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return server

    def stop(self) -> None:
        self._stop.set()
        self.forwarder.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)


def serve_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.gitgate",
                                     description=(gitgate_package.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help=f"default {DEFAULT_CONFIG}")
    parser.add_argument("--pipelock-config", type=Path, default=Path(DEFAULT_PIPELOCK_CONFIG),
                        help=f"where the scan API token is read (default {DEFAULT_PIPELOCK_CONFIG}; "
                             f"{PIPELOCK_TOKEN_ENV} overrides)")
    parser.add_argument("--upstream-ca", type=Path, default=Path(DEFAULT_UPSTREAM_CA),
                        help=f"extra CAs trusted for upstream TLS when the file exists (default {DEFAULT_UPSTREAM_CA})")
    args = parser.parse_args(list(argv))
    stopped = install_stop_handlers()
    try:
        config = load_config(args.config)
        gate = Gate(config, args.config, pipelock_config=args.pipelock_config, upstream_ca=args.upstream_ca)
        gate.start()
    except (GitGateConfigError, MissingTokenError, OSError) as exc:
        print(f"git-gate: {exc}", file=sys.stderr, flush=True)
        return 2
    wait_for_stop_signal(stopped)
    gate.stop()
    return 0
