"""What `doit status` shows of each bottle, from what tasks/observe.py gathered: one `docker ps` for
every bottle's containers, at most one `smolvm machine ls --json`, at most one `docker volume inspect`,
and a few small files in each state dir. Pure: parsing and formatting only.

`docker ps` tells no start time, only docker's words for how long a container has been up ("Up 2
hours (healthy)"); ``uptime_bounds`` turns them into the least and most that can mean, so a restart
after the fence's proof is flagged only when it is certain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from bottle_tasks.backends.smolmachines import machine_epoch
from bottle_tasks.fence_record import FenceRecord
from bottle_tasks.instances import Bottle
from bottle_tasks.labels import ROLE_LABEL, SLUG_LABEL, STATE_LABEL
from bottle_tasks.supervise_cli import printable, short_duration

# ---------------------------------------------------------------------------- docker ps

_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def parse_labels(text: str) -> dict[str, str]:
    """docker ps's Labels, "k=v,k2=v2": a comma not followed by a key= belongs to the value before it."""
    labels: dict[str, str] = {}
    key = None
    for part in text.split(",") if text else ():
        name, sep, value = part.partition("=")
        if sep and _LABEL_KEY.fullmatch(name):
            key = name
            labels[key] = value
        elif key is not None:
            labels[key] += "," + part
    return labels


@dataclass(frozen=True)
class Container:
    name: str
    state: str                      # running, exited, created, restarting, paused, dead
    status: str                     # docker's words: "Up 2 hours (healthy)"
    labels: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()    # volume names and host paths

    @property
    def slug(self) -> str:
        return self.labels.get(SLUG_LABEL, "")

    @property
    def role(self) -> str:
        return self.labels.get(ROLE_LABEL, "")

    @property
    def state_dir(self) -> str:
        return self.labels.get(STATE_LABEL, "")

    @classmethod
    def from_ps(cls, obj: Mapping[str, Any]) -> "Container":
        mounts = tuple(m for m in str(obj.get("Mounts") or "").split(",") if m)
        return cls(str(obj.get("Names", "")), str(obj.get("State", "")).lower(), str(obj.get("Status", "")),
                   parse_labels(str(obj.get("Labels") or "")), mounts)


def parse_ps(stdout: str) -> list[Container]:
    """`docker ps --format '{{json .}}'`: one object a line; anything else is skipped."""
    found = []
    for line in stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(Container.from_ps(obj))
    return found


def health(container: Container | None) -> str:
    """missing, a state that is not running (exited, created, ...), or running/healthy/unhealthy/starting."""
    if container is None:
        return "missing"
    if container.state != "running":
        return container.state or "unknown"
    for mark, word in (("(unhealthy)", "unhealthy"), ("(healthy)", "healthy"), ("(health: starting)", "starting")):
        if mark in container.status:
            return word
    return "running"


_UP = re.compile(r"Up (.+?)(?: \([^)]*\))*$")
_AMOUNT = re.compile(r"(\d+) (second|minute|hour|day|week|month|year)s?")
_UNIT = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400,
         "year": 365 * 86400}


def uptime_words(status: str) -> str:
    """"Up 2 hours (healthy)" -> "2 hours"; "" when not up."""
    match = _UP.match(status)
    return match.group(1).lower() if match else ""


def uptime_bounds(status: str) -> tuple[float, float] | None:
    """The least and most seconds docker's words can mean (go-units HumanDuration, which truncates
    and, in newer versions, rounds hours); None when the container is not up."""
    words = uptime_words(status)
    if not words:
        return None
    fixed = {"less than a second": (0, 1), "about a minute": (60, 120), "about an hour": (1800, 7200)}
    if words in fixed:
        return fixed[words]
    match = _AMOUNT.fullmatch(words)
    if not match:
        return None
    count, unit = int(match.group(1)), _UNIT[match.group(2)]
    slack = 1800 if unit >= 3600 else 0      # rounded hours
    return max(0, count * unit - slack), (count + 1) * unit


def started_after(container: Container | None, moment: datetime, now: datetime) -> bool:
    """Certainly (re)started after moment: even its longest possible uptime begins later."""
    bounds = uptime_bounds(container.status) if container else None
    return bounds is not None and now.timestamp() - bounds[1] > moment.timestamp()


# ---------------------------------------------------------------------------- smolvm machine ls --json


@dataclass(frozen=True)
class Machine:
    name: str
    state: str
    labels: Mapping[str, str]
    epoch: str

    @property
    def slug(self) -> str:
        return self.labels.get(SLUG_LABEL, "")

    @classmethod
    def from_ls(cls, obj: Mapping[str, Any]) -> "Machine":
        labels = obj.get("labels") if isinstance(obj.get("labels"), Mapping) else {}
        return cls(str(obj.get("name", "")), str(obj.get("state", "")), dict(labels), machine_epoch(obj))


# ---------------------------------------------------------------------------- one bottle


@dataclass(frozen=True)
class Workspace:
    path: str = ""          # a host directory
    volume: str = ""        # or a docker volume
    size: int | None = None
    capped: bool = False    # the walk stopped early: at least size
    missing: bool = False

    def words(self) -> str:
        where = printable(self.path) if self.path else f"volume {printable(self.volume)}"
        if self.missing:
            return f"{where} (missing)"
        if self.size is None:
            return where
        return f"{'>' if self.capped else ''}{byte_size(self.size)} in {where}"


def byte_size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def might_be_smol(containers: Iterable[Container], fence: FenceRecord | None) -> bool:
    """Whether smolvm must be asked about this bottle: no docker guest, and a bundle or the record say so."""
    roles = {c.role for c in containers}
    if roles & {"guest", "fence"}:
        return False
    return "bundle" in roles or (fence is not None and fence.backend == "smolmachines")


@dataclass(frozen=True)
class BottleFacts:
    slug: str
    state_dir: Path
    containers: tuple[Container, ...] = ()
    machine: Machine | None = None
    machines_problem: str = ""          # why smolvm could not be asked ("" when it was, or need not be)
    fence: FenceRecord | None = None
    routes: int | None = None           # routes.yaml
    approved_routes: int | None = None  # policy/overlay.json
    pending: int | None = None          # None: no supervise queue
    blocks_last_hour: int | None = None
    workspace: Workspace | None = None
    agent: str = ""
    instance: str = ""                  # name= ("" for the agent's default bottle)

    @property
    def selector(self) -> str:
        return Bottle(self.agent or self.slug, self.instance).selector

    def role(self, role: str) -> Container | None:
        return next((c for c in self.containers if c.role == role), None)

    @property
    def backend(self) -> str:
        if self.machine is not None:
            return "smolmachines"
        if self.role("guest") or self.role("fence"):
            return "docker"
        return (self.fence.backend if self.fence else "") or "?"

    @property
    def guest(self) -> str:
        if self.backend in ("smolmachines", "?") and self.machine is None and self.machines_problem:
            return f"unknown ({printable(self.machines_problem)})"    # it may be a machine smolvm could not list
        if self.backend == "smolmachines":
            return printable(self.machine.state) or "unknown" if self.machine else "missing"
        guest, holder = health(self.role("guest")), health(self.role("fence"))
        if guest == "running" and holder != "healthy":
            return f"running, fence holder {holder}"
        return guest

    @property
    def guest_running(self) -> bool:
        return self.guest.startswith("running")

    def fence_words(self, now: datetime) -> tuple[str, str]:
        """(what status says of the fence, a warning or "")."""
        if not self.guest_running:
            return "-", ""
        if self.fence is None:
            return "no proof recorded", ""
        proved = f"proved {short_duration(now.timestamp() - self.fence.proved_at.timestamp())} ago"
        again = f"doit start {printable(self.selector)} recreates the guest and proves its fence again"
        if self.backend == "smolmachines":
            if self.machine is not None and self.machine.epoch != self.fence.epoch:
                return proved, f"the guest machine was restarted outside doit after the proof: {again}"
            return proved, ""
        if started_after(self.role("fence"), self.fence.proved_at, now):
            return proved, f"the fence holder was restarted outside doit after the proof: {again}"
        if started_after(self.role("guest"), self.fence.proved_at, now):
            return proved, "the guest was restarted outside doit after the proof (its namespace, and the fence, stayed)"
        return proved, ""


def format_bottle(facts: BottleFacts, now: datetime) -> str:
    bundle = facts.role("bundle")
    up = uptime_words(bundle.status) if bundle else ""
    fence, warning = facts.fence_words(now)
    routes = "? routes" if facts.routes is None else f"{facts.routes} route{'s' * (facts.routes != 1)}"
    if facts.approved_routes:
        routes += f" (+{facts.approved_routes} approved)"
    counts = [routes]
    if facts.pending is not None:
        counts.append(f"{facts.pending} pending approval{'s' * (facts.pending != 1)}")
    if facts.blocks_last_hour is not None:
        counts.append(f"{facts.blocks_last_hour} block{'s' * (facts.blocks_last_hour != 1)} in the last hour")
    lines = [
        f"{printable(facts.slug)}{printable(f'  (agent {facts.agent}, instance {facts.instance})') if facts.instance else ''}"
        f"  {facts.backend}  {'up ' + printable(up) if up else 'down'}",
        f"  guest {facts.guest}  bundle {health(bundle)}  fence {fence}",
        "  " + ", ".join(counts),
        f"  workspace {facts.workspace.words() if facts.workspace else '?'}",
    ]
    if warning:
        lines.append(f"  ! {warning}")
    return "\n".join(lines)


def format_status(bottles: Iterable[BottleFacts], now: datetime) -> str:
    shown = [format_bottle(facts, now) for facts in sorted(bottles, key=lambda f: f.slug)]
    return "\n\n".join(shown) if shown else "no bottles on this machine (doit start agent=<name> starts one)"
