"""Thin docker CLI helpers on top of runner.run: inspect, ownership checks, label queries."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any, Callable, Mapping, Sequence

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import LABEL, Plan
from bottle_tasks.runner import CommandError, Result, run

_DAEMON_DOWN = ("Cannot connect to the Docker daemon", "error during connect", "Is the docker daemon running")


class DockerUnreachable(BottleError):
    pass


def docker(*args: str, check: bool = True, env: Mapping[str, str] | None = None,
           input: str | None = None, timeout: float | None = None, capture: bool = True) -> Result:
    try:
        result = run(["docker", *args], check=check, env=env, input=input, timeout=timeout, capture=capture)
    except CommandError as exc:
        _raise_if_daemon_down(exc.stderr)
        raise
    if not result.ok:
        _raise_if_daemon_down(result.stderr)
    return result


def _raise_if_daemon_down(stderr: str) -> None:
    if any(marker in stderr for marker in _DAEMON_DOWN):
        host = os.environ.get("DOCKER_HOST", "the default socket /var/run/docker.sock")
        raise DockerUnreachable(
            f"Docker is not reachable at {host}: start the Docker engine (dockerd), "
            "or point DOCKER_HOST at a running one, then run the command again.")


class _Snapshot:
    """One `docker inspect` of every watched container, network and image, shared by the up-to-date
    probes of a run: an unchanged start then costs one docker call instead of a dozen. Actions never
    read it (they change what it describes); `stale()` drops it when an action ends."""

    def __init__(self) -> None:
        self.watched: list[str] = []
        self.objects: dict[str, dict[str, Any]] | None = None
        self.memos: dict[str, Any] = {}
        self.paused = 0

    def watch(self, *names: str) -> None:
        self.watched += [n for n in names if n not in self.watched]

    def stale(self) -> None:
        self.objects = None
        self.memos.clear()

    def memo(self, key: str, fetch: Callable[[], Any]) -> Any:
        """Another backend's live state (smolvm's machine status), shared by the probes the same way."""
        if self.paused:
            return fetch()
        if key not in self.memos:
            self.memos[key] = fetch()
        return self.memos[key]

    def get(self, name: str) -> tuple[bool, dict[str, Any] | None]:
        """(known, object): known is False when the snapshot cannot answer for this name."""
        if self.paused or name not in self.watched:
            return False, None
        if self.objects is None:
            out = docker("inspect", *self.watched, check=False).stdout.strip()
            self.objects = {}
            for obj in json.loads(out) if out.startswith("[") else []:
                for key in obj.get("RepoTags") or [obj.get("Name", "").lstrip("/")]:
                    self.objects[key] = obj
        return True, self.objects.get(name)


snapshot = _Snapshot()


def inspect(kind: str, name: str) -> dict[str, Any] | None:
    """`docker <kind> inspect NAME` as a dict, or None when it does not exist."""
    known, obj = snapshot.get(name)
    if known:
        is_kind = {"container": "State" in (obj or {}), "network": "IPAM" in (obj or {}), "image": "RepoTags" in (obj or {})}
        return obj if obj is not None and is_kind.get(kind, True) else None
    result = docker(kind, "inspect", name, check=False)
    if not result.ok:
        return None
    data = json.loads(result.stdout)
    return data[0] if data else None


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return (obj.get("Config") or {}).get("Labels") or obj.get("Labels") or {}


def ensure_owned(kind: str, name: str, plan: Plan, obj: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Return the existing resource if it belongs to this bottle; refuse one that does not."""
    obj = obj or inspect(kind, name)
    if obj is None:
        return None
    refuse_unless_owned(labels_of(obj), plan, f"docker {kind} {name!r}", f"docker {kind} rm {name}")
    return obj


def refuse_unless_owned(labels: Mapping[str, str], plan: Plan, what: str, remove_command: str) -> None:
    """A resource with one of our names is ours only when it carries our slug and state dir labels."""
    if labels.get(f"{LABEL}.slug") != plan.slug or labels.get(f"{LABEL}.state") != str(plan.state_dir):
        owner = labels.get(f"{LABEL}.state")
        whose = f"by another claude-bottle checkout (state dir {owner})" if owner else "outside claude-bottle"
        raise BottleError(
            f"{what} already exists, created {whose}. "
            f"Remove it ({remove_command}) or rename agents/{plan.agent}.yaml, then start again.")


def by_label(kind: str, label: str) -> list[str]:
    """Names of containers/networks/volumes carrying label (key=value)."""
    if kind == "container":
        out = docker("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").stdout
    else:
        out = docker(kind, "ls", "--filter", f"label={label}", "--format", "{{.Name}}").stdout
    return [line for line in out.splitlines() if line]


def network_subnets(attempts: int = 3) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    ids = docker("network", "ls", "-q").stdout.split()
    if not ids:
        return {}
    inspected = docker("network", "inspect", *ids, check=attempts <= 1)
    if not inspected.ok:      # a network removed between ls and inspect: list again
        return network_subnets(attempts - 1)
    found: dict[str, list] = {}
    for net in json.loads(inspected.stdout):
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet"):
                found.setdefault(net["Name"], []).append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    return found


def image_id(ref: str) -> str | None:
    known, obj = snapshot.get(ref)
    if known:
        return obj["Id"] if obj and "RepoTags" in obj else None
    result = docker("image", "inspect", "-f", "{{.Id}}", ref, check=False)
    return result.stdout.strip() if result.ok else None


def rm_containers(names: Sequence[str]) -> None:
    if names:
        docker("rm", "-f", *names, check=False)
