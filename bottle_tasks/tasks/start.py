"""start: bring the bottle up (everything above, as dependencies), then run the agent attached."""

from __future__ import annotations

import shlex
import subprocess
import sys

import doit
from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks.plan import agent_command
from bottle_tasks.reporter import HANDS_OVER
from bottle_tasks import locks
from bottle_tasks.tasks.bottle import bottle_lock, hold_bottle, purge_state
from bottle_tasks.tasks.common import ONE_BOTTLE, action, backend, plans, selected_agent

__all__ = ["task_start"]


def flush_doit_state() -> None:
    """Write the state of the tasks done so far to doit's DB (sqlite3 backend), keeping it open for
    the rest of the run."""
    manager = getattr(doit.Globals, "dep_manager", None)
    db = getattr(manager, "backend", None)
    if db is None or not hasattr(db, "_dirty") or not hasattr(db, "_conn"):
        return
    for task_id in list(db._dirty):
        db._conn.execute("insert or replace into doit values (?,?)", (task_id, db.codec.encode(db._cache[task_id])))
    db._conn.commit()
    db._dirty = set()


def run_agent(plan) -> TaskFailed | None:
    # The stages are done: save their state now (doit writes its DB only when the run ends, hours
    # away while the agent works) and let another run of this bottle (doit status, a second start) in.
    flush_doit_state()
    locks.release(bottle_lock(plan))
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
    chosen = list(plans())
    if len(chosen) > 1:   # all=1: the bottles' clean actions, one after another; a start takes one bottle
        return {
            # The deps order clean (dependents first); a run stops at the first preflight, which refuses all=1.
            "task_dep": [f"provision:{plan.slug}" for plan in chosen],
            "actions": [lambda: TaskFailed(ONE_BOTTLE)],
            "uptodate": [False],
            "clean": [step for plan in chosen for step in clean_steps(plan)],
        }
    for plan in chosen:
        return {
            "task_dep": [f"provision:{plan.slug}"],
            "actions": [(run_agent, [plan])],
            "uptodate": [False],
            "verbosity": 2,
            "meta": {HANDS_OVER: True},     # the stages' timings print before the agent takes the terminal
            "clean": clean_steps(plan),
        }


def clean_steps(plan) -> list:
    # Runs first among the clean actions (dependents first): sweep everything labelled with the
    # slug, so a resource left by an interrupted run is found too.
    return [(action(hold_bottle), [plan]), (action(backend(plan).remove_all), [plan]), (action(purge_state), [plan])]
