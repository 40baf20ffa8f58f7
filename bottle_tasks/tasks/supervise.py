"""Host side of supervise: list what waits for a decision, approve or deny it.

    doit supervise agent=<name> [watch=1]
    doit approve agent=<name> id=<request id> [reason="..."]
    doit deny agent=<name> id=<request id> [reason="..."]

Decisions are files in the bottle's state dir; the bundle need not be running.
"""

from __future__ import annotations

from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan
from bottle_tasks.tasks.common import action, flag, plans, selected_agent

__all__ = ["task_supervise", "task_approve", "task_deny"]


def _supervised(plan: Plan) -> Plan:
    if plan.supervise is None:
        raise BottleError(f"{plan.spec_path} has no supervise section, so nothing waits for approval; "
                          "add supervise: {tools: [...]} to use it")
    return plan


def list_pending(plan: Plan) -> None:
    from bottle_tasks import supervise_cli

    state = _supervised(plan).supervise.state_dir
    if flag("watch"):
        supervise_cli.watch(state, interval=1.0, notify=True)
    else:
        print(supervise_cli.format_pending(state))


def decide(plan: Plan, decision: str) -> None:
    from bottle_tasks import supervise_cli

    request_id = get_var("id", None)
    if not request_id:
        raise BottleError(f"say which request: doit {decision} agent={plan.agent} id=<id> "
                          f"(doit supervise agent={plan.agent} lists them)")
    author = supervise_cli.default_author()
    supervise_cli.decide(_supervised(plan).supervise.state_dir, request_id, decision, author, get_var("reason", "") or "")
    print(f"{ {'approve': 'approved', 'deny': 'denied'}[decision]} {request_id} as {author}")


def _task(doc: str, fn, *args) -> dict:
    if selected_agent() is None:
        return {"doc": doc, "actions": [lambda: TaskFailed("say which agent: agent=<name>")], "uptodate": [False]}
    for plan in plans():
        return {"doc": doc, "actions": [(action(fn), [plan, *args])], "uptodate": [False], "verbosity": 2}


def task_supervise():
    """List the requests waiting for a human decision (agent=<name> [watch=1])."""
    return _task(task_supervise.__doc__, list_pending)


def task_approve():
    """Approve a waiting request (agent=<name> id=<id> [reason="..."])."""
    return _task(task_approve.__doc__, decide, "approve")


def task_deny():
    """Deny a waiting request (agent=<name> id=<id> [reason="..."])."""
    return _task(task_deny.__doc__, decide, "deny")
