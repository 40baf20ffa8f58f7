"""claude-bottle: `doit start agent=<name>` and `doit clean agent=<name>`. Tasks live in bottle_tasks/."""

from bottle_tasks.tasks import *  # noqa: F401,F403
