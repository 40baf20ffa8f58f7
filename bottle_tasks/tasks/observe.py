"""Seeing what a bottle decided, how it stands, and stepping into it:

    doit logs agent=<name> [follow=1] [kind=block,dlp,git,supervise,daemon] [since=10m] [json=1]
    doit status [agent=<name>]
    doit shell agent=<name> [user=root]

logs reads the audit stream in the state dir and status reads the engine once for every bottle, so
neither needs the bundle running. The parsing and the wording are bottle_tasks/observe.py and
bottle_tasks/bottle_status.py; this module gathers what they read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, TextIO

from doit import get_var

from bottle_tasks.errors import BottleError
from bottle_tasks.instances import Bottle, owner_of
from bottle_tasks.labels import SLUG_LABEL
from bottle_tasks.plan import GUEST_USER, Plan, audit_dir_of, policy_dir_of, workspace_volume_name
from bottle_tasks.tasks.common import (
    action, agent_task, backend, current_run, flag, selected_agent, selected_instance, settings,
)

if TYPE_CHECKING:
    from bottle_tasks.bottle_status import BottleFacts, Container, Machine, Workspace
    from bottle_tasks.docker_cli import Docker
    from bottle_tasks.fence_record import FenceRecord
    from bottle_tasks.observe import LogFilter
    from bottle_tasks.settings import Settings

__all__ = ["task_logs", "task_status", "task_shell"]

FOLLOW_INTERVAL = 0.25          # seconds between looks at a followed audit file
WALK_LIMIT = 200_000            # entries a workspace size walk visits before it says "at least"
BLOCKING = ("block", "deny")


# ---------------------------------------------------------------------------- logs


def print_logs(audit_dir: Path, keep: "LogFilter", *, follow: bool, as_json: bool, colour: bool, out: TextIO,
               notes: TextIO, stop: threading.Event, interval: float = FOLLOW_INTERVAL, zone=None) -> int:
    """Print the stored records keep lets through, then (follow) each new one until stop is set.
    Returns how many were printed."""
    from bottle_tasks.observe import render_line
    from bottle_tasks.sidecars.audit import AUDIT_FILE, AuditFile, follow_lines
    from bottle_tasks.supervise_cli import printable

    if not AuditFile(audit_dir).generations():
        waiting = "; waiting for the first (Ctrl-C to stop)" if follow else ""
        print(f"no audit records yet: {printable(audit_dir / AUDIT_FILE)} does not exist{waiting}", file=notes, flush=True)
        if not follow:
            return 0
    if follow:
        out.flush()     # what came before (doit's task line) shows before the wait
    else:
        stop.set()      # what is stored, then return
    shown = 0
    for raw in follow_lines(audit_dir, stop, interval):
        line = render_line(raw, keep, as_json=as_json, colour=colour, zone=zone)
        if line is not None:
            print(line, file=out, flush=follow)
            shown += 1
    return shown


def show_logs(plan: Plan) -> None:
    from bottle_tasks.observe import LogFilter, describe, parse_kinds, parse_since, use_colour
    from bottle_tasks.sidecars.audit import AuditFile

    raw_kinds, raw_since = get_var("kind", "") or "", get_var("since", "") or ""
    keep = LogFilter(parse_kinds(raw_kinds), parse_since(raw_since, datetime.now(timezone.utc)))
    follow, as_json = flag("follow"), flag("json")
    notes = sys.stderr if as_json else sys.stdout      # json=1 output stays parseable
    try:
        shown = print_logs(plan.audit_dir, keep, follow=follow, as_json=as_json,
                           colour=use_colour(sys.stdout, os.environ), out=sys.stdout, notes=notes,
                           stop=threading.Event())
    except KeyboardInterrupt:
        return
    except BrokenPipeError:     # `doit logs ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if not shown and AuditFile(plan.audit_dir).generations():
        matching = describe(keep, raw_kinds, raw_since)
        print(f"no audit records{' match ' + matching if matching else ''} for {plan.slug}", file=notes)


def task_logs():
    """The bottle's audit stream (agent=<name> [follow=1] [kind=block,dlp,git,supervise,daemon] [since=10m] [json=1])."""
    return agent_task(task_logs.__doc__, show_logs)


# ---------------------------------------------------------------------------- status


def bottle_state_dirs(root: Path) -> list[Path]:
    """The bottles' state dirs under settings' state dir: those holding what start writes."""
    from bottle_tasks.fence_record import FENCE_FILE

    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    return [p for p in children if any((p / marker).exists() for marker in ("config", "ca", "audit", FENCE_FILE))]


def list_machines(smolvm) -> tuple[dict[str, "Machine"], str]:
    """The bottles' machines by slug from one `machine ls --json`, or why smolvm could not say."""
    from bottle_tasks.bottle_status import Machine

    try:
        listed = smolvm.machines()
    except BottleError as exc:
        return {}, (str(exc).strip().splitlines() or ["smolvm failed"])[0]
    machines = (Machine.from_ls(obj) for obj in listed)
    return {m.slug: m for m in machines if m.slug}, ""


def workspace_of(slug: str, state_dir: Path, fence: "FenceRecord | None",
                 containers: Iterable["Container"]) -> "Workspace":
    """Where the workspace is: as start recorded it, else the docker guest's mount, else the
    backends' defaults (smolmachines: a dir in the state dir; docker: the bottle's volume)."""
    from bottle_tasks.backends.smolmachines import SmolmachinesBackend
    from bottle_tasks.bottle_status import Workspace

    if fence is not None and (fence.workspace_path or fence.workspace_volume):
        return Workspace(path=fence.workspace_path, volume=fence.workspace_volume)
    guest = next((c for c in containers if c.role == "guest" and c.mounts), None)
    if guest is not None:
        mount = guest.mounts[0]
        return Workspace(path=mount) if mount.startswith("/") else Workspace(volume=mount)
    default = SmolmachinesBackend.default_workspace(state_dir)
    return Workspace(path=str(default)) if default.is_dir() else Workspace(volume=workspace_volume_name(slug))


def volume_mountpoints(docker: "Docker", names: list[str]) -> dict[str, str]:
    """Mountpoint by volume name, in one `docker volume inspect` (a missing volume is just absent)."""
    if not names:
        return {}
    result = docker.query("volume", "inspect", *sorted(set(names)), check=False)
    try:
        found = json.loads(result.stdout) if result.stdout.strip().startswith("[") else []
    except ValueError:
        found = []
    return {v.get("Name", ""): v.get("Mountpoint", "") for v in found if isinstance(v, dict)}


def dir_size(root: Path, limit: int = WALK_LIMIT) -> tuple[int, bool]:
    """(bytes in the files under root, whether the walk stopped at limit entries); links are not followed."""
    total, seen, pending = 0, 0, [str(root)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                seen += 1
                if seen > limit:
                    return total, True
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total, False


def sized(workspace: "Workspace", mountpoints: dict[str, str]) -> "Workspace":
    from dataclasses import replace

    if workspace.path:
        root = Path(workspace.path)
    elif workspace.volume not in mountpoints:
        return replace(workspace, missing=True)
    else:
        root = Path(mountpoints[workspace.volume])
        if not os.access(root, os.R_OK | os.X_OK):
            return workspace        # root's, under /var/lib/docker: named, not measured
    if not root.is_dir():
        return replace(workspace, missing=True)
    size, capped = dir_size(root)
    return replace(workspace, size=size, capped=capped)


def route_counts(state_dir: Path) -> tuple[int | None, int | None]:
    """(routes in config/routes.yaml, routes approved for good in the policy overlay); None where unreadable."""
    import yaml

    from bottle_tasks.sidecars.overlay import OverlayError, load_overlay, overlay_path

    try:
        routes = (yaml.safe_load((state_dir / "config" / "routes.yaml").read_text(encoding="utf-8")) or {}).get("routes")
        declared = len(routes) if isinstance(routes, list) else None
    except (OSError, yaml.YAMLError, AttributeError):
        declared = None
    try:
        approved = len(load_overlay(overlay_path(policy_dir_of(state_dir))))
    except OverlayError:
        approved = None
    return declared, approved


def pending_approvals(state_dir: Path) -> int | None:
    from bottle_tasks.sidecars.supervise_store import Store, SuperviseError

    queue = state_dir / "supervise"
    if not queue.is_dir():
        return None
    try:
        return Store(queue).count_pending()
    except (OSError, SuperviseError):
        return None


def blocks_since(state_dir: Path, since: datetime) -> int | None:
    from bottle_tasks.sidecars.audit import records_since

    try:
        return sum(1 for record in records_since(audit_dir_of(state_dir), since) if record.get("decision") in BLOCKING)
    except OSError:
        return None


def first_health_verdict(docker: "Docker", container: "Container") -> "Container":
    """A bundle or fence holder docker has not checked yet (its checks are seconds apart) gets its
    check run now, as start does: one exec, only in the container's first seconds."""
    from dataclasses import replace

    from bottle_tasks.backends.bundle import HEALTH_COMMAND
    from bottle_tasks.backends.docker import FENCE_MARK

    checks = {"bundle": HEALTH_COMMAND, "fence": ("test", "-e", FENCE_MARK)}
    mark = "(health: starting)"
    if container.role not in checks or container.state != "running" or mark not in container.status:
        return container
    healthy = docker("exec", container.name, *checks[container.role], check=False).returncode == 0
    return replace(container, status=container.status.replace(mark, "(healthy)")) if healthy else container


def gather_status(s: "Settings", docker: "Docker", only: str | None, now: datetime,
                  smolvm=None, instance: str | None = None) -> list["BottleFacts"]:
    """Every bottle's facts: its containers (one docker ps for all), its machine (one smolvm call, only
    when a bottle may be on smolmachines), its workspace volume (one docker volume inspect), its files."""
    from bottle_tasks.backends.smolmachines import Smolvm
    from bottle_tasks.bottle_status import BottleFacts, might_be_smol, parse_ps
    from bottle_tasks.fence_record import read_fence

    listed = docker.query("ps", "-a", "--no-trunc", "--filter", f"label={SLUG_LABEL}", "--format", "{{json .}}")
    by_slug: dict[str, list] = {}
    for container in parse_ps(listed.stdout):
        if container.slug:
            by_slug.setdefault(container.slug, []).append(first_health_verdict(docker, container))
    state_dirs = {slug: Path(next((c.state_dir for c in found if c.state_dir), s.state_dir / slug))
                  for slug, found in by_slug.items()}
    for state_dir in bottle_state_dirs(s.state_dir):
        state_dirs.setdefault(state_dir.name, state_dir)
    owners = {slug: bottle_owner(slug, d) for slug, d in state_dirs.items()}
    if only:
        # agent=x: every instance of x; with name=y, that one.
        state_dirs = {slug: d for slug, d in state_dirs.items() if owners[slug].agent == only
                      and (instance is None or owners[slug].instance == instance)}
    fences = {slug: read_fence(d) for slug, d in state_dirs.items()}
    machines, problem = {}, ""
    if any(might_be_smol(by_slug.get(slug, ()), fences[slug]) for slug in state_dirs):
        machines, problem = list_machines(smolvm or Smolvm(s.smolvm_bin))
    workspaces = {slug: workspace_of(slug, d, fences[slug], by_slug.get(slug, ())) for slug, d in state_dirs.items()}
    mountpoints = volume_mountpoints(docker, [w.volume for w in workspaces.values() if w.volume])
    hour_ago = now - timedelta(hours=1)
    facts = []
    for slug, state_dir in state_dirs.items():
        routes, approved = route_counts(state_dir)
        facts.append(BottleFacts(
            slug=slug, agent=owners[slug].agent, instance=owners[slug].instance, state_dir=state_dir, containers=tuple(by_slug.get(slug, ())), machine=machines.get(slug),
            machines_problem=problem, fence=fences[slug], routes=routes, approved_routes=approved,
            pending=pending_approvals(state_dir), blocks_last_hour=blocks_since(state_dir, hour_ago),
            workspace=sized(workspaces[slug], mountpoints)))
    return facts


def bottle_owner(slug: str, state_dir: Path) -> Bottle:
    try:
        return owner_of(state_dir) or Bottle(slug)
    except BottleError:
        return Bottle(slug)


def show_status(only: str | None, instance: str | None = None) -> None:
    from bottle_tasks.bottle_status import format_status

    s = settings()
    now = datetime.now(timezone.utc)
    facts = gather_status(s, current_run().docker, only, now, instance=instance)
    if only and not facts:
        wanted = Bottle(only, instance or "")
        raise BottleError(f"no bottle {wanted.slug!r} on this machine{'' if instance else f' (nor any instance of agent {only!r})'}: "
                          f"no container labelled {SLUG_LABEL}={wanted.slug} and no state dir "
                          f"{s.state_dir / wanted.slug}; doit start {wanted.selector} starts one")
    print(format_status(facts, now))


def task_status():
    """Every bottle on this machine, or an agent's (agent=<name> [name=<instance>]): guest, bundle, fence, routes, approvals, blocks, workspace."""
    return {"doc": task_status.__doc__, "actions": [(action(show_status), [selected_agent(), selected_instance() or None])],
            "uptodate": [False], "verbosity": 2}


# ---------------------------------------------------------------------------- shell

# bash as a login shell where the image has it; the POSIX shell otherwise.
SHELL_SCRIPT = "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l"


def shell_argv(plan: Plan, user: str, tty: bool) -> list[str]:
    if user not in (GUEST_USER, "root"):
        raise BottleError(f"user={user}: the shell runs as {GUEST_USER} (leave user= out) or as root (user=root)")
    guest = backend(plan).guest(plan)
    if guest.identity() is None:
        raise BottleError(f"bottle {plan.slug} is not running: doit start {plan.selector} first, "
                          f"then doit shell {plan.selector}")
    return guest.exec_argv(["sh", "-c", SHELL_SCRIPT], user=user, tty=tty)


def open_shell(plan: Plan) -> None:
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    argv = shell_argv(plan, (get_var("user", "") or GUEST_USER).strip(), tty)
    subprocess.call(argv)   # the shell's own exit status is the user's business, not a failed task


def task_shell():
    """An interactive shell in the guest, as the agent (agent=<name> [user=root])."""
    return agent_task(task_shell.__doc__, open_shell)
