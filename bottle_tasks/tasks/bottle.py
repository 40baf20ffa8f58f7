"""The bottle's stages, per agent: preflight, render, ca, networks, bundle, guest, provision."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from doit.tools import config_changed

from bottle_tasks import locks
from bottle_tasks.errors import BottleError
from bottle_tasks.backends.host_subnets import drop_claim
from bottle_tasks.instances import check_slug_free, instances_on_disk, write_record
from bottle_tasks.fence_record import forget_fence, write_fence
from bottle_tasks.plan import Plan
from bottle_tasks.provision import SUPERVISE_HOOK_SOURCE, provision
from bottle_tasks.render import TEMPLATES_DIR, render_files
from bottle_tasks.sidecars.audit import AUDIT_FILE, AuditFile
from bottle_tasks.sidecars.supervise_store import Store
from bottle_tasks.tasks.common import (
    ONE_BOTTLE, action, agent_files, backend, current_run, files_under, flag, plans, probe, purge_requested, settings,
)
from bottle_tasks.tasks.config import doit_db_of
from bottle_tasks.tasks.images import pipelock_ok

__all__ = ["task_preflight", "task_render", "task_ca", "task_networks", "task_bundle", "task_guest", "task_provision"]


def secret_values(plan: Plan) -> dict[str, str]:
    """The host values of the secrets the bundle needs; a missing one stops start before anything is built."""
    values: dict[str, str] = {}
    for secret in plan.secret_envs:
        value = os.environ.get(secret.name)
        if not value:
            raise BottleError(
                f"{secret.name} is not set in the host environment, but {plan.spec_path} needs it ({secret.key}). "
                f"Export it (export {secret.name}=...) or remove that key, then start again.")
        values[secret.name] = value
    return values


def agent_line(plan: Plan) -> str:
    """Which agent file start reads and where it sends host tokens: ./agents comes before the
    user's config dir, so a repository's own agents/ could otherwise steer a token unseen."""
    tokens = ", ".join(f"{s.name} -> {s.destination}" for s in plan.secret_envs) or "none"
    instance = f", instance {plan.instance} (bottle {plan.slug})" if plan.instance else ""
    return f"agent {plan.agent}{instance}: {plan.spec_path} (host tokens: {tokens})"


LEARN_WARNING = ("warning: learn mode (network.unknown_hosts: learn): {slug} may reach any public host, each one "
                 "allowed and recorded (doit policy suggest {selector} turns them into routes; set deny to lock down)")


def preflight(plan: Plan) -> None:
    if flag("all"):
        raise BottleError(ONE_BOTTLE)
    # One run at a time brings a bottle up; a second start of it waits here, before anything is built,
    # and then finds its stages up to date. Held until the stages are done (start lets go before the
    # agent takes the terminal) or the run ends.
    hold_bottle(plan)
    print(agent_line(plan))
    if plan.unknown_hosts == "learn":
        print(LEARN_WARNING.format(slug=plan.slug, selector=plan.selector))
    secret_values(plan)
    pipelock_ok(plan, settings())
    for key, value in plan.guest.env:
        if "\n" in value:
            raise BottleError(f"{plan.spec_path}: env.{key}: the value spans several lines; use one line")
    backend(plan).preflight(plan)
    # load_plan checked the slug without the lock; two bottles that share it (agent=a name=b-c and
    # agent=a-b name=c) share this lock too, so the second to get here finds the first one's record.
    check_slug_free(plan.bottle, plan.state_dir.parent, (p.stem for p in agent_files(settings())))
    ensure_state_dir(plan)
    write_record(plan.state_dir, plan.bottle)     # claims the slug for this agent and instance


def bottle_lock(plan: Plan) -> Path:
    return locks.lock_path(plan.cache_root, f"bottle-{plan.slug}")


def hold_bottle(plan: Plan) -> None:
    """The bottle's lock, for this run (start and clean take it; a second one waits, saying so)."""
    locks.acquire(bottle_lock(plan), f"bottle {plan.slug} (another doit start or clean of it)")


def task_preflight():
    """Check what start needs before anything is built: tokens, pipelock, docker, free names and subnet."""
    for plan in plans():
        yield {"name": plan.slug, "actions": [(action(preflight), [plan])], "uptodate": [False], "verbosity": 2}


def ensure_state_dir(plan: Plan) -> None:
    """The bottle's state dir holds the CA key, tool input and mirrors: the host user's alone (0700),
    also when an earlier version or a umask made it wider."""
    plan.state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    plan.state_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(plan.state_dir, 0o700)


def render_configs(plan: Plan) -> None:
    """Every file of plan.rendered_files (the bundle's list and the guest's), from its template."""
    ensure_state_dir(plan)
    render_files(plan.rendered_files, plan)
    ensure_audit_dir(plan)
    if plan.git:
        plan.git.gate_dir.mkdir(parents=True, exist_ok=True)
        plan.git.mirrors_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if plan.approvals_dir:
        # Created by the host user, so decisions written from the host never meet root-owned dirs.
        Store(plan.approvals_dir).ensure_layout()
    plan.policy_dir.mkdir(mode=0o700, exist_ok=True)   # mounted into the bundle: it must exist


def ensure_audit_dir(plan: Plan) -> None:
    """The audit dir the bundle's sink writes (the host user's, so the sink becomes that user), and
    <state>/audit.jsonl, a link to the current file, for a plain `tail -F`."""
    AuditFile(plan.audit_dir).ensure()
    link = plan.state_dir / AUDIT_FILE
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(Path(plan.audit_dir.name) / AUDIT_FILE)


def _remove_files(paths) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def task_render():
    """Render every config file the bundle and the guest read from the Jinja templates."""
    for plan in plans():
        targets = [f.host_path for f in plan.rendered_files]
        yield {
            "name": plan.slug,
            "file_dep": [str(plan.spec_path), *files_under(TEMPLATES_DIR)],
            "targets": [str(t) for t in targets],
            "actions": [(action(render_configs), [plan])],
            "uptodate": [config_changed(hashlib.sha256(repr(plan).encode()).hexdigest())],
            "clean": [(action(_remove_files), [targets])],
        }


def _mint_ca(plan: Plan) -> None:
    from bottle_tasks.ca import mint_ca  # cryptography loads only when a CA is minted

    ensure_state_dir(plan)
    mint_ca(plan.ca_cert, plan.ca_key, f"claude-bottle {plan.slug} CA")


def task_ca():
    """Mint the bottle's CA (ECDSA P-256, SEC1 key 0600); kept across restarts."""
    for plan in plans():
        yield {
            "name": plan.slug,
            "targets": [str(plan.ca_cert), str(plan.ca_key)],
            "actions": [(action(_mint_ca), [plan])],
            "uptodate": [lambda plan=plan: plan.ca_cert.exists() and plan.ca_key.exists()],
        }


def task_networks():
    """Create the bottle's docker networks (docker: internal and egress; smolmachines: the bridge)."""
    for plan in plans():
        be = backend(plan)
        yield {
            "name": plan.slug,
            "task_dep": [f"preflight:{plan.slug}"],
            "actions": [(action(be.create_networks), [plan])],
            "uptodate": [(probe(be.networks_ready), [plan])],
            "clean": [(action(be.remove_networks), [plan])],
        }


def start_bundle(plan: Plan) -> None:
    backend(plan).start_bundle(plan, secret_values(plan))


def task_bundle():
    """Start the sidecar bundle and wait until it reports healthy."""
    for plan in plans():
        be = backend(plan)
        yield {
            "name": plan.slug,
            "task_dep": [f"preflight:{plan.slug}", "bundle_build", f"render:{plan.slug}", f"ca:{plan.slug}", f"networks:{plan.slug}"],
            "actions": [(action(start_bundle), [plan])],
            "uptodate": [(probe(be.bundle_ready), [plan])],
            "clean": [(action(be.remove_bundle), [plan])],
        }


def _start_guest(plan: Plan) -> dict:
    be = backend(plan)
    be.start_guest(plan)        # proves the fence, or fails and leaves no guest
    epoch = be.fence_epoch(plan)
    write_fence(plan, epoch)    # for doit status: when, and on which boot
    return {"fenced_start": epoch}


def _guest_current(task, values, plan: Plan) -> bool:
    # The fence is proved at start; a guest started by anything but this task (a restart of the
    # container, a machine replaced behind our back) is recreated and fenced again.
    be = backend(plan)
    return be.guest_ready(plan) and values.get("fenced_start") == be.fence_epoch(plan)


def task_guest():
    """Create and start the guest, fenced to the bundle's guest ports (a container, or a smolvm microVM)."""
    for plan in plans():
        be = backend(plan)
        yield {
            "name": plan.slug,
            # Preflight first: doit runs a task's deps in order, so a check that fails costs no image build.
            "task_dep": [f"preflight:{plan.slug}", be.guest_image_task(plan), f"bundle:{plan.slug}"],
            "actions": [(action(_start_guest), [plan])],
            "uptodate": [(probe(_guest_current), [plan])],
            "clean": [(action(be.remove_guest), [plan]), (action(forget_fence), [plan])],
        }


def provision_inputs(plan: Plan) -> str:
    """Everything provisioning puts into the guest: a change to any of it provisions again."""
    h = hashlib.sha256(repr((plan.prompt, plan.skills, plan.git, plan.supervise)).encode())
    h.update(plan.ca_cert.read_bytes() if plan.ca_cert.exists() else b"-")
    extra = [SUPERVISE_HOOK_SOURCE] if plan.supervise else []
    for path in files_under(*plan.skills, *extra, *(f.host_path for f in plan.guest_files)):
        h.update(path.encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _provisioned(task, values, plan: Plan) -> bool:
    guest = backend(plan).guest(plan)
    return values.get("container") == guest.identity() and values.get("inputs") == provision_inputs(plan)


def _provision(plan: Plan) -> dict:
    guest = backend(plan).guest(plan)
    provision(plan, guest)
    return {"container": guest.identity(), "inputs": provision_inputs(plan)}


def task_provision():
    """Put the CA, the prompt, the skills, the git clones and the supervise hook into the guest."""
    for plan in plans():
        yield {
            "name": plan.slug,
            "task_dep": [f"guest:{plan.slug}"],
            "actions": [(action(_provision), [plan])],
            "uptodate": [(probe(_provisioned), [plan])],
        }


def purge_state(plan: Plan) -> None:
    """Only an explicit purge deletes work: the workspace volume and the state dir."""
    if not purge_requested():
        return
    if plan.guest.workspace_volume:
        current_run().docker("volume", "rm", "-f", plan.guest.workspace_volume, check=False)
    shutil.rmtree(plan.state_dir, ignore_errors=True)
    shutil.rmtree(plan.cache_dir, ignore_errors=True)
    drop_claim(plan.cache_root, plan.slug)
    if flag("all"):     # this run's DB is the agent's own then; a bottle's own DB is never removed under its run
        doit_db_of(plan.cache_root, plan.slug).unlink(missing_ok=True)
    if plan.git and not instances_on_disk(plan.agent, plan.state_dir.parent):
        shutil.rmtree(plan.git.mirrors_dir, ignore_errors=True)    # the last bottle of the agent took its mirrors
