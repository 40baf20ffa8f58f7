"""Instances: several bottles from one agent file (`doit start agent=x name=<instance>`).

A bottle's slug is `<agent>-<instance>`, or `<agent>` for the agent's default bottle (no name=), so
bottles made before instances existed keep their names. Every bottle's state dir holds a record of
which agent and instance it belongs to; a slug two (agent, instance) pairs would share (agent `a` with
instance `b-c`, agent `a-b` with instance `c`, or an agent file named `a-b`) is refused by that record
and by the agent files on the search path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bottle_tasks.errors import BottleError
from bottle_tasks.spec import AGENT_NAME

RECORD_FILE = "bottle.json"
# Every name built from the slug must stay a DNS label (63): bottle-<slug>-bundle is the longest.
MAX_SLUG = 48


@dataclass(frozen=True)
class Bottle:
    agent: str
    instance: str = ""        # "" is the agent's default bottle

    @property
    def slug(self) -> str:
        return f"{self.agent}-{self.instance}" if self.instance else self.agent

    @property
    def selector(self) -> str:
        """How commands name this bottle: agent=x [name=y]."""
        return f"agent={self.agent}" + (f" name={self.instance}" if self.instance else "")

    def describe(self) -> str:
        return f"instance {self.instance!r} of agent {self.agent!r}" if self.instance else f"agent {self.agent!r}'s bottle"


def bottle_of(agent: str, instance: str | None) -> Bottle:
    """The bottle for agent and name= (validated like agent names; the slug must stay short enough)."""
    instance = instance or ""
    if instance and not AGENT_NAME.match(instance):
        raise BottleError(f"name={instance!r} is not usable as an instance name: lower-case letters, digits and "
                          "dashes, 2 to 32 characters, starting with a letter and not ending with a dash")
    bottle = Bottle(agent, instance)
    if len(bottle.slug) > MAX_SLUG:
        raise BottleError(f"name={instance!r} makes the bottle name {bottle.slug!r} {len(bottle.slug)} characters long "
                          f"(at most {MAX_SLUG}, so every container, network and DNS name built from it fits); "
                          "pick a shorter name")
    return bottle


def read_record(state_dir: Path) -> Bottle | None:
    """The (agent, instance) a state dir belongs to; None when it has no record (a bottle made before
    instances existed, which is its agent's default bottle, or no bottle at all)."""
    try:
        data = json.loads((state_dir / RECORD_FILE).read_text())
        return Bottle(str(data["agent"]), str(data.get("instance") or ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise BottleError(f"{state_dir / RECORD_FILE} is unreadable; it says which agent and instance the bottle "
                          f"{state_dir.name!r} belongs to. Remove it, then start the bottle again") from None


def owner_of(state_dir: Path) -> Bottle | None:
    """Who holds this state dir: its record, or, without one, the default bottle of the agent it is named
    after (when the dir exists)."""
    record = read_record(state_dir)
    if record is None and state_dir.is_dir():
        return Bottle(state_dir.name)
    return record


def write_record(state_dir: Path, bottle: Bottle) -> None:
    path = state_dir / RECORD_FILE
    text = json.dumps({"agent": bottle.agent, "instance": bottle.instance}) + "\n"
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return
    tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def check_slug_free(bottle: Bottle, state_root: Path, agent_names: Iterable[str]) -> None:
    """Refuse a bottle whose slug another (agent, instance) already holds, or would take by its name."""
    owner = owner_of(state_root / bottle.slug)
    if owner is not None and owner != bottle:
        raise BottleError(
            f"the bottle name {bottle.slug!r} of {bottle.describe()} is taken by {owner.describe()} "
            f"(state dir {state_root / bottle.slug}); pick another name=, or remove that bottle first with "
            f"doit clean {owner.selector} purge=1")
    if bottle.instance and bottle.slug in set(agent_names):
        raise BottleError(
            f"the bottle name {bottle.slug!r} of {bottle.describe()} is also the name of the agent file "
            f"{bottle.slug}.yaml, whose bottle it would share; pick another name=")


def instances_on_disk(agent: str, state_root: Path) -> list[str]:
    """The instance names ("" for the default) of agent whose state dirs exist, in name order."""
    found: set[str] = set()
    try:
        entries = sorted(os.scandir(state_root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
            continue
        if entry.name != agent and not entry.name.startswith(f"{agent}-"):
            continue
        try:
            owner = owner_of(Path(entry.path))
        except BottleError:
            continue
        if owner is not None and owner.agent == agent:
            found.add(owner.instance)
    return sorted(found)
