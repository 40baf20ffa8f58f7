"""Where agent files live: the search path, one file by name, and a starter file (`bottle init <name>`).

The search path, first match wins: BOTTLE_AGENTS_DIR when set, ./agents (the checkout's own, since
doit runs from dodo.py's directory; the user's, for the `bottle` command), then the user's
config dir (~/.config/claude-bottle/agents, or under $XDG_CONFIG_HOME).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from bottle_tasks.errors import BottleError
from bottle_tasks.spec import AGENT_NAME, SpecError

CONFIG_SUBDIR = Path("claude-bottle") / "agents"
STARTER_TEMPLATE = "agent.yaml.j2"


def agent_dirs(env: Mapping[str, str], cwd: Path) -> tuple[Path, ...]:
    """The search path, without duplicates; nothing here touches the disk."""
    config_home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "/root")) / ".config")
    candidates = [Path(env["BOTTLE_AGENTS_DIR"]).expanduser()] if env.get("BOTTLE_AGENTS_DIR") else []
    candidates += [cwd / "agents", config_home / CONFIG_SUBDIR]
    return tuple(dict.fromkeys(path if path.is_absolute() else cwd / path for path in candidates))


def agent_files(dirs: tuple[Path, ...]) -> list[Path]:
    """Every agent file on the search path, one per name (the first), in name order."""
    found: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return [found[name] for name in sorted(found)]


def find_agent_file(name: str, dirs: tuple[Path, ...]) -> Path:
    for directory in dirs:
        if (directory / f"{name}.yaml").is_file():
            return directory / f"{name}.yaml"
    known = ", ".join(path.stem for path in agent_files(dirs)) or "none yet"
    raise SpecError(dirs[0] / f"{name}.yaml", "", "no such agent file",
                    f"Looked in {', '.join(map(str, dirs))} (in that order). Create it with `bottle init {name}`, "
                    f"or pick one of the agents found: {known}")


def init_dir(env: Mapping[str, str], cwd: Path) -> Path:
    """Where `bottle init` writes: BOTTLE_AGENTS_DIR when set, ./agents when it exists, else the config dir."""
    dirs = agent_dirs(env, cwd)
    if env.get("BOTTLE_AGENTS_DIR"):
        return dirs[0]
    return cwd / "agents" if (cwd / "agents").is_dir() else dirs[-1]


def write_starter(name: str, directory: Path) -> Path:
    """A commented starter agent file for name in directory; never over an existing file."""
    from bottle_tasks.render import render_template, write_atomic
    from bottle_tasks.spec import load_spec

    if not AGENT_NAME.match(name):
        raise BottleError(f"agent name {name!r} is not usable: lower-case letters, digits and dashes, 2 to 32 "
                          "characters, starting with a letter (it becomes the file name and the bottle's name)")
    path = directory / f"{name}.yaml"
    if path.exists():
        raise BottleError(f"{path} exists already; edit it, or pick another name")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_template(STARTER_TEMPLATE, name=name))
    load_spec(path)     # the starter must be a valid agent file as written
    return path
