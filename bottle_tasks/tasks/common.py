"""What every task module shares: the run (settings, the docker client, plans and backends), which agents
are selected, and the action wrapper that turns a BottleError into a clean doit failure (a message,
never a traceback)."""

from __future__ import annotations

import functools
import ipaddress
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from doit import get_var
from doit.exceptions import TaskFailed

from bottle_tasks import agents, instances, locks
from bottle_tasks.backends.host_subnets import HostSubnets, with_claims, write_claim
from bottle_tasks.backends import backend_class
from bottle_tasks.backends.base import Backend
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import AGENT_LABEL, INSTANCE_LABEL, STATE_LABEL
from bottle_tasks.plan import Plan, backend_name, make_plan
from bottle_tasks.settings import Settings
from bottle_tasks.spec import load_spec


class Run:
    """One doit run: its settings, one docker client (inspect results cached until a command changes
    state), and each bottle's plan and backend, computed once."""

    def __init__(self, settings: Settings | None = None, docker: Docker | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.docker = docker or Docker()
        self._plans: dict[tuple[Path, str], Plan] = {}
        self._backends: dict[str, Backend] = {}

    def plan(self, path: Path, instance: str = "") -> Plan:
        if (path, instance) not in self._plans:
            self._plans[path, instance] = load_plan(path, self.settings, self.docker, instance)
        return self._plans[path, instance]

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


# What a command that acts on one bottle says to all=1.
ONE_BOTTLE = "say which bottle: agent=<name> [name=<instance>]; all=1 is for clean"


def selected_instance() -> str:
    """name=: the instance of the agent ("" for its default bottle)."""
    return get_var("name", None) or ""


def agent_files(s: Settings) -> list[Path]:
    return agents.agent_files(s.agents_dirs)


def plans() -> Iterator[Plan]:
    """The plan of agent=<name> [name=<instance>] (with all=1: of every instance of the agent), or,
    when no agent is chosen (doit list), of every valid agent file's bottles on this host."""
    run = current_run()
    agent = selected_agent()
    if agent:
        if flag("all") and selected_instance():
            _exit(f"say name=<instance> or all=1, not both (all=1 means every instance of agent {agent})")
        names = instances_of(agent, run) if flag("all") else [selected_instance()]
        for name in names:
            plan = _plan_or_exit(run, lambda: agents.find_agent_file(agent, run.settings.agents_dirs), name)
            run.docker.watch(*run.backend(plan).watch_names(plan))
            yield plan
        return
    if selected_instance():
        _exit("name= picks an instance of an agent: say which agent too (agent=<name> name=<instance>)")
    for path in agent_files(run.settings):
        # the default bottle (what `doit start agent=<name>` makes), then the instances this host has
        for name in dict.fromkeys(["", *instances.instances_on_disk(path.stem, run.settings.state_dir)]):
            try:
                yield run.plan(path, name)
            except BottleError:
                continue  # `doit list` shows the valid bottles; `agent=<bad>` reports the error


def instances_of(agent: str, run: Run) -> list[str]:
    """Every instance of agent this host has: a state dir, or anything docker holds with its labels.
    The default bottle comes first, and always: all=1 also cleans what an old run left unlabelled."""
    found = set(instances.instances_on_disk(agent, run.settings.state_dir))
    for labels in run.docker.labels_of_all(f"{AGENT_LABEL}={agent}"):
        # Only this host's bottles: another checkout's state dir is not ours to plan or clean.
        if Path(labels.get(STATE_LABEL, "")).parent == run.settings.state_dir:
            found.add(labels.get(INSTANCE_LABEL, ""))
    return ["", *sorted(found - {""})]


def load_plan(path: Path, s: Settings, docker: Docker | None = None, instance: str = "") -> Plan:
    """The bottle's plan, with what its backend must know about the host gathered first. Under the
    host-wide subnet lock: gather, plan, and claim the subnet chosen, so a start planning at the same
    moment steps around it (backends/host_subnets.py)."""
    spec = load_spec(path, cache_dir=s.cache_dir)
    bottle = instances.bottle_of(spec.name, instance)
    instances.check_slug_free(bottle, s.state_dir, (p.stem for p in agent_files(s)))
    kind = backend_class(backend_name(spec, s))
    with locks.holding(locks.lock_path(s.cache_dir, "subnets"), "subnet allocation"):
        facts = kind.host_facts(bottle.slug, docker or Docker())
        if isinstance(facts, HostSubnets):
            facts = with_claims(facts, s.cache_dir, bottle.slug)
        plan = make_plan(spec, s, facts, instance)
        if isinstance(facts, HostSubnets) and not plan.network.problem:
            # the block the allocator chose (docker: one /23 of two /24 bridges), as the next plan's current
            block = ipaddress.collapse_addresses(ipaddress.ip_network(b.subnet) for b in plan.network.bridges)
            write_claim(s.cache_dir, plan.slug, tuple(str(net) for net in block))
    return plan


def _exit(message: str) -> NoReturn:
    print(f"claude-bottle: {message}", file=sys.stderr)
    raise SystemExit(2)


def _plan_or_exit(run: Run, find: Callable[[], Path], instance: str = "") -> Plan:
    try:
        return run.plan(find(), instance)
    except BottleError as exc:
        _exit(str(exc))


def agent_task(doc: str, fn: Callable[..., object], *args: object, **task: object) -> dict | None:
    """A task for the one agent=<name> (supervise, approve, policy): fn(plan, *args) as its action;
    without agent=, a task that fails saying so. task: more keys of the task dict (pos_arg)."""
    if selected_agent() is None:
        return {"doc": doc, "actions": [lambda: TaskFailed("say which agent: agent=<name>")], "uptodate": [False],
                **task}
    if flag("all"):   # these act on one bottle's queue, overlay or stream: never pick one silently
        return {"doc": doc, "actions": [lambda: TaskFailed(ONE_BOTTLE)], "uptodate": [False], **task}
    for plan in plans():
        return {"doc": doc, "actions": [(action(fn), [plan, *args])], "uptodate": [False], "verbosity": 2, **task}
    return None  # not reached: plans() yields the chosen bottle's plan or exits


def per_agent(all_plans) -> list[Plan]:
    """One plan per agent file: for the stages its bottles share (the agent image)."""
    first: dict[str, Plan] = {}
    for plan in all_plans:
        first.setdefault(plan.agent, plan)
    return list(first.values())


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
