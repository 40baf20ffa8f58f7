"""image_build:<agent> and bundle_build: one `docker build --iidfile` each. The digest file is the
target later tasks depend on; an uptodate probe rebuilds an image removed by hand. pipelock_binary
takes pipelock out of its official image for the bundle build (settings.pipelock_source); build_trust
stages the extra CAs every build context holds as extra-ca.pem (bottle_tasks/build_trust.py). A build
shows its steps as they start (bottle_tasks/build_progress.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from doit.tools import config_changed

from bottle_tasks.build_progress import BuildProgress
from bottle_tasks.build_trust import host_build_trust, tls_failure, tls_failure_error
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import ImagePlan, Plan
from bottle_tasks.runner import CommandError, Result
from bottle_tasks.settings import PACKAGE_DIR, PIPELOCK_IN_IMAGE, Settings, pipelock_binary_choice, pipelock_problem
from bottle_tasks import locks
from bottle_tasks.instances import instances_on_disk
from bottle_tasks.tasks.common import (
    action, current_run, files_under, per_agent, plans, probe, purge_requested, settings,
)

__all__ = ["task_build_trust", "task_image_build", "task_bundle_build", "task_pipelock_binary"]

PULL_TIMEOUT_SECONDS = 300


def pulled_pipelock(s: Settings) -> Path:
    """Where pipelock_binary puts the binary the bundle image gets when an image is configured."""
    return s.cache_dir / "images" / "pipelock" / "pipelock"


def bundle_pipelock(s: Settings) -> Path | None:
    """The binary staged into the bundle image as bin/pipelock, None for none."""
    return pulled_pipelock(s) if s.pipelock_image else s.pipelock_bin


def staged_trust(s: Settings) -> Path:
    """build_trust's target: the extra CAs of every image build ("" for none; the Dockerfiles skip an empty file)."""
    return s.cache_dir / "images" / "extra-ca.pem"


def stage_build_trust(s: Settings) -> None:
    """build_trust's action. It writes only when the CAs changed, so an unchanged start leaves the
    image builds' file_dep as it was and builds nothing."""
    trust = host_build_trust(dict(s.build_trust_env))
    print(f"build CAs: {trust.summary}")
    target = staged_trust(s)
    if target.exists() and target.read_text() == trust.pem:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(trust.pem)
    tmp.replace(target)


def _extra_files(image: ImagePlan, s: Settings) -> dict[str, Path | None]:
    """Files copied into the staged context on top of the Dockerfile directory."""
    extras: dict[str, Path | None] = {"extra-ca.pem": staged_trust(s)}
    if image.kind == "bundle":
        extras["bottle_tasks/__init__.py"] = PACKAGE_DIR / "__init__.py"
        extras["bottle_tasks/contract.py"] = PACKAGE_DIR / "contract.py"
        extras["bottle_tasks/sidecars"] = PACKAGE_DIR / "sidecars"
        extras["bin/pipelock"] = bundle_pipelock(s)
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
            continue
        if not source.exists():
            raise BottleError(f"{source} does not exist (needed for the {image.kind} image build as {rel}); fix the setting that names it")
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest)
    (ctx / "bin").mkdir(exist_ok=True)
    (ctx / "bin" / ".keep").touch()


def image_inputs(image: ImagePlan, s: Settings) -> list[str]:
    """The files an image is built from (the build task's file_dep)."""
    extras = [p for p in _extra_files(image, s).values() if p is not None]
    # build_trust's target need not exist yet (files_under skips it): doit runs that task first.
    return sorted({*files_under(image.dockerfile_dir, *extras), str(staged_trust(s))})


def image_config(image: ImagePlan, s: Settings) -> dict:
    return {"tag": image.tag, "args": image.build_args, "extras": sorted(_extra_files(image, s))}


def inputs_key(image: ImagePlan, s: Settings) -> str:
    """What the image was built from, as one digest: doit's own record of it is per bottle (each has
    its own DB), and an image is shared by several bottles."""
    h = hashlib.sha256(repr(image_config(image, s)).encode())
    for path in image_inputs(image, s):
        h.update(path.encode() + b"\0")
        try:
            with open(path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        except FileNotFoundError:
            h.update(b"-")
    return h.hexdigest()


def inputs_stamp(image: ImagePlan) -> Path:
    return image.iid_file.with_name(image.iid_file.name + ".inputs")


def image_lock(image: ImagePlan, s: Settings) -> Path:
    return locks.lock_path(s.cache_dir, "image-" + image.tag.replace("/", "_").replace(":", "_"))


def build_image(image: ImagePlan, s: Settings) -> None:
    # One build of an image at a time, across runs; a run that waited finds the image built from
    # these very inputs by the other, and builds nothing.
    with locks.holding(image_lock(image, s), f"the image build of {image.tag}"):
        key = inputs_key(image, s)
        stamp = inputs_stamp(image)
        if image_current(image, fresh=True) and stamp.is_file() and stamp.read_text() == key:
            print(f"{image.tag} is current (built from these inputs already)")
            current_run().docker.invalidate()    # later probes must see the image another run built
            return
        _build(image, s)
        stamp.write_text(key)


def _build(image: ImagePlan, s: Settings) -> None:
    stage_context(image, s)
    image.iid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.iid_file.with_name(image.iid_file.name + ".tmp")
    args: list[str] = []
    for key, value in image.build_args:
        args += ["--build-arg", f"{key}={value}"]
    print(f"building {image.tag} (the first build takes minutes; later ones reuse the layer cache)", flush=True)
    with BuildProgress.on(sys.stdout) as progress:
        result = current_run().docker("build", "--iidfile", str(tmp), "-t", image.tag, *args, str(image.context_dir),
                                      timeout=3600, check=False, on_line=progress.line)
    if not result.ok:
        raise build_failure(image, result, s)
    tmp.replace(image.iid_file)


def build_failure(image: ImagePlan, result: Result, s: Settings) -> BottleError:
    """A failed build's error. A TLS failure names the setting that fixes it; any other shows the
    output's last lines (the classic builder prints a RUN's output on stdout, only its verdict on stderr)."""
    output = result.stdout + result.stderr
    line = tls_failure(output)
    if line:
        return tls_failure_error(f"the build of {image.tag}", line, host_build_trust(dict(s.build_trust_env)))
    return CommandError(result.argv, result.returncode, output)


def image_current(image: ImagePlan, fresh: bool = False) -> bool:
    """fresh: ask the engine now, not this run's first look (another run may have built it since)."""
    if not image.iid_file.exists():
        return False
    return current_run().docker.image_id(image.tag, fresh=fresh) == image.iid_file.read_text().strip()


def image_task(image: ImagePlan, s: Settings, agent: str = "") -> dict:
    return {
        "file_dep": image_inputs(image, s),
        "targets": [str(image.iid_file)],
        "actions": [(action(build_image), [image, s])],
        "uptodate": [config_changed(image_config(image, s)), (probe(image_current), [image])],
        "clean": [(action(_purge_image), [image, agent])],
        "verbosity": 2,
    }


def _purge_image(image: ImagePlan, agent: str) -> None:
    # Images are cache, not work: `clean` keeps them so the next start is fast; `purge=1` removes the
    # agent's own image once no bottle of the agent is left (clean runs this after the bottles' own
    # clean actions). The bundle image is shared by every bottle, so no agent's purge removes it.
    if purge_requested() and image.kind == "agent" and not instances_on_disk(agent, settings().state_dir):
        current_run().docker("rmi", "-f", image.tag, check=False)
        image.iid_file.unlink(missing_ok=True)
        inputs_stamp(image).unlink(missing_ok=True)


def task_build_trust():
    """Stage the extra CAs image builds trust: BOTTLE_BUILD_CA_CERTS, else the host's trust minus the public roots."""
    s = settings()
    return {
        "actions": [(action(stage_build_trust), [s])],
        "targets": [str(staged_trust(s))],
        # Runs every time (it reads a few files): the host's trust may change without any file doit watches.
        "uptodate": [False],
        "verbosity": 2,
    }


def task_image_build():
    """Build the agent (guest) image; its digest lands in the agent.iid file."""
    s = settings()
    for plan in per_agent(plans()):     # one image per agent file, shared by its instances
        yield {"name": plan.agent, "doc": f"Build the guest image {plan.agent_image.tag}.",
               **image_task(plan.agent_image, s, plan.agent)}


def task_bundle_build():
    """Build the sidecar bundle image (egress, pipelock, DNS sink, init)."""
    s = settings()
    for plan in plans():
        # One shared image; the first plan describes it.
        task = image_task(plan.bundle_image, s)
        if s.pipelock_image:  # pipelock_binary's target, which need not exist yet: doit runs that task first
            task["file_dep"] = sorted({*task["file_dep"], str(pulled_pipelock(s))})
        return {"doc": f"Build the bundle image {plan.bundle_image.tag}.", **task}
    return {"actions": None, "doc": "Build the bundle image (needs at least one agent file)."}


def task_pipelock_binary():
    """Take pipelock from its image (BOTTLE_PIPELOCK_IMAGE), or the local binary where it cannot be pulled."""
    s = settings()
    if not s.pipelock_image:
        return {"actions": None, "doc": "Take pipelock from its image (none is configured: BOTTLE_PIPELOCK_IMAGE)."}
    fallback = [str(s.pipelock_bin)] if s.pipelock_bin is not None and s.pipelock_bin.is_file() else []
    return {
        "doc": f"Take pipelock from {s.pipelock_image} for the bundle build.",
        "actions": [(action(fetch_pipelock), [s])],
        "targets": [str(pulled_pipelock(s))],
        "file_dep": fallback,
        # The target and this digest make an unchanged start pull nothing, also after a fallback.
        "uptodate": [config_changed({"image": s.pipelock_image, "fallback": fallback})],
        "verbosity": 2,
    }


def fetch_pipelock(s: Settings) -> None:
    """pipelock_binary's action: /pipelock from s.pipelock_image (pulled only when absent), else the
    local fallback (pipelock_binary_choice), copied to pulled_pipelock(s)."""
    target = pulled_pipelock(s)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        _copy_from_image(s.pipelock_image, tmp)
        pulled, error = tmp, ""
    except BottleError as exc:
        pulled, error = None, str(exc).splitlines()[-1].strip()
    chosen = pipelock_binary_choice(s, pulled, error)
    if pulled is None:
        print(f"pipelock: {s.pipelock_image} could not be used ({error}); using the local binary {chosen}")
        shutil.copy2(chosen, tmp)
    os.chmod(tmp, 0o755)
    tmp.replace(target)


def _copy_from_image(ref: str, dest: Path) -> None:
    docker = current_run().docker
    if docker.image_id(ref) is None:
        print(f"pulling {ref} (pipelock for the bundle image)")
        docker("pull", ref, timeout=PULL_TIMEOUT_SECONDS)
    pinned = docker.query("image", "inspect", "--format", "{{join .RepoDigests \" \"}}", ref, check=False).stdout.strip()
    name = f"claude-bottle-pipelock-{os.getpid()}"
    docker("create", "--name", name, ref)   # a scratch image: created, never started
    try:
        docker("cp", f"{name}:{PIPELOCK_IN_IMAGE}", str(dest))
    finally:
        docker("rm", "-f", name, check=False)
    print(f"pipelock taken from {ref}" + (f" ({pinned}; pin it with BOTTLE_PIPELOCK_IMAGE)" if pinned else ""))


def pipelock_ok(plan: Plan, s: Settings) -> None:
    problem = pipelock_problem(s)
    if problem:
        raise BottleError(problem)
