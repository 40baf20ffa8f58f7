"""The smolmachines image pipeline as doit tasks: docker save -> throwaway registry -> real crane
push -> smolvm pack (the fake, which really pulls from the registry with crane). An unchanged image
runs none of it; smolvm older than 1.8.0 is refused."""

from __future__ import annotations

import shutil

import pytest

from tests.integration.conftest import FAKE_SMOLVM, Env, crane_or_skip, docker

AGENT = "smol-pipe"


@pytest.fixture(scope="module")
def smol_env(bottle_env, tmp_path_factory):
    crane = crane_or_skip()
    data = tmp_path_factory.mktemp("smolvm-data")
    extra = {"BOTTLE_SMOLVM_BIN": str(FAKE_SMOLVM), "BOTTLE_CRANE_BIN": crane, "CRANE": crane,
             "SMOLVM_DATA_DIR": str(data), "BOTTLE_CACHE_DIR": str(tmp_path_factory.mktemp("smol-cache"))}
    env = Env(root=bottle_env.root, env={**bottle_env.env, **extra}, argv_log=bottle_env.argv_log)
    env.write_agent(AGENT, "backend: smolmachines\nroutes: []\n")
    yield env
    env.doit("clean", f"agent={AGENT}", "purge=1", check=False)


def _lines(env: Env) -> int:
    return len(env.argv_log.read_text().splitlines()) if env.argv_log.exists() else 0


def test_cold_pipeline_builds_a_pack_and_leaves_no_registry_or_tarball(smol_env):
    plan = smol_env.plan(AGENT)
    mark = _lines(smol_env)
    proc = smol_env.doit(f"smol_pack:{AGENT}", f"agent={AGENT}")
    calls = smol_env.argv_log.read_text().splitlines()[mark:]
    assert any(c.startswith("save ") for c in calls), calls
    assert any(c.startswith("run -d --name " + plan.image_pipeline.registry_container) for c in calls), calls
    digest = plan.agent_image.iid_file.read_text().strip()
    stub = plan.image_pipeline.packs_dir / digest.split(":")[1][:16]
    sidecar = stub.with_name(stub.name + ".smolmachine")
    assert stub.exists() and sidecar.exists(), proc.stdout
    assert sidecar.read_bytes()[-64:].startswith(b"SMOLPACK")
    # The registry lived only for the run, and the tarball went once pushed.
    assert docker("ps", "-a", "--filter", f"name={plan.image_pipeline.registry_container}", "-q").stdout.strip() == ""
    assert list(plan.image_pipeline.tarball_dir.glob("*.tar*")) == []


def test_unchanged_image_runs_no_stage(smol_env):
    smol_env.doit(f"smol_pack:{AGENT}", f"agent={AGENT}")
    mark = _lines(smol_env)
    proc = smol_env.doit(f"smol_pack:{AGENT}", f"agent={AGENT}")
    calls = smol_env.argv_log.read_text().splitlines()[mark:]
    heavy = [c for c in calls if c.split(" ", 1)[0] in ("build", "save", "push", "run")]
    assert heavy == [], heavy
    for stage in ("smol_save", "crane_push", "smol_pack"):
        assert f"-- {stage}:{AGENT}" in proc.stdout, proc.stdout
    assert "registry_up" not in proc.stdout


def test_smolvm_before_1_8_is_refused(smol_env):
    plan = smol_env.plan(AGENT)
    shutil.rmtree(plan.image_pipeline.packs_dir)
    proc = smol_env.doit(f"smol_pack:{AGENT}", f"agent={AGENT}", check=False,
                         extra_env={"SMOLVM_FAKE_VERSION": "0.8.0"})
    assert proc.returncode != 0
    assert "older than 1.8.0" in proc.stdout + proc.stderr and "--allow-cidr" in proc.stdout + proc.stderr
    assert docker("ps", "-a", "--filter", f"name={plan.image_pipeline.registry_container}", "-q").stdout.strip() == ""
