"""The bottle's stages, per agent: preflight, render, ca, networks, bundle, guest, provision."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil

from doit.tools import config_changed

from bottle_tasks.docker_cli import docker
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import GUEST_SUPERVISE_CONFIG, GUEST_SUPERVISE_HOOK, Plan
from bottle_tasks.sidecars.supervise_store import Store
from bottle_tasks.supervise_cli import hook_matcher
from bottle_tasks.provision import SUPERVISE_HOOK_SOURCE, provision
from bottle_tasks.render import TEMPLATES_DIR, render, write_atomic
from bottle_tasks.tasks.common import action, backend, files_under, plans, probe, purge_requested, settings
from bottle_tasks.tasks.images import pipelock_ok

__all__ = ["task_preflight", "task_render", "task_ca", "task_networks", "task_bundle", "task_guest", "task_provision"]


def token_env(plan: Plan) -> dict[str, str]:
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


def preflight(plan: Plan) -> None:
    token_env(plan)
    pipelock_ok(plan, settings())
    for key, value in plan.guest.env:
        if "\n" in value:
            raise BottleError(f"{plan.spec_path}: env.{key}: the value spans several lines; use one line")
    backend(plan).preflight(plan)


def task_preflight():
    """Check what start needs before anything is built: tokens, pipelock, docker, free names and subnet."""
    for plan in plans():
        yield {"name": plan.agent, "actions": [(action(preflight, read_only=True), [plan])], "uptodate": [False]}


def _scan_token(plan: Plan) -> str:
    """The bundle-internal bearer token between egress and pipelock's scan API; stable per bottle."""
    path = plan.state_dir / "pipelock-scan-token"
    if not path.exists():
        write_atomic(path, secrets.token_urlsafe(32), mode=0o600)
    return path.read_text().strip()


def render_configs(plan: Plan) -> None:
    write_atomic(plan.routes_file, render("routes.yaml.j2", plan))
    if plan.pipelock_enabled:
        write_atomic(plan.pipelock_file, render("pipelock.yaml.j2", plan, scan_token=_scan_token(plan)), mode=0o600)
    write_atomic(plan.guest_env_file, render("guest.env.j2", plan), mode=0o600)
    write_atomic(plan.prompt_file, plan.prompt, mode=0o600)
    if plan.git:
        write_atomic(plan.git.config_file, render("git-gate.yaml.j2", plan))
        plan.git.mirrors_dir.mkdir(parents=True, exist_ok=True)
    if plan.supervise:
        write_atomic(plan.supervise.config_file, render("supervise.yaml.j2", plan))
        write_atomic(plan.supervise.guest_config_file, render("supervise.json.j2", plan))
        write_atomic(plan.supervise.claude_settings_file, render(
            "claude-managed-settings.json.j2", plan, hook_matcher=hook_matcher(plan.supervise.tools),
            guest_supervise_hook=GUEST_SUPERVISE_HOOK, guest_supervise_config=GUEST_SUPERVISE_CONFIG))
        # Created by the host user, so decisions written from the host never meet root-owned dirs.
        Store(plan.supervise.state_dir).ensure_layout()


def _remove_files(paths) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def task_render():
    """Render routes.yaml, pipelock.yaml and the guest env from the Jinja templates."""
    for plan in plans():
        targets = [plan.routes_file, plan.guest_env_file, plan.prompt_file]
        targets += [plan.pipelock_file] if plan.pipelock_enabled else []
        targets += [plan.git.config_file] if plan.git else []
        targets += ([plan.supervise.config_file, plan.supervise.guest_config_file, plan.supervise.claude_settings_file]
                    if plan.supervise else [])
        yield {
            "name": plan.agent,
            "file_dep": [str(plan.spec_path), *files_under(TEMPLATES_DIR)],
            "targets": [str(t) for t in targets],
            "actions": [(action(render_configs), [plan])],
            "uptodate": [config_changed(hashlib.sha256(repr(plan).encode()).hexdigest())],
            "clean": [(action(_remove_files), [targets])],
        }


def _mint_ca(plan: Plan) -> None:
    from bottle_tasks.ca import mint_ca  # cryptography loads only when a CA is minted

    mint_ca(plan.ca_cert, plan.ca_key, f"claude-bottle {plan.slug} CA")


def task_ca():
    """Mint the bottle's CA (ECDSA P-256, SEC1 key 0600); kept across restarts."""
    for plan in plans():
        yield {
            "name": plan.agent,
            "targets": [str(plan.ca_cert), str(plan.ca_key)],
            "actions": [(action(_mint_ca), [plan])],
            "uptodate": [lambda plan=plan: plan.ca_cert.exists() and plan.ca_key.exists()],
        }


def task_networks():
    """Create the internal network (guest + bundle) and the egress network (bundle only)."""
    for plan in plans():
        yield {
            "name": plan.agent,
            "task_dep": [f"preflight:{plan.agent}"],
            "actions": [(action(backend(plan).create_networks), [plan])],
            "uptodate": [(probe(backend(plan).networks_ready), [plan])],
            "clean": [(action(backend(plan).remove_networks), [plan])],
        }


def start_bundle(plan: Plan) -> None:
    backend(plan).start_bundle(plan, token_env(plan))


def task_bundle():
    """Start the sidecar bundle and wait until it reports healthy."""
    for plan in plans():
        yield {
            "name": plan.agent,
            "task_dep": [f"preflight:{plan.agent}", "bundle_build", f"render:{plan.agent}", f"ca:{plan.agent}", f"networks:{plan.agent}"],
            "actions": [(action(start_bundle), [plan])],
            "uptodate": [(probe(backend(plan).bundle_ready), [plan])],
            "clean": [(action(backend(plan).remove_bundle), [plan])],
        }


def _start_guest(plan: Plan) -> dict:
    backend(plan).start_guest(plan)
    return {"fenced_start": backend(plan).fence_epoch(plan)}


def _guest_current(task, values, plan: Plan) -> bool:
    # docker: the firewall lives in the guest's network namespace, which a restart replaces, so a guest
    # started by anything but this task is recreated and fenced again. smolmachines: the same for a
    # machine replaced behind our back.
    be = backend(plan)
    return be.guest_ready(plan) and values.get("fenced_start") == be.fence_epoch(plan)


def task_guest():
    """Create and start the guest, fenced to the bundle's front door (a container, or a smolvm microVM)."""
    for plan in plans():
        image = f"smol_pack:{plan.agent}" if plan.smol else f"image_build:{plan.agent}"
        yield {
            "name": plan.agent,
            "task_dep": [image, f"bundle:{plan.agent}"],
            "actions": [(action(_start_guest), [plan])],
            "uptodate": [(probe(_guest_current), [plan])],
            "clean": [(action(backend(plan).remove_guest), [plan])],
        }


def _provision_inputs(plan: Plan) -> str:
    h = hashlib.sha256(repr((plan.prompt, plan.skills, plan.git, plan.supervise)).encode())
    h.update(plan.ca_cert.read_bytes() if plan.ca_cert.exists() else b"-")
    extra = [SUPERVISE_HOOK_SOURCE, plan.supervise.guest_config_file, plan.supervise.claude_settings_file] if plan.supervise else []
    for path in files_under(*plan.skills, *extra):
        h.update(path.encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _provisioned(task, values, plan: Plan) -> bool:
    guest = backend(plan).Guest(plan)
    return values.get("container") == guest.identity() and values.get("inputs") == _provision_inputs(plan)


def _provision(plan: Plan) -> dict:
    guest = backend(plan).Guest(plan)
    provision(plan, guest)
    return {"container": guest.identity(), "inputs": _provision_inputs(plan)}


def task_provision():
    """Put the CA, the prompt and the skills into the guest."""
    for plan in plans():
        yield {
            "name": plan.agent,
            "task_dep": [f"guest:{plan.agent}"],
            "actions": [(action(_provision), [plan])],
            "uptodate": [(probe(_provisioned), [plan])],
        }


def purge_state(plan: Plan) -> None:
    """Only an explicit purge deletes work: the workspace volume and the state dir."""
    if not purge_requested():
        return
    if plan.guest.workspace_volume:
        docker("volume", "rm", "-f", plan.guest.workspace_volume, check=False)
    shutil.rmtree(plan.state_dir, ignore_errors=True)
    shutil.rmtree(plan.cache_dir, ignore_errors=True)
