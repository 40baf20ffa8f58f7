"""Host side of supervise: list what waits for a decision, approve or deny it.

    doit supervise agent=<name> [watch=1]
    doit approve agent=<name> id=<request id> [scope=once|always] [reason="..."]
    doit deny agent=<name> id=<request id> [reason="..."]

What waits: tool calls the agent file's supervise section names, pushes git-gate holds, and requests
egress holds for a host the agent file does not route (network: {unknown_hosts: ask}). scope=always,
for egress's requests only, routes that host and port from now on (the bottle's policy overlay;
`doit policy show|promote` lists it and prints it for the agent file).

Decisions are files in the bottle's state dir; the bundle need not be running.
"""

from __future__ import annotations

from pathlib import Path

from doit import get_var

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan
from bottle_tasks.sidecars.supervise_store import SCOPES
from bottle_tasks.tasks.common import agent_task, flag

__all__ = ["task_supervise", "task_approve", "task_deny"]


def approvals_dir(plan: Plan) -> Path:
    if plan.approvals_dir is None:
        raise BottleError(f"{plan.spec_path} has no supervise section and network.unknown_hosts is not ask, so "
                          "nothing waits for approval; add supervise: {tools: [...]} or network: {unknown_hosts: ask}")
    return plan.approvals_dir


def list_pending(plan: Plan) -> None:
    from bottle_tasks import supervise_cli
    from bottle_tasks.sidecars.supervise_store import SuperviseError

    state = approvals_dir(plan)
    try:
        if flag("watch"):
            supervise_cli.watch(state, interval=1.0, notify=True)
        else:
            print(supervise_cli.format_pending(state))
    except SuperviseError as error:
        raise BottleError(supervise_cli.printable(error)) from None


def decide(plan: Plan, decision: str) -> None:
    from bottle_tasks import supervise_cli
    from bottle_tasks.sidecars.overlay import overlay_path
    from bottle_tasks.sidecars.supervise_store import SuperviseError

    request_id = get_var("id", None)
    if not request_id:
        raise BottleError(f"say which request: doit {decision} {plan.selector} id=<id> "
                          f"(doit supervise {plan.selector} lists them)")
    scope = _scope(plan, decision)
    state = approvals_dir(plan)
    author = supervise_cli.default_author()
    reason = get_var("reason", "") or ""
    try:
        if scope == "always":
            overlay = overlay_path(plan.policy_dir)
            _request, change = supervise_cli.approve_always(state, overlay, request_id, author, reason)
            print(supervise_cli.printable(
                f"approved {request_id} as {author}, for good: {change.host} port {change.port} is in the policy "
                f"overlay {overlay}, and egress routes it from now on "
                f"(doit policy promote {plan.selector} prints it for the agent file)"))
            return
        supervise_cli.decide(state, request_id, decision, author, reason, scope)
    except SuperviseError as error:
        raise BottleError(supervise_cli.printable(error)) from None
    print(supervise_cli.printable(f"{ {'approve': 'approved', 'deny': 'denied'}[decision]} {request_id} as {author}"))


def _scope(plan: Plan, decision: str) -> str | None:
    """scope= of the command line: approvals only, once unless it says always."""
    scope = get_var("scope", None) or None
    if decision != "approve":
        if scope is not None:
            raise BottleError(f"scope= is for approvals: doit approve {plan.selector} id=<id> scope=always")
        return None
    scope = scope or "once"
    if scope not in SCOPES:
        raise BottleError(f"scope={scope} is not one of {', '.join(SCOPES)}: once approves this request, "
                          "always also routes its host from now on (egress's requests only)")
    return scope


def task_supervise():
    """List the requests waiting for a human decision (agent=<name> [watch=1])."""
    return agent_task(task_supervise.__doc__, list_pending)


def task_approve():
    """Approve a waiting request (agent=<name> id=<id> [scope=once|always] [reason="..."])."""
    return agent_task(task_approve.__doc__, decide, "approve")


def task_deny():
    """Deny a waiting request (agent=<name> id=<id> [reason="..."])."""
    return agent_task(task_deny.__doc__, decide, "deny")
