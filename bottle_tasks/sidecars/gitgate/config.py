"""git-gate.yaml (shape in docs/bundle-contract.md, "git-gate") parsed into contract.GitRepo.

``mirrors_dir`` holds the objects fetched from the upstreams, shared by every gate (bundle) of an agent's bottles;
``state_dir`` is this gate's own: audit log, hook spools, git files, known_hosts. The two must not
overlap. Every error names the file and the key, so a bad render is obvious from the bundle log.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bottle_tasks.contract import DEFAULT_MAX_PUSH_BYTES, GitIdentity, GitRepo, PushPolicy
from bottle_tasks.sidecars.configfile import (
    ENV_NAME, bool_value, check_http_url, config_failer, list_of, listen_address, nested_mapping, read_yaml,
    refuse_duplicates, string_list, string_value, versioned_document,
)
from bottle_tasks.sidecars.supervise_store import MAX_TIMEOUT_S, MIN_TIMEOUT_S

SUPPORTED_VERSION = 1
DEFAULT_CONFIG = "/etc/bottle/git-gate.yaml"
DEFAULT_PIPELOCK_CONFIG = "/etc/bottle/pipelock.yaml"
DEFAULT_UPSTREAM_CA = "/etc/bottle/upstream-ca.pem"  # extra CAs for upstream TLS, as for egress

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_NAMESPACE_ROOT = re.compile(r"^(?:[A-Za-z0-9._-]+/)+$")  # "bottle/<agent>/": whole components, each ending in /
_SCP_URL = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:.+$")  # git@host:org/repo.git
_URL_SCHEMES = ("https://", "http://", "ssh://", "file://")

Fail = Callable[[str, str], Exception]


class GitGateConfigError(ValueError):
    """git-gate.yaml is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class SuperviseLink:
    """Where pushes that need a human wait: the supervise state dir (the queue doit approve reads)."""
    state_dir: Path
    timeout_seconds: int  # no decision by then means deny


@dataclass(frozen=True)
class GateConfig:
    listen_host: str
    listen_port: int
    refresh_seconds: float
    mirrors_dir: Path       # the fetched objects <name>.objects, shared by every gate of the agent
    state_dir: Path         # this gate's own: spools, git files, known_hosts, (by default) the audit log
    audit_log: Path
    pipelock_scan_url: str
    repos: tuple[GitRepo, ...]
    max_push_bytes: int = DEFAULT_MAX_PUSH_BYTES  # receive.maxInputSize of every repo
    supervise: SuperviseLink | None = None        # None: no push waits for a human

    def repo(self, name: str) -> GitRepo | None:
        return next((repo for repo in self.repos if repo.name == name), None)

    def token_envs(self) -> tuple[str, ...]:
        return tuple(sorted({r.identity.token_env for r in self.repos if r.identity.kind == "token"}))


def load_config(path: str | Path) -> GateConfig:
    return parse_config(read_yaml(path, GitGateConfigError, "git-gate config"), source=str(path))


def parse_config(data: Any, *, source: str = "git-gate.yaml") -> GateConfig:
    fail = config_failer(GitGateConfigError, source)
    versioned_document(data, {"listen", "refresh_seconds", "mirrors_dir", "state_dir", "audit_log",
                              "pipelock_scan_url", "repos", "max_push_bytes", "supervise"}, SUPPORTED_VERSION, fail)
    host, port = listen_address(string_value(data, "listen", "listen", fail, required=True), "listen", fail)
    refresh = data.get("refresh_seconds", 60)
    if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh <= 0:
        raise fail("refresh_seconds", f"must be a positive number, got {refresh!r}")
    mirrors_dir = _absolute_dir(data, "mirrors_dir", fail)
    state_dir = _absolute_dir(data, "state_dir", fail)
    if state_dir == mirrors_dir or mirrors_dir in state_dir.parents or state_dir in mirrors_dir.parents:
        raise fail("state_dir", f"must be apart from mirrors_dir ({mirrors_dir}), got {str(state_dir)!r}: the "
                                "mirrors are shared by every gate of the agent, the state is this gate's alone")
    audit_log = string_value(data, "audit_log", "audit_log", fail) or str(state_dir / "audit.jsonl")
    scan_url = check_http_url(string_value(data, "pipelock_scan_url", "pipelock_scan_url", fail), "pipelock_scan_url",
                              fail)
    max_push = data.get("max_push_bytes", DEFAULT_MAX_PUSH_BYTES)
    if isinstance(max_push, bool) or not isinstance(max_push, int) or max_push < 1:
        raise fail("max_push_bytes", f"must be a positive number of bytes, got {max_push!r}")
    supervise = _supervise(data["supervise"], fail) if data.get("supervise") is not None else None
    repos = tuple(_repo(item, f"repos[{i}]", fail) for i, item in enumerate(list_of(data, "repos", fail)))
    refuse_duplicates([repo.name for repo in repos], "repos", "name", fail)
    for i, repo in enumerate(repos):
        if repo.push.approve and supervise is None:
            raise fail(f"repos[{i}].push.approve", "needs supervise (state_dir, timeout_seconds): where the push waits")
    return GateConfig(host, port, float(refresh), mirrors_dir=mirrors_dir, state_dir=state_dir,
                      audit_log=Path(audit_log), pipelock_scan_url=scan_url, repos=repos,
                      max_push_bytes=max_push, supervise=supervise)


def _absolute_dir(data: dict, name: str, fail: Fail) -> Path:
    value = string_value(data, name, name, fail, required=True)
    if not value.startswith("/"):
        raise fail(name, f"must be an absolute path, got {value!r}")
    return Path(os.path.normpath(value))


def _supervise(raw: Any, fail: Fail) -> SuperviseLink:
    nested_mapping(raw, {"state_dir", "timeout_seconds"}, "supervise", fail,
                   "must be a mapping with state_dir and timeout_seconds")
    state_dir = string_value(raw, "state_dir", "supervise.state_dir", fail, required=True)
    if not state_dir.startswith("/"):
        raise fail("supervise.state_dir", f"must be an absolute path, got {state_dir!r}")
    timeout = raw.get("timeout_seconds")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not MIN_TIMEOUT_S <= timeout <= MAX_TIMEOUT_S:
        raise fail("supervise.timeout_seconds", f"must be an integer from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}, got {timeout!r}")
    return SuperviseLink(Path(state_dir), timeout)


def _repo(item: Any, key: str, fail: Fail) -> GitRepo:
    nested_mapping(item, {"name", "url", "identity", "push"}, key, fail, "must be a mapping with name, url, identity, push")
    name = string_value(item, "name", f"{key}.name", fail, required=True)
    if not _NAME.match(name) or name.endswith(".git"):
        raise fail(f"{key}.name", f"must be letters, digits, '.', '_' or '-' (no .git suffix), got {name!r}")
    url = string_value(item, "url", f"{key}.url", fail, required=True)
    if not (url.startswith(_URL_SCHEMES) or _SCP_URL.match(url) or url.startswith("/")):
        raise fail(f"{key}.url", f"must be an https://, http://, ssh://, file:// or user@host:path URL, got {url!r}")
    return GitRepo(name, url, _identity(item.get("identity") or {"kind": "none"}, f"{key}.identity", fail),
                   _push(item.get("push") or {}, f"{key}.push", fail))


def _identity(raw: Any, key: str, fail: Fail) -> GitIdentity:
    nested_mapping(raw, {"kind", "token_env", "username", "ssh_key"}, key, fail, "must be a mapping with kind")
    kind = string_value(raw, "kind", f"{key}.kind", fail) or "none"
    if kind not in ("token", "ssh", "none"):
        raise fail(f"{key}.kind", f"must be token, ssh or none, got {kind!r}")
    token_env = string_value(raw, "token_env", f"{key}.token_env", fail)
    username = string_value(raw, "username", f"{key}.username", fail)
    ssh_key = string_value(raw, "ssh_key", f"{key}.ssh_key", fail)
    if kind == "token":
        if not ENV_NAME.match(token_env):
            raise fail(f"{key}.token_env", f"kind token needs an environment variable name, got {token_env!r}")
        username = username or GitIdentity().username
        if "\n" in username:
            raise fail(f"{key}.username", "must be one line")
        return GitIdentity("token", token_env=token_env, username=username)
    if kind == "ssh":
        if not ssh_key.startswith("/"):
            raise fail(f"{key}.ssh_key", f"kind ssh needs the absolute path of a key, got {ssh_key!r}")
        return GitIdentity("ssh", ssh_key=ssh_key)
    return GitIdentity("none")


def _push(raw: Any, key: str, fail: Fail) -> PushPolicy:
    nested_mapping(raw, {"branches", "force", "delete", "tags", "approve", "namespace_root", "instance"}, key, fail)
    branches = string_list(raw.get("branches") or [], f"{key}.branches", fail, what="fnmatch globs")
    root = string_value(raw, "namespace_root", f"{key}.namespace_root", fail)
    if root and not _NAMESPACE_ROOT.match(root):
        raise fail(f"{key}.namespace_root", f'must be a branch prefix of whole names ending in "/", like '
                                            f'"bottle/<agent>/", got {root!r}')
    instance = string_value(raw, "instance", f"{key}.instance", fail)
    if instance and not _NAME.match(instance):
        raise fail(f"{key}.instance", f"must be letters, digits, '.', '_' or '-' (no '/'), got {instance!r}")
    if instance and not root:
        raise fail(f"{key}.instance", f"needs {key}.namespace_root: instance {instance}'s branches are "
                                      f"<namespace_root>{instance}/*")
    return PushPolicy(
        branches=tuple(branches),
        force=bool_value(raw, "force", f"{key}.force", fail),
        delete=bool_value(raw, "delete", f"{key}.delete", fail),
        tags=bool_value(raw, "tags", f"{key}.tags", fail),
        approve=bool_value(raw, "approve", f"{key}.approve", fail),
        namespace_root=root,
        instance=instance,
    )
