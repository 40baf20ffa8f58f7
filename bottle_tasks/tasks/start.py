"""start: bring the bottle up (everything above, as dependencies), then run the agent attached."""

from __future__ import annotations

import shlex
import subprocess
import sys

from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks.plan import agent_command
from bottle_tasks.reporter import HANDS_OVER
from bottle_tasks.tasks.bottle import purge_state
from bottle_tasks.tasks.common import action, backend, plans, selected_agent

__all__ = ["task_start"]


def run_agent(plan) -> TaskFailed | None:
    override = get_var("command", None)
    argv = list(agent_command(tuple(shlex.split(override)), plan.prompt) if override else plan.guest.command)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    code = subprocess.call(backend(plan).guest(plan).attach_argv(argv, tty=tty))
    if code != 0:
        return TaskFailed(f"the agent command {shlex.join(argv)} exited with status {code}; the bottle stays up")
    return None


def task_start():
    """Build what changed, bring the bottle up and run the agent attached (agent=<name> [command="..."])."""
    agent = selected_agent()
    if agent is None:
        return {
            "actions": [lambda: TaskFailed("say which agent: doit start agent=<name> (agents are the files in agents/)")],
            "uptodate": [False],
        }
    for plan in plans():
        be = backend(plan)
        return {
            "task_dep": [f"provision:{plan.agent}"],
            "actions": [(run_agent, [plan])],
            "uptodate": [False],
            "verbosity": 2,
            "meta": {HANDS_OVER: True},     # the stages' timings print before the agent takes the terminal
            # Runs first among the clean actions (dependents first): sweep everything labelled with
            # the slug, so a resource left by an interrupted run is found too.
            "clean": [(action(be.remove_all), [plan]), (action(purge_state), [plan])],
        }
