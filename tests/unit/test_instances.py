"""Instances: several bottles from one agent file, each with its own names, subnet, state, DB and lock,
sharing only what is the agent's (its image, its git mirrors)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from doit.doit_cmd import reset_vars, set_var

from bottle_tasks import locks
from bottle_tasks.backends.host_subnets import CLAIM_TTL, HostSubnets, with_claims, write_claim
from bottle_tasks.errors import BottleError
from bottle_tasks.instances import (
    MAX_SLUG, Bottle, bottle_of, check_slug_free, instances_on_disk, read_record, write_record,
)
from bottle_tasks.labels import LABEL
from bottle_tasks.plan import make_plan
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.spec import load_spec
from bottle_tasks.tasks.config import dep_file
from bottle_tasks.tasks.common import new_run


def settings(tmp_path: Path, **env) -> Settings:
    base = {"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
            "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), "BOTTLE_PIPELOCK_BIN": "/usr/bin/pipelock-test"}
    return Settings.from_env({**base, **env})


EXAMPLE = ROOT / "agents" / "example.yaml"


# ---- names ----------------------------------------------------------------------------------------

def test_the_slug_is_agent_dash_instance_and_without_a_name_stays_the_agent():
    assert bottle_of("example", "") == Bottle("example") and Bottle("example").slug == "example"
    assert bottle_of("example", "fix-login").slug == "example-fix-login"
    assert bottle_of("example", "fix-login").selector == "agent=example name=fix-login"


@pytest.mark.parametrize("name", ["A", "x", "-a", "a-", "a_b", "a/b", "a.b", "../etc", "a b", "x" * 33, "ümlaut"])
def test_instance_names_are_validated_like_agent_names(name):
    with pytest.raises(BottleError, match="instance name"):
        bottle_of("example", name)


def test_a_name_that_makes_the_slug_too_long_for_dns_names_is_refused():
    agent = "a" * 30
    assert len(bottle_of(agent, "b" * (MAX_SLUG - 31)).slug) == MAX_SLUG
    with pytest.raises(BottleError, match=f"at most {MAX_SLUG}"):
        bottle_of(agent, "b" * (MAX_SLUG - 30))


def test_a_slug_two_bottles_would_share_is_refused_with_who_holds_it(tmp_path):
    state = tmp_path / "state"
    # agent a-b's default bottle, made before instances existed (no record): instance b of agent a clashes.
    (state / "a-b").mkdir(parents=True)
    with pytest.raises(BottleError, match=r"taken by agent 'a-b'.s bottle .*doit clean agent=a-b purge=1"):
        check_slug_free(Bottle("a", "b"), state, [])
    # With a record, the other way round: instance c of a-b is held by instance b-c of a.
    write_record(state / "a-b", Bottle("a", "b"))
    (state / "a-b-c").mkdir()
    write_record(state / "a-b-c", Bottle("a", "b-c"))
    with pytest.raises(BottleError, match="taken by instance 'b-c' of agent 'a'"):
        check_slug_free(Bottle("a-b", "c"), state, [])
    check_slug_free(Bottle("a", "b-c"), state, [])          # its own
    # An agent file named like the slug would share the bottle too.
    with pytest.raises(BottleError, match="also the name of the agent file x-y.yaml"):
        check_slug_free(Bottle("x", "y"), state, ["x", "x-y"])


def test_instances_on_disk_are_the_agents_own_and_skip_look_alikes(tmp_path):
    state = tmp_path / "state"
    for slug, bottle in (("a", Bottle("a")), ("a-one", Bottle("a", "one")), ("a-two", Bottle("a", "two")),
                         ("a-b", Bottle("a-b")), ("ab", Bottle("ab"))):
        (state / slug).mkdir(parents=True)
        write_record(state / slug, bottle)
    (state / "a-old").mkdir()                   # no record: agent a-old's default, not instance old of a
    (state / ".mirrors").mkdir()
    os.symlink(state / "a-one", state / "a-link")  # a link is no bottle
    assert instances_on_disk("a", state) == ["", "one", "two"]
    assert read_record(state / "a-two") == Bottle("a", "two")
    (state / "a-two" / "bottle.json").write_text("{not json")
    with pytest.raises(BottleError, match="bottle.json is unreadable"):
        read_record(state / "a-two")
    assert instances_on_disk("a", state) == ["", "one"]     # an unreadable record is skipped, not guessed


# ---- the plan -------------------------------------------------------------------------------------

def test_two_instances_share_only_the_agents_image_and_mirrors(tmp_path):
    s = settings(tmp_path)
    spec = load_spec(EXAMPLE)
    default, one, two = (make_plan(spec, s, None, name) for name in ("", "one", "two"))
    assert (default.slug, one.slug, two.slug) == ("example", "example-one", "example-two")
    for plan in (one, two):
        assert plan.bundle.name == f"bottle-{plan.slug}-bundle" and plan.guest.name == f"bottle-{plan.slug}-guest"
        assert plan.guest.workspace_volume == f"bottle-{plan.slug}-workspace"
        assert plan.state_dir == s.state_dir / plan.slug and plan.cache_dir == s.cache_dir / plan.slug
        assert plan.ca_cert.parent.parent == plan.state_dir
        assert plan.audit_dir.parent == plan.state_dir and plan.policy_dir.parent == plan.state_dir
        labels = dict(plan.labels)
        assert labels[f"{LABEL}.slug"] == plan.slug and labels[f"{LABEL}.agent"] == "example"
        assert labels[f"{LABEL}.instance"] == plan.instance
    names = [{p.bundle.name, p.guest.name, *(b.name for b in p.network.bridges)} for p in (default, one, two)]
    assert not (names[0] & names[1]) and not (names[1] & names[2]) and not (names[0] & names[2])
    # The image is the agent's: one build serves every instance.
    assert default.agent_image == one.agent_image == two.agent_image
    assert one.agent_image.tag.endswith("/agent:example")


def test_an_instance_pushes_to_its_own_namespace_and_shares_the_mirrors(tmp_path):
    agent = tmp_path / "agents" / "coder.yaml"
    agent.parent.mkdir()
    agent.write_text("command: [claude]\ngit:\n  repos:\n    - name: app\n      url: https://git.example.test/app.git\n")
    s = settings(tmp_path)
    spec = load_spec(agent)
    default, one = make_plan(spec, s, None, ""), make_plan(spec, s, None, "one")
    assert default.git.repos[0].push.branches == ("bottle/coder/*",)
    assert one.git.repos[0].push.branches == ("bottle/coder/one/*",)
    assert default.git.mirrors_dir == one.git.mirrors_dir == s.state_dir / ".mirrors" / "coder"
    assert default.git.gate_dir != one.git.gate_dir and one.git.gate_dir.parent == one.state_dir


def test_an_instance_refuses_a_workspace_directory_every_instance_would_share(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    agent = tmp_path / "coder.yaml"
    agent.write_text(f"command: [claude]\nworkspace:\n  host_path: {work}\n")
    spec = load_spec(agent)
    assert make_plan(spec, settings(tmp_path), None, "").guest.mounts[0].source == str(work)
    with pytest.raises(BottleError, match=r"coder.yaml: workspace.host_path .* needs a workspace of its own"):
        make_plan(spec, settings(tmp_path), None, "two")


# ---- subnets: claims close the window between two plans ----------------------------------------

def test_a_claim_makes_the_next_planner_step_around_and_expires(tmp_path):
    cache = tmp_path / "cache"
    write_claim(cache, "other", ("10.243.4.0/23",), now=1000.0)
    facts = with_claims(HostSubnets(), cache, "mine", now=1000.0 + CLAIM_TTL - 1)
    assert facts.taken == (ipaddress.ip_network("10.243.4.0/23"),)
    assert with_claims(HostSubnets(), cache, "mine", now=1000.0 + CLAIM_TTL + 1).taken == ()
    # A bottle's own claim is its current subnet until it has networks.
    write_claim(cache, "mine", ("10.243.8.0/23",))
    assert with_claims(HostSubnets(), cache, "mine").current == "10.243.8.0/23"
    assert with_claims(HostSubnets(current="10.243.10.0/23"), cache, "mine").current == "10.243.10.0/23"


def test_two_instances_planned_back_to_back_never_share_a_subnet(tmp_path, monkeypatch):
    """load_plan claims what it chose; a second plan of another slug that hashes anywhere steps around it."""
    from bottle_tasks.tasks import common

    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(ROOT / "agents"))
    run = new_run()

    class NoNetworks:
        def network_subnets(self):
            return {}

    blocks = set()
    for name in [f"i{n}" for n in range(40)]:
        plan = common.load_plan(EXAMPLE, run.settings, NoNetworks(), name)
        block = ipaddress.ip_network(plan.network.guest_side.subnet).supernet(new_prefix=23)
        assert block not in blocks, f"{plan.slug} got {block}, already planned for another instance"
        blocks.add(block)
    new_run()


# ---- one DB and one lock per bottle --------------------------------------------------------------

def test_each_bottle_has_its_own_doit_db(tmp_path):
    names = {dep_file(tmp_path, v) for v in ({"agent": "a"}, {"agent": "a", "name": "one"},
                                             {"agent": "a", "name": "two"}, {"agent": "b"}, {}, {"agent": "a", "all": "1"})}
    assert len(names) == 6 and all(Path(n).parent == tmp_path / "doit" for n in names)
    assert dep_file(tmp_path, {"agent": "a", "name": "one"}).endswith("/a-one.sqlite3")


def test_the_console_command_uses_the_bottles_own_db(tmp_path, monkeypatch, capsys):
    from bottle_tasks.cli import main

    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(ROOT / "agents"))
    reset_vars()
    assert main(["run", "ca:example-one", "agent=example", "name=one"]) == 0
    reset_vars()
    assert (tmp_path / "cache" / "doit" / "example-one.sqlite3").is_file()
    assert not (tmp_path / "cache" / "doit" / "example.sqlite3").exists()


LOCKER = """
import sys, time
from pathlib import Path
from bottle_tasks import locks
locks.acquire(Path(sys.argv[1]), "bottle x")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_lock_held_by_another_process_makes_the_second_wait_and_names_the_holder(tmp_path, capsys):
    path = locks.lock_path(tmp_path, "bottle-x")
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), "1.5"], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.acquire(path, "bottle x", wait=False) is False
        with pytest.raises(BottleError, match=r"bottle x stayed in use by another run \(pid \d+"):
            locks.acquire(path, "bottle x", timeout=0.3)
        assert locks.acquire(path, "bottle x") is True          # waits until the holder exits
        assert "bottle x is in use by another run (pid" in capsys.readouterr().err
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        locks.release(path)


def test_a_lock_ends_with_its_process_however_it_ends(tmp_path):
    path = locks.lock_path(tmp_path, "bottle-y")
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), "60"], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert locks.acquire(path, "bottle y", wait=False) is True
    locks.release(path)


def test_a_planted_link_or_fifo_in_the_locks_dir_is_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    path = locks.lock_path(tmp_path, "bottle-z")
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with pytest.raises(BottleError, match="is a symbolic link"):
        locks.acquire(path, "bottle z")
    assert target.read_text() == "keep"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(BottleError, match="not a regular file"):
        locks.acquire(path, "bottle z")


# ---- selection: name= and all=1 ------------------------------------------------------------------

@pytest.fixture
def bottles(tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(ROOT / "agents"))
    for bottle in (Bottle("example", "one"), Bottle("example", "two")):
        (tmp_path / "state" / bottle.slug).mkdir(parents=True)
        write_record(tmp_path / "state" / bottle.slug, bottle)
    reset_vars()
    yield tmp_path
    reset_vars()
    new_run()


class NoDocker:
    """Nothing labelled, no networks: what a host without leftovers says."""
    def labels_of_all(self, label):
        return []

    def network_subnets(self):
        return {}

    def watch(self, *names):
        pass


def _plans():
    from bottle_tasks.tasks import common

    common.new_run()
    common.current_run().docker = NoDocker()
    return list(common.plans())


def test_name_picks_one_instance_and_all_picks_every_one(bottles):
    set_var("agent", "example")
    set_var("name", "two")
    assert [p.slug for p in _plans()] == ["example-two"]
    reset_vars()
    set_var("agent", "example")
    set_var("all", "1")
    assert [p.slug for p in _plans()] == ["example", "example-one", "example-two"]


def test_name_without_agent_or_with_all_is_refused(bottles, capsys):
    set_var("name", "two")
    with pytest.raises(SystemExit):
        _plans()
    assert "say which agent too" in capsys.readouterr().err
    set_var("agent", "example")
    set_var("all", "1")
    with pytest.raises(SystemExit):
        _plans()
    assert "not both" in capsys.readouterr().err


def test_doit_list_shows_each_bottles_stages_and_the_agents_image_once(bottles):
    from bottle_tasks.tasks import bottle, images, start

    _plans()
    assert [t["name"] for t in bottle.task_guest() if t["name"].startswith("example")] == [
        "example", "example-one", "example-two"]
    assert [t["name"] for t in images.task_image_build()].count("example") == 1
    set_var("agent", "example")
    set_var("name", "one")
    _plans()
    guest = next(bottle.task_guest())
    assert guest["task_dep"] == ["preflight:example-one", "image_build:example", "bundle:example-one"]
    assert start.task_start()["task_dep"] == ["provision:example-one"]


def test_all_finds_instances_docker_holds_without_a_state_dir_but_not_another_checkouts(bottles):
    from bottle_tasks.tasks import common

    class Leftovers(NoDocker):
        def labels_of_all(self, label):
            assert label == f"{LABEL}.agent=example"
            return [{f"{LABEL}.instance": "gone", f"{LABEL}.state": str(bottles / "state" / "example-gone")},
                    {f"{LABEL}.instance": "theirs", f"{LABEL}.state": "/elsewhere/state/example-theirs"}]

    run = common.new_run()
    run.docker = Leftovers()
    assert common.instances_of("example", run) == ["", "gone", "one", "two"]


def test_the_host_leaves_a_bottles_git_dir_to_its_gate(tmp_path):
    """A bottle's git dir is its bundle's to write: render_configs makes it and the agent's mirrors
    dir, and moves nothing in them (a repo of the first layout stays where its gate uses it)."""
    from bottle_tasks.tasks.bottle import render_configs

    agent = tmp_path / "coder.yaml"
    agent.write_text("command: [claude]\ngit:\n  repos:\n    - name: app\n      url: https://git.example.test/app.git\n")
    plan = make_plan(load_spec(agent), settings(tmp_path), None, "")
    legacy = plan.git.gate_dir / "app.git"
    (legacy / "git-gate" / "queue").mkdir(parents=True)
    (legacy / "git-gate" / "queue" / "0001-push.json").write_text(json.dumps({"ref": "refs/heads/bottle/coder/x"}))
    render_configs(plan)
    assert (legacy / "git-gate" / "queue" / "0001-push.json").is_file()
    assert plan.git.mirrors_dir.is_dir() and list(plan.git.mirrors_dir.iterdir()) == []


def test_all_cleans_every_instance_dependents_first_and_never_starts_them(bottles):
    from bottle_tasks.tasks import bottle, start

    set_var("agent", "example")
    set_var("all", "1")
    chosen = _plans()
    task = start.task_start()
    assert task["task_dep"] == [f"provision:{p.slug}" for p in chosen]       # clean runs start's steps first
    swept = [args[0].slug for _fn, args in task["clean"]]
    assert swept == [slug for p in chosen for slug in (p.slug,) * 3]
    with pytest.raises(BottleError, match="all=1 is for clean"):
        bottle.preflight(chosen[0])


def test_two_bottles_that_share_a_slug_cannot_both_claim_it_when_planned_at_once(tmp_path, monkeypatch):
    """agent=ab name=cd-ef and agent=ab-cd name=ef are both bottle ab-cd-ef. Started at the same moment, both
    plan before either has a state dir (load_plan's check passes twice); they then queue on the one
    bottle lock, and the second must be refused there, not take over the first one's state dir,
    CA, workspace volume and supervise queue."""
    from bottle_tasks.tasks import bottle, common

    agents_dir = tmp_path / "agents"
    agents_dir.mkdir()
    for name in ("ab", "ab-cd"):
        (agents_dir / f"{name}.yaml").write_text("command: [claude]\n")
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(agents_dir))
    monkeypatch.setenv("BOTTLE_PIPELOCK_BIN", "/usr/bin/pipelock-test")
    reset_vars()
    run = common.new_run()
    run.docker = NoDocker()
    first = common.load_plan(agents_dir / "ab.yaml", run.settings, NoDocker(), "cd-ef")
    second = common.load_plan(agents_dir / "ab-cd.yaml", run.settings, NoDocker(), "ef")
    assert first.slug == second.slug == "ab-cd-ef"

    class Quiet:
        def preflight(self, plan):
            pass
    monkeypatch.setattr(bottle, "backend", lambda plan: Quiet())
    monkeypatch.setattr(bottle, "pipelock_ok", lambda plan, s: None)
    try:
        bottle.preflight(first)
        locks.release(bottle.bottle_lock(first))
        with pytest.raises(BottleError, match="taken by instance 'cd-ef' of agent 'ab'"):
            bottle.preflight(second)
        assert read_record(first.state_dir) == Bottle("ab", "cd-ef")
    finally:
        locks.release(bottle.bottle_lock(first))
        new_run()


def test_commands_for_one_bottle_refuse_all_rather_than_pick_one(bottles):
    from doit.exceptions import TaskFailed

    from bottle_tasks.tasks import supervise

    set_var("agent", "example")
    set_var("all", "1")
    _plans()
    task = supervise.task_approve()
    result = task["actions"][0]()
    assert isinstance(result, TaskFailed) and "all=1 is for clean" in str(result)
