"""What every task module shares: the run (settings, the docker client, plans and backends), which agents
are selected, and the action wrapper that turns a BottleError into a clean doit failure (a message,
never a traceback)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Iterator

from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks import agents
from bottle_tasks.backends import backend_class
from bottle_tasks.backends.base import Backend
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan, backend_name, make_plan
from bottle_tasks.settings import Settings
from bottle_tasks.spec import load_spec


class Run:
    """One doit run: its settings, one docker client (inspect results cached until a command changes
    state), and each agent's plan and backend, computed once."""

    def __init__(self, settings: Settings | None = None, docker: Docker | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.docker = docker or Docker()
        self._plans: dict[Path, Plan] = {}
        self._backends: dict[str, Backend] = {}

    def plan(self, path: Path) -> Plan:
        if path not in self._plans:
            self._plans[path] = load_plan(path, self.settings, self.docker)
        return self._plans[path]

    def backend(self, plan: Plan) -> Backend:
        if plan.backend not in self._backends:
            self._backends[plan.backend] = backend_class(plan.backend)(self.docker)
        return self._backends[plan.backend]


_run: Run | None = None


def current_run() -> Run:
    global _run
    if _run is None:
        _run = Run()
    return _run


def new_run() -> Run:
    """Start a fresh run (the `bottle` command does, before each command it runs)."""
    global _run
    _run = Run()
    return _run


def settings() -> Settings:
    return current_run().settings


def backend(plan: Plan) -> Backend:
    return current_run().backend(plan)


def selected_agent() -> str | None:
    # get_var returns None outside `doit` (doit issue #241); treat that as "no agent chosen".
    return get_var("agent", None) or None


def agent_files(s: Settings) -> list[Path]:
    return agents.agent_files(s.agents_dirs)


def plans() -> Iterator[Plan]:
    """The plan of agent=<name>, or of every valid agent file when none is chosen (doit list)."""
    run = current_run()
    agent = selected_agent()
    if agent:
        plan = _plan_or_exit(run, lambda: agents.find_agent_file(agent, run.settings.agents_dirs))
        run.docker.watch(*run.backend(plan).watch_names(plan))
        yield plan
        return
    for path in agent_files(run.settings):
        try:
            yield run.plan(path)
        except BottleError:
            continue  # `doit list` shows the valid agents; `agent=<bad>` reports the error


def load_plan(path: Path, s: Settings, docker: Docker | None = None) -> Plan:
    """The agent file's plan, with what its backend must know about the host gathered first."""
    spec = load_spec(path, cache_dir=s.cache_dir)
    kind = backend_class(backend_name(spec, s))
    return make_plan(spec, s, kind.host_facts(spec.name, docker or Docker()))


def _plan_or_exit(run: Run, find: Callable[[], Path]) -> Plan:
    try:
        return run.plan(find())
    except BottleError as exc:
        print(f"claude-bottle: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def agent_task(doc: str, fn: Callable[..., object], *args: object, **task: object) -> dict | None:
    """A task for the one agent=<name> (supervise, approve, policy): fn(plan, *args) as its action;
    without agent=, a task that fails saying so. task: more keys of the task dict (pos_arg)."""
    if selected_agent() is None:
        return {"doc": doc, "actions": [lambda: TaskFailed("say which agent: agent=<name>")], "uptodate": [False],
                **task}
    for plan in plans():
        return {"doc": doc, "actions": [(action(fn), [plan, *args])], "uptodate": [False], "verbosity": 2, **task}
    return None  # not reached: plans() yields the chosen agent's plan or exits


def action(fn: Callable[..., object]) -> Callable[..., object]:
    """Wrap a python action: BottleError becomes TaskFailed with its message."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except BottleError as exc:
            return TaskFailed(str(exc))
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


def flag(name: str) -> bool:
    return (get_var(name, "") or "").lower() in ("1", "yes", "true")


def purge_requested() -> bool:
    return flag("purge")
