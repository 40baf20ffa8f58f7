"""The smolmachines image pipeline, one task per stage (agents with backend smolmachines only):

    image_build:<agent> ─► smol_save:<b> ─► crane_push:<b> ─► smol_pack:<b>
                                          (registry_up:<b> is their setup; its teardown removes the registry)

The image is the agent's; the stages after it are the bottle's (<b>, its slug), each with its own
tarball and registry, so concurrent starts of two instances never share one. The pack they make is
cached by image digest for every bottle, and made under a lock: the second finds it made.

smolvm packs only from an OCI registry, so the locally built image goes through a throwaway
registry. crane pushes from the host (plain HTTP to 127.0.0.1, no docker daemon HTTPS policy in the
way), and `smolvm pack create` pulls from the same host endpoint. Every stage is up to date as soon
as the pack for the image's digest exists: an unchanged image runs no save, registry, push or pack.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

from bottle_tasks.backends.smolmachines import (
    SmolPackPipeline, current_pack, digest_key, image_digest, pack_path, require_smolvm,
)
from bottle_tasks import locks
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import Plan
from bottle_tasks.runner import run
from bottle_tasks.tasks.common import action, current_run, plans, settings
from bottle_tasks.tasks.images import image_task

__all__ = ["task_registry_build", "task_registry_up", "task_smol_save", "task_crane_push", "task_smol_pack"]


def _smol_plans():
    return [plan for plan in plans() if isinstance(plan.image_pipeline, SmolPackPipeline)]


def tarball_path(plan: Plan, digest: str) -> Path:
    return plan.image_pipeline.tarball_dir / f"{digest_key(digest)}.tar"


def pack_current(plan: Plan) -> bool:
    try:
        return current_pack(plan).exists()
    except BottleError:      # no digest yet, or no pack for it
        return False


def image_ref(plan: Plan, digest: str) -> str:
    port = plan.image_pipeline.registry_port_file.read_text().strip()
    return f"127.0.0.1:{port}/{plan.image_pipeline.repository}:{digest_key(digest)}"


# ---- stages ------------------------------------------------------------------------------------

def save(plan: Plan) -> None:
    digest = image_digest(plan)
    out = tarball_path(plan, digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    current_run().docker("save", "-o", str(tmp), digest, timeout=1800)
    tmp.replace(out)


def registry_up(plan: Plan) -> None:
    docker = current_run().docker
    name = plan.image_pipeline.registry_container
    docker("rm", "-f", name, check=False)
    # Loopback only: crane and smolvm run on this host; nothing else needs the registry.
    docker("run", "-d", "--name", name, *plan.label_args("registry"), "-p", "127.0.0.1::5000",
           plan.image_pipeline.registry_image.tag)
    port = docker.query("port", name, "5000/tcp").stdout.split(":")[-1].strip()
    plan.image_pipeline.registry_port_file.parent.mkdir(parents=True, exist_ok=True)
    plan.image_pipeline.registry_port_file.write_text(port)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            logs = docker.query("logs", "--tail", "20", name, check=False)
            registry_down(plan)
            raise BottleError(f"the temporary registry {name} did not answer on 127.0.0.1:{port}:\n{logs.stderr}")
        time.sleep(0.1)


def registry_down(plan: Plan) -> None:
    current_run().docker("rm", "-f", plan.image_pipeline.registry_container, check=False)
    plan.image_pipeline.registry_port_file.unlink(missing_ok=True)


def push(plan: Plan) -> None:
    digest = image_digest(plan)
    tarball = tarball_path(plan, digest)
    if not tarball.exists():
        raise BottleError(f"{tarball} is missing; run doit smol_save:{plan.slug} first")
    run([plan.image_pipeline.crane, "push", "--insecure", str(tarball), image_ref(plan, digest)], timeout=1800)
    tarball.unlink()   # the registry holds the same bytes now


def pack(plan: Plan) -> None:
    require_smolvm(plan.image_pipeline.smolvm)
    digest = image_digest(plan)
    stub = pack_path(plan, digest)
    with locks.holding(locks.lock_path(plan.cache_root, f"smol-pack-{digest_key(digest)}"), f"the pack of {plan.agent_image.tag}"):
        if pack_current(plan):
            print(f"the pack {stub}.smolmachine is made already (by another run)")
            return
        stub.parent.mkdir(parents=True, exist_ok=True)
        run([plan.image_pipeline.smolvm, "pack", "create", "--image", image_ref(plan, digest), "-o", str(stub)],
            timeout=3600)


def prune_packs(plan: Plan) -> None:
    """Old packs go; the one for the current image digest stays."""
    keep = digest_key(image_digest(plan)) if plan.agent_image.iid_file.exists() else None
    if not plan.image_pipeline.packs_dir.is_dir():
        return
    for path in plan.image_pipeline.packs_dir.iterdir():
        if path.name.split(".", 1)[0] != keep:
            path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)


# ---- tasks -------------------------------------------------------------------------------------

def task_registry_build():
    """Build the throwaway registry image the smolmachines pipeline pushes through."""
    s = settings()
    for plan in _smol_plans():
        return {"doc": f"Build the registry image {plan.image_pipeline.registry_image.tag}.", **image_task(plan.image_pipeline.registry_image, s)}
    return {"actions": None, "doc": "Build the registry image (used by agents with backend smolmachines)."}


def task_registry_up():
    """Start a throwaway registry on 127.0.0.1 for this run; its teardown removes it."""
    for plan in _smol_plans():
        yield {
            "name": plan.slug,
            "task_dep": ["registry_build"],
            "actions": [(action(registry_up), [plan])],
            "teardown": [(action(registry_down), [plan])],
            "uptodate": [False],
        }


def _stage(plan: Plan, fn, **extra) -> dict:
    return {"name": plan.slug, "actions": [(action(fn), [plan])], "uptodate": [(pack_current, [plan])],
            "verbosity": 2, **extra}


def task_smol_save():
    """docker save the agent image to a per-digest tarball (skipped when its pack exists)."""
    for plan in _smol_plans():
        yield _stage(plan, save, file_dep=[str(plan.agent_image.iid_file)], task_dep=[f"image_build:{plan.agent}"])


def task_crane_push():
    """crane push the tarball to the throwaway registry, then delete the tarball."""
    for plan in _smol_plans():
        yield _stage(plan, push, task_dep=[f"smol_save:{plan.slug}"], setup=[f"registry_up:{plan.slug}"])


def task_smol_pack():
    """smolvm pack create from the registry; the pack is cached by image digest."""
    for plan in _smol_plans():
        yield _stage(plan, pack, task_dep=[f"crane_push:{plan.slug}"], setup=[f"registry_up:{plan.slug}"],
                     clean=[(action(prune_packs), [plan])])
