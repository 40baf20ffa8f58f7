"""The docker CLI, one client per doit run: every command goes through runner.run, and inspect results
are cached until a command that may change state runs (python-on-whales' client, testcontainers'
label selection).

A run's up-to-date probes share one `docker inspect` of every watched name, so an unchanged start
costs one docker call for all of them. Any other command through the client drops the cache, and a
caller that must see the engine as it is now (waiting for health) asks with fresh=True.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bottle_tasks.errors import BottleError
from bottle_tasks.labels import LABEL
from bottle_tasks.runner import CommandError, Result, run

_DAEMON_DOWN = ("Cannot connect to the Docker daemon", "error during connect", "Is the docker daemon running")
_KIND_MARKER = {"container": "State", "network": "IPAM", "image": "RepoTags"}


class DockerUnreachable(BottleError):
    pass


Runner = Callable[..., Result]


class Docker:
    """The docker CLI with a per-run inspect cache and explicit invalidation."""

    def __init__(self, runner: Runner = run, binary: str = "docker") -> None:
        self._run = runner
        self.binary = binary
        self._watched: list[str] = []
        self._objects: dict[str, dict[str, Any]] | None = None   # name or tag -> inspect object

    # -- commands --------------------------------------------------------------------------------

    def __call__(self, *args: str, check: bool = True, env: Mapping[str, str] | None = None,
                 input: str | bytes | None = None, timeout: float | None = None, capture: bool = True,
                 on_line: Callable[[str], None] | None = None) -> Result:
        """Run `docker ARGS`. It may change what the cache describes, so the cache is dropped.
        on_line gets each output line as it arrives (runner.run), e.g. to show a build's progress."""
        self.invalidate()
        return self.query(*args, check=check, env=env, input=input, timeout=timeout, capture=capture, on_line=on_line)

    def query(self, *args: str, check: bool = True, env: Mapping[str, str] | None = None,
              input: str | bytes | None = None, timeout: float | None = None, capture: bool = True,
              on_line: Callable[[str], None] | None = None) -> Result:
        """Run a docker command that changes nothing (inspect, ls, logs, port): the cache stays."""
        try:
            result = self._run([self.binary, *args], check=check, env=env, input=input, timeout=timeout,
                               capture=capture, on_line=on_line)
        except CommandError as exc:
            _raise_if_daemon_down(exc.stderr)
            raise
        if not result.ok:
            _raise_if_daemon_down(result.stderr)
        return result

    # -- the cache -------------------------------------------------------------------------------

    def watch(self, *names: str) -> None:
        """Names the run will probe: the first inspect fetches all of them in one call."""
        new = [n for n in names if n not in self._watched]
        if new:
            self._watched += new
            self._objects = None

    def invalidate(self) -> None:
        self._objects = None

    def inspect(self, kind: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """`docker <kind> inspect NAME` as a dict, or None when there is no such object."""
        if not fresh and name in self._watched:
            obj = self._snapshot().get(name)
            return obj if obj is not None and _KIND_MARKER.get(kind, "") in obj else None
        result = self.query(kind, "inspect", name, check=False)
        if not result.ok:
            return None
        data = json.loads(result.stdout)
        return data[0] if data else None

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        if self._objects is None:
            out = self.query("inspect", *self._watched, check=False).stdout.strip()
            self._objects = {}
            for obj in json.loads(out) if out.startswith("[") else []:
                for key in obj.get("RepoTags") or [obj.get("Name", "").lstrip("/")]:
                    self._objects[key] = obj
        return self._objects

    def image_id(self, ref: str, *, fresh: bool = False) -> str | None:
        obj = self.inspect("image", ref, fresh=fresh)
        return obj["Id"] if obj else None

    # -- selections ------------------------------------------------------------------------------

    def by_label(self, kind: str, label: str) -> list[str]:
        """Names of the containers, networks or volumes carrying label (key=value)."""
        if kind == "container":
            out = self.query("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").stdout
        else:
            out = self.query(kind, "ls", "--filter", f"label={label}", "--format", "{{.Name}}").stdout
        return [line for line in out.splitlines() if line]

    def labels_of_all(self, label: str) -> list[dict[str, str]]:
        """The labels of every container, network and volume carrying label (key=value)."""
        found: list[dict[str, str]] = []
        for argv in (("ps", "-a"), ("network", "ls"), ("volume", "ls")):
            out = self.query(*argv, "--filter", f"label={label}", "--format", "{{json .Labels}}").stdout
            for line in out.splitlines():
                text = json.loads(line) if line.strip() else ""
                # docker prints labels as "k=v,k=v" (values may hold commas only in theory; ours never do)
                found.append(dict(pair.split("=", 1) for pair in text.split(",") if "=" in pair) if text else {})
        return found

    def network_subnets(self, attempts: int = 3) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        """Every docker network's subnets, by network name."""
        ids = self.query("network", "ls", "-q").stdout.split()
        if not ids:
            return {}
        inspected = self.query("network", "inspect", *ids, check=attempts <= 1)
        if not inspected.ok:      # a network removed between ls and inspect: list again
            return self.network_subnets(attempts - 1)
        found: dict[str, list] = {}
        for net in json.loads(inspected.stdout):
            for cfg in (net.get("IPAM") or {}).get("Config") or []:
                if cfg.get("Subnet"):
                    found.setdefault(net["Name"], []).append(ipaddress.ip_network(cfg["Subnet"], strict=False))
        return found

    def remove_containers(self, names: Sequence[str]) -> None:
        if names:
            self("rm", "-f", *names, check=False)

    def ensure_owned(self, kind: str, name: str, slug: str, state_dir: Path) -> dict[str, Any] | None:
        """The existing resource if it belongs to this bottle (None when there is none); refuse one that does not."""
        obj = self.inspect(kind, name)
        if obj is not None:
            refuse_unless_owned(labels_of(obj), slug, state_dir, f"docker {kind} {name!r}", f"docker {kind} rm {name}")
        return obj


def _raise_if_daemon_down(stderr: str) -> None:
    if any(marker in stderr for marker in _DAEMON_DOWN):
        host = os.environ.get("DOCKER_HOST", "the default socket /var/run/docker.sock")
        raise DockerUnreachable(
            f"Docker is not reachable at {host}: start the Docker engine (dockerd), "
            "or point DOCKER_HOST at a running one, then run the command again.")


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return (obj.get("Config") or {}).get("Labels") or obj.get("Labels") or {}


def refuse_unless_owned(labels: Mapping[str, str], slug: str, state_dir: Path, what: str, remove_command: str) -> None:
    """A resource with one of our names is ours only when it carries our slug and state dir labels."""
    if labels.get(f"{LABEL}.slug") != slug or labels.get(f"{LABEL}.state") != str(state_dir):
        owner = labels.get(f"{LABEL}.state")
        whose = f"by another claude-bottle checkout (state dir {owner})" if owner else "outside claude-bottle"
        raise BottleError(
            f"{what} already exists, created {whose}. "
            f"Remove it ({remove_command}) or rename the agent file of bottle {slug!r}, then start again.")
