"""Instances on the real engine: two bottles of one agent file side by side, started at the same time.
Each has its own workspace, networks, subnet and state; neither reaches the other; each pushes into
its own branch namespace of the shared mirror, and a push into the other's is refused. A second start
of a bottle that is being started waits for the first. `clean all=1 purge=1` leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bottle_tasks import locks
from bottle_tasks.bundle_plan import EGRESS_PORT
from bottle_tasks.labels import LABEL
from bottle_tasks.bundle_plan import GIT_MIRRORS_DIR
from bottle_tasks.plan import mirrors_dir_of
from bottle_tasks.settings import ROOT
from tests.integration.conftest import (
    GIT_REPO, GIT_TOKEN, UPSTREAM_NAMES, Bottle, Env, _seed_upstream, docker, start_upstream,
)
from tests.integration.probes import Probe, run_probes
from tests.integration.test_isolation import assert_only_the_front_door

pytestmark = pytest.mark.docker

AGENT = "probe-inst"
NAMES = ("one", "two")
AGENT_FILE = """
routes:
  - host: upstream.test
    private_network: true
  - host: api.anthropic.com
    private_network: true
    token: {env: ANTHROPIC_API_KEY, header: x-api-key}
""" + GIT_REPO + """\
      push:
        branches: ["bottle/probe-inst/*"]    # wide on purpose: git-gate still keeps each instance to its own
"""
UPSTREAM = "bottle-test-upstream-instances"


def _popen(env: Env, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ROOT, env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 1800) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _labelled(kind: str) -> list[str]:
    argv = ["ps", "-a"] if kind == "container" else [kind, "ls"]
    fmt = "{{.Names}}" if kind == "container" else "{{.Name}}"
    return docker(*argv, "--filter", f"label={LABEL}.agent={AGENT}", "--format", fmt).stdout.split()


@pytest.fixture(scope="module")
def pair(bottle_env: Env):
    bottle_env.write_agent(AGENT, AGENT_FILE)
    env = Env(root=bottle_env.root, env={**bottle_env.env, "BOTTLE_TEST_GIT_TOKEN": GIT_TOKEN},
              argv_log=bottle_env.argv_log)
    agent_file = f"{env.env['BOTTLE_AGENTS_DIR']}/{AGENT}.yaml"
    from bottle_tasks.tasks.common import load_plan
    bottles = []
    try:
        # The networks first (the upstream must be there when git-gate first mirrors), one after the other.
        for name in NAMES:
            env.doit(f"networks:{AGENT}-{name}", f"agent={AGENT}", f"name={name}")
        plans = [load_plan(Path(agent_file), env.settings(), None, name) for name in NAMES]
        bottles = [Bottle(env=env, agent=AGENT, plan=plan, upstream=UPSTREAM) for plan in plans]
        ip = start_upstream(env, plans[0], UPSTREAM, aliases=UPSTREAM_NAMES + ["git.test"],
                            container_env={"UPSTREAM_GIT_TOKEN": GIT_TOKEN})
        docker("network", "connect", *sum((["--alias", n] for n in UPSTREAM_NAMES + ["git.test"]), []),
               plans[1].network.outbound.name, UPSTREAM)
        _seed_upstream(UPSTREAM)
        for bottle in bottles:
            bottle.upstream_ip = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{bottle.plan.network.outbound.name}").IPAddress}}}}',
                                        UPSTREAM).stdout.strip()
        assert ip
        # Both starts at once: each has its own doit DB and lock; the shared agent image is built once.
        procs = [_popen(env, "start", f"agent={AGENT}", f"name={name}", "command=true") for name in NAMES]
        results = [_finish(p) for p in procs]
        for (code, out), name in zip(results, NAMES):
            assert code == 0, f"start of instance {name} failed:\n{out}"
        yield bottles, results
    finally:
        docker("rm", "-f", UPSTREAM, check=False)
        env.doit("clean", f"agent={AGENT}", "all=1", "purge=1", check=False)


def test_two_concurrent_starts_of_two_instances_both_succeed_on_their_own_subnets(pair):
    (one, two), results = pair
    blocks = [ipaddress.ip_network(b.plan.network.guest_side.subnet).supernet(new_prefix=23) for b in (one, two)]
    assert blocks[0] != blocks[1]
    for bottle, (_, out) in zip((one, two), results):
        state = docker("inspect", "-f", "{{.State.Running}}", bottle.plan.bundle.name, bottle.plan.guest.name).stdout
        assert state.split() == ["true", "true"]
        assert f"agent {AGENT}, instance {bottle.plan.instance} (bottle {bottle.plan.slug})" in out
    # One image build for both: the second found it built (the lock), or doit found it current.
    builds = sum(out.count(f"building {one.plan.agent_image.tag}") for _, out in results)
    assert builds <= 1, [out for _, out in results]


def test_each_instance_sees_only_its_own_workspace(pair):
    (one, two), _ = pair
    assert one.exec("sh", "-c", "echo from-one > /workspace/mine.txt").returncode == 0
    assert one.exec("cat", "/workspace/mine.txt").stdout.strip() == "from-one"
    assert two.exec("test", "-e", "/workspace/mine.txt").returncode == 1
    assert one.plan.guest.workspace_volume != two.plan.guest.workspace_volume


def test_neither_instance_reaches_the_other(pair, host_listener):
    (one, two), _ = pair
    assert_only_the_front_door(one, two, host_listener)
    assert_only_the_front_door(two, one, host_listener)
    # Positive control: each bundle answers its own guest on the same port the other cannot reach.
    own = run_probes(one, [Probe("own bundle", "tcp", (one.plan.network.bundle_ip, EGRESS_PORT))])
    assert own["own bundle"]["reached"], own


def _push(bottle: Bottle, branch: str) -> subprocess.CompletedProcess:
    script = (f"cd /workspace/app && git checkout -q -B work origin/main && echo {bottle.plan.instance} >> README.md "
              f"&& git commit -qam 'from {bottle.plan.instance}' && git push origin HEAD:refs/heads/{branch}")
    return bottle.exec("sh", "-c", script)


def _upstream_branch(branch: str) -> str:
    return docker("exec", UPSTREAM, "git", "--git-dir", "/srv/git/app.git", "rev-parse", "--verify", "--quiet",
                  f"refs/heads/{branch}", check=False).stdout.strip()


def test_pushes_land_in_each_instances_namespace_and_a_cross_push_is_refused(pair):
    (one, two), _ = pair
    for bottle in (one, two):
        branch = f"bottle/{AGENT}/{bottle.plan.instance}/feature"
        proc = _push(bottle, branch)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deadline = time.monotonic() + 60
        while not _upstream_branch(branch) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _upstream_branch(branch), f"{branch} was not forwarded upstream"
    # Instance one pushing into two's namespace: refused, with the reason, and nothing upstream.
    stolen = f"bottle/{AGENT}/two/stolen"
    proc = _push(one, stolen)
    assert proc.returncode != 0
    assert "instance two's namespace" in proc.stderr and f"bottle/{AGENT}/one/*" in proc.stderr, proc.stderr
    time.sleep(2)
    assert not _upstream_branch(stolen)
    # Each gate has its own repo, holding its own push; both borrow the agent's one objects dir.
    # Each bottle's audit holds only its own pushes.
    assert (mirrors_dir_of(one.env.settings().state_dir, AGENT) / "app.objects").is_dir()
    for bottle in (one, two):
        repo = bottle.plan.git.gate_dir / "app.git"
        assert (repo / "objects" / "info" / "alternates").read_text() == f"{GIT_MIRRORS_DIR}/app.objects\n"
        refs = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", str(repo), "for-each-ref",
                               "--format=%(refname)"], capture_output=True, text=True).stdout
        assert f"refs/heads/bottle/{AGENT}/{bottle.plan.instance}/feature" in refs, refs
    for bottle, other in ((one, "two"), (two, "one")):
        audit = (bottle.plan.git.gate_dir / "audit.jsonl").read_text()
        assert f"bottle/{AGENT}/{bottle.plan.instance}/feature" in audit
        assert f"bottle/{AGENT}/{other}/feature" not in audit


def test_a_second_start_of_a_bottle_being_started_waits_for_it(pair):
    (one, _two), _ = pair
    lock = locks.lock_path(one.plan.cache_root, f"bottle-{one.plan.slug}")
    started = docker("inspect", "-f", "{{.State.StartedAt}}", one.plan.bundle.name).stdout
    locks.acquire(lock, "the test, as a start in progress")
    try:
        proc = _popen(one.env, "start", f"agent={AGENT}", "name=one", "command=true")
        time.sleep(10)     # an unchanged start takes a few seconds; this one must still be waiting
        assert proc.poll() is None, "the second start did not wait for the lock:\n" + "".join(_finish(proc)[1])
    finally:
        locks.release(lock)
    code, out = _finish(proc)
    assert code == 0, out
    assert f"bottle {one.plan.slug} (another doit start or clean of it) is in use by another run (pid" in out
    assert docker("inspect", "-f", "{{.State.StartedAt}}", one.plan.bundle.name).stdout == started


def test_status_lists_the_instances(pair):
    (one, two), _ = pair
    out = one.env.doit("status", f"agent={AGENT}").stdout
    assert f"{one.plan.slug}  (agent {AGENT}, instance one)" in out and f"{two.plan.slug}  (agent {AGENT}, instance two)" in out
    only = one.env.doit("status", f"agent={AGENT}", "name=two").stdout
    assert two.plan.slug in only and one.plan.slug not in only


def test_zz_clean_all_leaves_nothing_of_the_agent_behind(pair):
    (one, two), _ = pair
    env = one.env
    refused = env.doit("start", f"agent={AGENT}", "all=1", check=False)
    assert refused.returncode != 0 and "all=1 is for clean" in refused.stdout + refused.stderr
    docker("rm", "-f", UPSTREAM, check=False)       # the test's own container sits on both egress networks
    env.doit("clean", f"agent={AGENT}", "all=1", "purge=1")
    for kind in ("container", "network", "volume"):
        assert _labelled(kind) == [], f"{kind}s of {AGENT} left after clean all=1"
    for bottle in (one, two):
        assert not bottle.plan.state_dir.exists() and not bottle.plan.cache_dir.exists()
        assert docker("volume", "inspect", bottle.plan.guest.workspace_volume, check=False).returncode != 0
    assert not mirrors_dir_of(env.settings().state_dir, AGENT).exists()
    listed = json.dumps(env.doit("list", "--all", f"agent={AGENT}", "all=1").stdout)
    assert f"{AGENT}-one" not in listed
