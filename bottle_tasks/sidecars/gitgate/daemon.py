"""The git-gate daemon: bare mirrors, their refresh from the upstream, and the wiring of the smart
HTTP server (``smart_http``), the hooks (``hooks``), the forwarder (``forwarder``) and the audit log.

- Each repo in git-gate.yaml has a bare mirror ``<mirrors_dir>/<name>.git`` (created when absent).
  The mirrors dir may be shared by several gates (one per bottle of the agent, each in its own
  bundle); what the gates write there is the same from each of them (``shared``): the mirror's
  config and hook scripts, (re)written at start when they differ, under the mirror's lock.
- A guest ``info/refs`` first refreshes the mirror from the upstream (at most every 2 s per repo); a
  background thread also refreshes every ``refresh_seconds``. A refresh takes the mirror's lock, and
  fetches only when no gate has fetched it within the interval. It never prunes, and leaves alone
  the refs any gate has accepted and not forwarded yet.
- Everything else is this gate's own, in ``state_dir``: spools, audit log, git files, known_hosts.
- A push's pack is at most ``max_push_bytes`` (``receive.maxInputSize``, set in the environment of
  this gate's receive-pack, not in the shared mirror); its request body at most that plus BODY_SLACK_BYTES.

Credentials: a token identity reaches git only through the environment of the git child (a tiny
GIT_ASKPASS script prints ``$GIT_GATE_USERNAME`` / ``$GIT_GATE_PASSWORD``); it is never on an argv,
never in the CGI environment the guest's requests run under, and every log line is scrubbed of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
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
from bottle_tasks.sidecars.files import atomic_write
from bottle_tasks.sidecars.gitgate.audit import AuditLog
from bottle_tasks.sidecars.gitgate.config import (
    DEFAULT_CONFIG, DEFAULT_PIPELOCK_CONFIG, DEFAULT_UPSTREAM_CA, GateConfig, GitGateConfigError, load_config,
)
from bottle_tasks.sidecars.gitgate.forwarder import FORWARD_BACKOFF, Forwarder
from bottle_tasks.sidecars.gitgate.git import BACKGROUND_GIT_TIMEOUT_S, git_error_line, run_git
from bottle_tasks.sidecars.gitgate.hooks import HOOKS, MirrorPaths, gate_environment, hook_script, queued_refs
from bottle_tasks.sidecars.gitgate.shared import MirrorLockError, ensure_gate_id, hold_mirror, marked_refs
from bottle_tasks.sidecars.gitgate.smart_http import BODY_SLACK_BYTES, GitCgiServer, HttpLimits
from bottle_tasks.sidecars.scrub import SecretScrubber

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_REFRESH_INTERVAL_S = 2.0  # a guest info/refs refreshes the mirror at most this often
GUEST_REFRESH_TIMEOUT_S = 30.0  # ... and waits at most this long for the upstream (and another gate's fetch)
SETUP_LOCK_TIMEOUT_S = BACKGROUND_GIT_TIMEOUT_S + 60  # a start waits at most this long for another gate's fetch
GATE_FILES_DIR = ".git-gate"  # inside state_dir: askpass, gitconfig, ca-bundle.pem
# The mirror's config, the same from every gate (per-gate settings go in the receive-pack environment).
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
\t# The mirrors live on a host volume owned by the host user; the bundle runs as root.
\tdirectory = *
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


class Gate:
    """Mirrors, refresh, forwarding, audit and the HTTP server for one git-gate.yaml."""

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
        what is this gate's (its hooks' config, its push size limit) rather than the shared mirror's."""
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
        """This gate's files, then each mirror: created when absent, its config and hooks written
        where they differ (under the mirror's lock: another gate may be doing the same)."""
        atomic_write(self.gitconfig, GITCONFIG)
        atomic_write(self.askpass, ASKPASS_SCRIPT, mode=0o755)
        self.ca_bundle = write_ca_bundle(self.upstream_ca, self.files_dir / "ca-bundle.pem")
        self.config.audit_log.parent.mkdir(parents=True, exist_ok=True)
        self.forwarder.gate = ensure_gate_id(self.config.state_dir)
        env = self.base_env()
        for repo in self.config.repos:
            paths = MirrorPaths.of(self.config, repo)
            paths.queue.mkdir(parents=True, exist_ok=True)
            paths.events.mkdir(parents=True, exist_ok=True)
            if self.mirror_changes(repo, paths, env):
                with hold_mirror(self.config.mirrors_dir, repo.name, SETUP_LOCK_TIMEOUT_S):
                    self.write_mirror(repo, paths, env)

    def mirror_changes(self, repo: GitRepo, paths: MirrorPaths, env: Mapping[str, str]) -> bool:
        """Whether the mirror is absent, or its config or hooks are not what every gate writes."""
        if not (paths.root / "HEAD").is_file():
            return True
        for hook in HOOKS:
            try:
                if (paths.hooks / hook).read_text() != hook_script(repo.name, hook):
                    return True
            except (OSError, UnicodeDecodeError):
                return True
        return any(run_git(["config", "--get", key], cwd=paths.root, env=env).stdout.decode().strip() != value
                   for key, value in self.mirror_config(paths))

    def write_mirror(self, repo: GitRepo, paths: MirrorPaths, env: Mapping[str, str]) -> None:
        if not (paths.root / "HEAD").is_file():
            result = run_git(["init", "--bare", "--quiet", str(paths.root)], env=env, timeout=60)
            if result.returncode != 0:
                raise OSError(f"git init --bare {paths.root} failed: {git_error_line(result.stderr)}")
        for hook in HOOKS:
            atomic_write(paths.hooks / hook, hook_script(repo.name, hook), mode=0o755)
        for key, value in self.mirror_config(paths):
            result = run_git(["config", key, value], cwd=paths.root, env=env, timeout=60)
            if result.returncode != 0:
                raise OSError(f"git config {key} in {paths.root} failed: {git_error_line(result.stderr)}")

    @staticmethod
    def mirror_config(paths: MirrorPaths) -> tuple[tuple[str, str], ...]:
        # The hooks' path in the bundle: every bundle mounts the mirrors at the same place.
        return (*MIRROR_CONFIG, ("core.hooksPath", str(paths.hooks)))

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, repo: GitRepo, *, min_interval: float = 0.0, timeout: float = BACKGROUND_GIT_TIMEOUT_S) -> bool:
        """Bring the upstream's branches and tags into the mirror, unless this or another gate has
        within min_interval; waits at most about timeout for the other gates and the upstream."""
        state = self.repo_state[repo.name]
        with state.lock:
            if time.monotonic() - state.last_refresh < min_interval:
                return bool(state.last_ok)
            state.last_refresh = time.monotonic()
            deadline = state.last_refresh + timeout
            try:
                with hold_mirror(self.config.mirrors_dir, repo.name, timeout) as held:
                    if held.fetched_within(min_interval):
                        ok, reason = True, ""  # another gate's fetch serves this one too
                    else:
                        ok, reason = self.fetch(repo, max(1.0, deadline - time.monotonic()))
                        if ok:
                            held.stamp()
            except MirrorLockError as exc:
                ok, reason = False, str(exc)
            if not ok or state.last_ok is not True:
                self.audit.emit({"event": "refresh", "repo": repo.name, "accepted": ok, "reason": reason}, audit=False)
            state.last_ok = ok
            return ok

    def fetch(self, repo: GitRepo, timeout: float) -> tuple[bool, str]:
        """The fetch itself (no prune), leaving alone every ref a gate has accepted and not forwarded."""
        paths = MirrorPaths.of(self.config, repo)
        env = self.upstream_env(repo)
        keep = sorted(ref for ref in self.held_refs(paths, env) if ref.startswith(("refs/heads/", "refs/tags/")))
        # The refs left alone go on stdin: one push of another instance can hold more of them than
        # the system takes as arguments, and a fetch that cannot start fails every gate of the agent.
        result = run_git(["fetch", "--quiet", "--no-write-fetch-head", "--no-auto-gc", "--stdin", "--", repo.url,
                          "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                         cwd=paths.root, env=env, input="".join(f"^{ref}\n" for ref in keep).encode(),
                         timeout=timeout)
        if result.returncode != 0:
            return False, git_error_line(result.stderr)
        self.fix_head(repo, paths, env, timeout)
        return True, ""

    @staticmethod
    def held_refs(paths: MirrorPaths, env: Mapping[str, str]) -> set[str]:
        """This gate's queued refs, and those another gate has marked at the value the mirror has."""
        held = set(queued_refs(paths))
        listing = run_git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags"],
                          cwd=paths.root, env=env).stdout.decode("utf-8", "replace")
        current = dict(line.rsplit(" ", 1) for line in listing.splitlines() if " " in line)
        return held | marked_refs(paths.pending, current)

    def fix_head(self, repo: GitRepo, paths: MirrorPaths, env: Mapping[str, str], timeout: float) -> None:
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

    def refresh_periodically(self) -> None:
        while not self._stop.is_set():
            for repo in self.config.repos:
                if self._stop.is_set():
                    return
                # Half a period: a fetch by any gate of the agent that recent serves this pass too.
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
            (self.config.listen_host, self.config.listen_port), self.config.mirrors_dir,
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
