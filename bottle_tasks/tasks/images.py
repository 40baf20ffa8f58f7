"""image_build:<agent> and bundle_build: one `docker build --iidfile` each. The digest file is the
target later tasks depend on; an uptodate probe rebuilds an image removed by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

from doit.tools import config_changed

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import ImagePlan, Plan
from bottle_tasks.settings import PACKAGE_DIR, Settings
from bottle_tasks.tasks.common import action, current_run, files_under, plans, probe, purge_requested, settings

__all__ = ["task_image_build", "task_bundle_build"]


def _extra_files(image: ImagePlan, s: Settings) -> dict[str, Path | None]:
    """Files copied into the staged context on top of the Dockerfile directory."""
    extras: dict[str, Path | None] = {"extra-ca.pem": s.build_ca_certs}
    if image.kind == "bundle":
        extras["bottle_tasks/__init__.py"] = PACKAGE_DIR / "__init__.py"
        extras["bottle_tasks/contract.py"] = PACKAGE_DIR / "contract.py"
        extras["bottle_tasks/sidecars"] = PACKAGE_DIR / "sidecars"
        extras["bin/pipelock"] = s.pipelock_bin
    return extras


def stage_context(image: ImagePlan, s: Settings) -> None:
    ctx = image.context_dir
    if ctx.exists():
        shutil.rmtree(ctx)
    shutil.copytree(image.dockerfile_dir, ctx, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, source in _extra_files(image, s).items():
        dest = ctx / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            if rel.endswith(".pem"):
                dest.write_text("")      # the Dockerfile skips an empty CA file
            continue
        if not source.exists():
            raise BottleError(f"{source} does not exist (needed for the {image.kind} image build as {rel}); fix the setting that names it")
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest)
    (ctx / "bin").mkdir(exist_ok=True)
    (ctx / "bin" / ".keep").touch()


def build_image(image: ImagePlan, s: Settings) -> None:
    stage_context(image, s)
    image.iid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.iid_file.with_name(image.iid_file.name + ".tmp")
    args: list[str] = []
    for key, value in image.build_args:
        args += ["--build-arg", f"{key}={value}"]
    print(f"building {image.tag} (the first build takes minutes; later ones reuse the layer cache)")
    current_run().docker("build", "--iidfile", str(tmp), "-t", image.tag, *args, str(image.context_dir), timeout=3600)
    tmp.replace(image.iid_file)


def image_current(image: ImagePlan) -> bool:
    if not image.iid_file.exists():
        return False
    return current_run().docker.image_id(image.tag) == image.iid_file.read_text().strip()


def image_task(image: ImagePlan, s: Settings) -> dict:
    extras = [p for p in _extra_files(image, s).values() if p is not None]
    return {
        "file_dep": files_under(image.dockerfile_dir, *extras),
        "targets": [str(image.iid_file)],
        "actions": [(action(build_image), [image, s])],
        "uptodate": [config_changed({"tag": image.tag, "args": image.build_args,
                                     "extras": sorted(_extra_files(image, s))}),
                     (probe(image_current), [image])],
        "clean": [(action(_purge_image), [image])],
        "verbosity": 2,
    }


def _purge_image(image: ImagePlan) -> None:
    # Images are cache, not work: `clean` keeps them so the next start is fast; `purge=1` removes the
    # agent's own image. The bundle image is shared by every bottle, so no agent's purge removes it.
    if purge_requested() and image.kind == "agent":
        current_run().docker("rmi", "-f", image.tag, check=False)
        image.iid_file.unlink(missing_ok=True)


def task_image_build():
    """Build the agent (guest) image; its digest lands in the agent.iid file."""
    s = settings()
    for plan in plans():
        yield {"name": plan.agent, "doc": f"Build the guest image {plan.agent_image.tag}.",
               **image_task(plan.agent_image, s)}


def task_bundle_build():
    """Build the sidecar bundle image (egress, pipelock, DNS sink, init)."""
    s = settings()
    for plan in plans():
        # One shared image; the first plan describes it.
        return {"doc": f"Build the bundle image {plan.bundle_image.tag}.", **image_task(plan.bundle_image, s)}
    return {"actions": None, "doc": "Build the bundle image (needs at least one agent file)."}


def pipelock_ok(plan: Plan, s: Settings) -> None:
    if s.pipelock_required and not plan.pipelock_enabled:
        raise BottleError(
            "pipelock was not found (set BOTTLE_PIPELOCK_BIN, put it on PATH, or install it; see README). "
            "To run without it (no pipelock allowlist floor, scan API or response scanning) set BOTTLE_PIPELOCK=off.")
