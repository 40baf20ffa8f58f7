"""DOIT_CONFIG for the bottle (reference/doit.md section 0 lists why each key is set)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from doit import get_var

from bottle_tasks.instances import Bottle
from bottle_tasks.reporter import BottleReporter
from bottle_tasks.settings import Settings

_cache = Settings.from_env().cache_dir
_cache.mkdir(parents=True, exist_ok=True)


def doit_db_of(cache_dir: Path, name: str) -> Path:
    """A bottle's doit DB (name: its slug), or a run's that names no one bottle."""
    return cache_dir / "doit" / f"{name.replace('/', '_')}.sqlite3"


def dep_file(cache_dir: Path, cmdline_vars: Mapping[str, str]) -> str:
    """Each bottle's own doit DB, so runs of different bottles never share one: doit's sqlite3 backend
    holds a write lock from a `forget` or `clean` until its run ends, which would fail a concurrent
    start of another bottle. Runs that name no bottle (list, status) use their own."""
    agent = cmdline_vars.get("agent") or ""
    if not agent:
        name = "all"
    elif (cmdline_vars.get("all") or "").lower() in ("1", "yes", "true"):
        name = f"{agent}.all"
    else:
        name = Bottle(agent, cmdline_vars.get("name") or "").slug
    # The names are only a file name here; a bad one (with a slash) is refused when the plan loads.
    path = doit_db_of(cache_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def command_line_vars() -> dict[str, str]:
    # get_var returns None outside `doit` (doit issue #241)
    return {key: get_var(key, None) or "" for key in ("agent", "name", "all")}


DOIT_CONFIG = {
    "default_tasks": ["start"],
    "backend": "sqlite3",                # concurrent doit runs must not corrupt the dep DB
    "dep_file": dep_file(_cache, command_line_vars()),
    "par_type": "thread",
    "cleanforget": True,
    "cleandep": True,
    "verbosity": 1,
    "action_string_formatting": "new",
    "reporter": BottleReporter,          # doit's console output, then the time each stage took
}
