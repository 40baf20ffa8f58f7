"""The `bottle` console command: doit embedded, so `bottle start agent=x` works outside the checkout."""

from __future__ import annotations

import sys

from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from bottle_tasks import tasks
from bottle_tasks.tasks.common import new_run


class BottleMain(DoitMain):
    BIN_NAME = "bottle"


def main(argv: list[str] | None = None) -> int:
    new_run()   # each command is its own run: fresh settings, docker client and plans
    return BottleMain(ModuleTaskLoader(tasks)).run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
