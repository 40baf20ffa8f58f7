"""``python -m bottle_tasks.sidecars.gitgate``: the daemon, or one of the mirror's receive hooks."""

from __future__ import annotations

import sys
from typing import Sequence

from bottle_tasks.sidecars.gitgate.daemon import serve_main
from bottle_tasks.sidecars.gitgate.hooks import HOOKS, hook_main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HOOKS:
        return hook_main(argv)
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
