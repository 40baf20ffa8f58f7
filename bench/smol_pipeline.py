"""The smolmachines image pipeline, cold, against the seed's way of doing it, in one run.

Ours: `doit smol_pack:<agent>` = docker save -> registry_up (127.0.0.1, setup task) -> host crane
push -> smolvm pack -> registry teardown. The seed's (claude-bottle commit 47eb56bd): docker save ->
a per-run docker network -> a registry container on it (-p :5000) -> a one-shot crane container on
the same network pushes the mounted tarball -> smolvm pack from localhost:<port> -> tear it all down.
Both use the same fake smolvm (which pulls with real crane) and the same registry image, so the
difference is the orchestration. Also counts the stages an unchanged image runs (goal 0).

    python bench/smol_pipeline.py [rounds]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, BenchEnv, machine, summary, timed

AGENT = "bench-smol"
FAKE_SMOLVM = ROOT / "tests" / "fakes" / "smolvm"


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} ... failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def crane_path() -> str:
    found = os.environ.get("BOTTLE_CRANE_BIN") or shutil.which("crane") or next(
        (p for p in ("/var/cache/claude-bottle-ci/go-bin/crane", str(Path.home() / "go/bin/crane")) if os.path.exists(p)), None)
    if not found:
        raise SystemExit("crane is needed (go install github.com/google/go-containerregistry/cmd/crane@v0.20.2)")
    return found


def crane_image(crane: str, base: str) -> str:
    """The seed ran a crane container per push; build one from the host's crane binary."""
    ctx = Path(tempfile.mkdtemp(prefix="crane-ctx-"))
    shutil.copy2(crane, ctx / "crane")
    (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY crane /usr/local/bin/crane\nENTRYPOINT [\"crane\"]\n")
    sh("docker", "build", "-q", "-t", "claude-bottle-bench/crane:latest", str(ctx))
    shutil.rmtree(ctx)
    return "claude-bottle-bench/crane:latest"


def seed_style(plan, digest: str, crane_img: str, env: dict, workdir: Path) -> None:
    tag = digest.split(":")[1][:16]
    tarball = workdir / f"{tag}.tar"
    net, registry = f"bench-seed-{tag}", f"bench-seed-registry-{tag}"
    sh("docker", "save", "-o", str(tarball), digest)
    sh("docker", "network", "create", net)
    try:
        sh("docker", "run", "-d", "--name", registry, "--network", net, "-p", ":5000", plan.image_pipeline.registry_image.tag)
        port = sh("docker", "port", registry, "5000/tcp").splitlines()[0].rsplit(":", 1)[1]
        for _ in range(100):
            if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/v2/"], capture_output=True).returncode == 0:
                break
        sh("docker", "run", "--rm", "--network", net, "-v", f"{tarball}:/img.tar:ro", crane_img,
           "push", "--insecure", "/img.tar", f"{registry}:5000/claude-bottle/seed:{tag}")
        out = workdir / f"seed-{tag}"
        subprocess.run([str(FAKE_SMOLVM), "pack", "create", "--image", f"localhost:{port}/claude-bottle/seed:{tag}",
                        "-o", str(out)], env=env, check=True, capture_output=True)
    finally:
        subprocess.run(["docker", "rm", "-f", registry], capture_output=True)
        subprocess.run(["docker", "network", "rm", net], capture_output=True)
        tarball.unlink(missing_ok=True)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    crane = crane_path()
    work = Path(tempfile.mkdtemp(prefix="bench-smol-"))
    extra = {"BOTTLE_PIPELOCK": "off", "BOTTLE_SMOLVM_BIN": str(FAKE_SMOLVM), "BOTTLE_CRANE_BIN": crane,
             "CRANE": crane, "SMOLVM_DATA_DIR": str(work / "smolvm"), "BOTTLE_CACHE_DIR": str(work / "cache")}
    bench = BenchEnv({AGENT: "backend: smolmachines\nroutes: []\n"}, extra)
    try:
        print(f"machine: {machine()}")
        bench.doit(f"image_build:{AGENT}", "registry_build", f"agent={AGENT}")      # not timed: images exist
        plan = bench.plan(AGENT)
        digest = plan.agent_image.iid_file.read_text().strip()
        crane_img = crane_image(crane, plan.agent_image.build_args[0][1])
        ours, seed = [], []
        for _ in range(rounds):
            shutil.rmtree(plan.image_pipeline.packs_dir, ignore_errors=True)
            ours.append(timed(lambda: bench.doit(f"smol_pack:{AGENT}", f"agent={AGENT}")))
            seed.append(timed(lambda: seed_style(plan, digest, crane_img, {**os.environ, **extra}, work)))
        mark = len(bench.docker_calls())
        out = bench.doit(f"smol_pack:{AGENT}", f"agent={AGENT}").stdout
        ran = [line for line in out.splitlines() if line.startswith(".  ")]
        heavy = [c for c in bench.docker_calls()[mark:] if c.split(" ", 1)[0] in ("save", "run", "push", "build")]
        print(f"cold pipeline (save, registry, push, pack)   ours: {summary(ours)}")
        print(f"                                             seed-style: {summary(seed)}")
        print(f"ratio ours/seed (median): {sorted(ours)[len(ours)//2] / sorted(seed)[len(seed)//2]:.2f}x")
        print(f"unchanged image: {len(ran)} stages ran ({', '.join(r[3:] for r in ran) or 'none'}), "
              f"{len(heavy)} docker save/run/build calls (goal 0)")
    finally:
        bench.doit("clean", f"agent={AGENT}", "purge=1")
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
