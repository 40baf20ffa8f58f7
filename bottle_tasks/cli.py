"""The `bottle` console command: doit embedded, so `bottle start agent=x` works outside the checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from bottle_tasks import tasks
from bottle_tasks.agents import init_dir, write_starter
from bottle_tasks.errors import BottleError
from bottle_tasks.tasks.common import new_run
from bottle_tasks.tasks.config import dep_file


class BottleMain(DoitMain):
    BIN_NAME = "bottle"


USAGE_INIT = "usage: bottle init <name>   (writes a commented starter agent file <name>.yaml)"


def init(args: list[str]) -> int:
    """`bottle init <name>`: a starter agent file where the search path looks first for new files."""
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE_INIT, file=sys.stderr)
        return 2
    try:
        path = write_starter(args[0], init_dir(os.environ, Path.cwd()))
    except BottleError as exc:
        print(f"claude-bottle: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}\nedit it, then: bottle start agent={args[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:     # not a task: it writes the file the tasks read
        return init(argv[1:])
    run = new_run()   # each command is its own run: fresh settings, docker client and plans
    # The module's DOIT_CONFIG was made when it was first imported, before this command's vars.
    config = {**tasks.DOIT_CONFIG, "dep_file": dep_file(run.settings.cache_dir, command_line_vars(argv))}
    return BottleMain(ModuleTaskLoader({**vars(tasks), "DOIT_CONFIG": config})).run(argv)


def command_line_vars(argv: list[str]) -> dict[str, str]:
    """doit's `key=value` command-line variables (any argument with = that is no option)."""
    return dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))


if __name__ == "__main__":
    sys.exit(main())
