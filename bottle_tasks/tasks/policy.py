"""The bottle's routes: what it may reach, what a human added, and what learn mode saw.

    doit policy show agent=<name>      the agent file's routes and the policy overlay's (who approved, when)
    doit policy promote agent=<name>   the overlay's routes as YAML for the agent file's routes:
    doit policy suggest agent=<name>   routes for what learn mode (network: {unknown_hosts: learn}) let through

The overlay holds what `doit approve ... scope=always` added (sidecars/overlay.py); suggest reads the
audit stream. Both are files in the bottle's state dir: the bundle need not be running.
"""

from __future__ import annotations

import sys

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan
from bottle_tasks.tasks.common import agent_task

__all__ = ["task_policy"]

COMMANDS = ("show", "promote", "suggest")


def policy(plan: Plan, args: list[str]) -> None:
    from bottle_tasks import policy_view
    from bottle_tasks.sidecars.audit import read_records
    from bottle_tasks.sidecars.overlay import OverlayError, overlay_path, read_overlay
    from bottle_tasks.supervise_cli import printable

    if len(args) != 1 or args[0] not in COMMANDS:
        raise BottleError(printable(
            f"say which: doit policy show|promote|suggest {plan.selector} (got {' '.join(args) or 'none'}); "
            "show lists the routes, promote prints the overlay's for the agent file, suggest prints routes "
            "for what learn mode let through"))
    overlay_file = overlay_path(plan.policy_dir)
    try:
        overlay = read_overlay(overlay_file)
        if args[0] == "show":
            text = policy_view.show(plan.selector, plan.spec_path, plan.unknown_hosts, plan.routes, overlay_file, overlay)
        elif args[0] == "promote":
            text = policy_view.promote(plan.selector, plan.spec_path, overlay_file, overlay)
        else:
            text = policy_view.suggest(plan.selector, plan.spec_path, plan.audit_dir, read_records(plan.audit_dir),
                                       (*plan.routes, *overlay.routes))
    except OverlayError as error:
        raise BottleError(printable(error)) from None
    except OSError as error:
        raise BottleError(printable(f"{plan.audit_dir}: cannot read the audit stream: {error.strerror or error}")) from None
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def task_policy():
    """The bottle's routes: show, promote the overlay's, or suggest from learn mode (show|promote|suggest agent=<name>)."""
    return agent_task(task_policy.__doc__, policy, pos_arg="args")
