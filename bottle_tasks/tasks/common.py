"""What every task module shares: which agents are selected, their plans, and the action wrapper
that turns a BottleError into a clean doit failure (a message, never a traceback)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Iterator

from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks.docker_cli import snapshot
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan, backend_of, make_plan, slug_for, smol_bridge_name
from bottle_tasks.settings import Settings
from bottle_tasks.spec import load_spec


def settings() -> Settings:
    return Settings.from_env()


def selected_agent() -> str | None:
    # get_var returns None outside `doit` (doit issue #241); treat that as "no agent chosen".
    return get_var("agent", None) or None


def agent_files(s: Settings) -> list[Path]:
    return sorted(s.agents_dir.glob("*.yaml"))


def plans() -> Iterator[Plan]:
    """The plan of agent=<name>, or of every valid agent file when none is chosen (doit list)."""
    s = settings()
    agent = selected_agent()
    if agent:
        path = s.agents_dir / f"{agent}.yaml"
        plan = _plan_or_exit(path, s)
        snapshot.watch(plan.guest.container, plan.bundle.container, *(b.name for b in plan.network.bridges),
                       plan.agent_image.tag, plan.bundle_image.tag)
        yield plan
        return
    for path in agent_files(s):
        try:
            yield _plan_cached(path, s)
        except BottleError:
            continue  # `doit list` shows the valid agents; `agent=<bad>` reports the error


@functools.cache
def _plan_cached(path: Path, s: Settings) -> Plan:
    return load_plan(path, s)


def load_plan(path: Path, s: Settings) -> Plan:
    spec = load_spec(path, cache_dir=s.cache_dir)
    if backend_of(spec, s) == "smolmachines":
        # The bridge's subnet steps around networks and routes already on the host (I/O kept out of the plan).
        from bottle_tasks.backends.smolmachines import subnets_in_use

        taken, current = subnets_in_use(smol_bridge_name(slug_for(spec.name)))
        return make_plan(spec, s, taken, current)
    return make_plan(spec, s)


def _plan_or_exit(path: Path, s: Settings) -> Plan:
    try:
        return _plan_cached(path, s)
    except BottleError as exc:
        print(f"claude-bottle: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def action(fn: Callable[..., object], *, read_only: bool = False) -> Callable[..., object]:
    """Wrap a python action: BottleError becomes TaskFailed with its message.

    An action that changes docker state must not read the probes' snapshot; a read-only one may.
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        snapshot.paused += 0 if read_only else 1
        try:
            result = fn(*args, **kwargs)
        except BottleError as exc:
            return TaskFailed(str(exc))
        finally:
            if not read_only:
                snapshot.paused -= 1
                snapshot.stale()
        return result if isinstance(result, dict) else None
    return wrapped


def probe(fn: Callable[..., bool]) -> Callable[..., bool]:
    """An uptodate check that probes live state; any error means "not up to date", and the action reports it.

    functools.wraps keeps fn's signature visible, so doit still passes `task`/`values` when fn asks.
    """
    @functools.wraps(fn)
    def check(*args, **kwargs) -> bool:
        try:
            return bool(fn(*args, **kwargs))
        except BottleError:
            return False
    return check


def files_under(*roots: Path) -> list[str]:
    out: list[str] = []
    for root in roots:
        if root.is_file():
            out.append(str(root))
        elif root.is_dir():
            out += sorted(str(p) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return out


def backend(plan: Plan):
    """The module that runs this plan's guest; both expose the same functions."""
    if plan.backend == "smolmachines":
        from bottle_tasks.backends import smolmachines
        return smolmachines
    from bottle_tasks.backends import docker
    return docker


def purge_requested() -> bool:
    return (get_var("purge", "") or "").lower() in ("1", "yes", "true")
