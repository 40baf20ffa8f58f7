"""The task graph as doit sees it: names, dependencies and what each image build depends on."""

from __future__ import annotations


import pytest
from doit.doit_cmd import reset_vars, set_var

from bottle_tasks.cli import main
from bottle_tasks.reporter import HANDS_OVER
from bottle_tasks.tasks.common import new_run
from bottle_tasks.settings import IMAGES_DIR, ROOT


@pytest.fixture
def agent_var(monkeypatch, tmp_path):
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    reset_vars()
    set_var("agent", "example")
    new_run()       # this test's settings, not an earlier test's
    yield
    reset_vars()


def _one(generator, name):
    return next(t for t in generator if t["name"] == name)


def test_image_builds_depend_on_their_dockerfile_and_write_a_digest_file(agent_var):
    from bottle_tasks.tasks import images

    task = _one(images.task_image_build(), "example")
    assert str(IMAGES_DIR / "agent" / "Dockerfile") in task["file_dep"]
    assert task["targets"][0].endswith("agent.iid")
    bundle = images.task_bundle_build()
    assert str(IMAGES_DIR / "bundle" / "Dockerfile") in bundle["file_dep"]
    assert str(ROOT / "bottle_tasks" / "sidecars" / "egress.py") in bundle["file_dep"]


def test_every_image_build_depends_on_the_staged_build_cas(agent_var):
    from bottle_tasks.tasks import images
    from bottle_tasks.tasks.common import settings

    staged = str(images.staged_trust(settings()))
    trust = images.task_build_trust()
    # build_trust runs every start and rewrites the file only when the CAs change; doit runs it
    # before the builds because its target is their file_dep, which need not exist yet.
    assert trust["targets"] == [staged] and trust["uptodate"] == [False]
    assert staged in _one(images.task_image_build(), "example")["file_dep"]
    assert staged in images.task_bundle_build()["file_dep"]


def test_stages_chain_through_real_dependencies(agent_var):
    from bottle_tasks.tasks import bottle, start

    assert _one(bottle.task_networks(), "example")["task_dep"] == ["preflight:example"]
    bundle_deps = _one(bottle.task_bundle(), "example")["task_dep"]
    assert {"bundle_build", "render:example", "ca:example", "networks:example"} <= set(bundle_deps)
    assert bundle_deps[0] == "preflight:example"
    # In this order: doit runs deps as listed, and the cheap checks must come before any build.
    assert _one(bottle.task_guest(), "example")["task_dep"] == ["preflight:example", "image_build:example", "bundle:example"]
    assert start.task_start()["task_dep"] == ["provision:example"]
    # The reporter prints the stages' timings before this task hands the terminal to the agent.
    assert start.task_start()["meta"] == {HANDS_OVER: True}


def test_console_command_lists_the_tasks_outside_the_checkout(capsys, monkeypatch, tmp_path):
    # Outside the checkout its agents/ is not on the search path: an agent of the user's own is.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BOTTLE_AGENTS_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["init", "mine"]) == 0
    assert (tmp_path / ".config" / "claude-bottle" / "agents" / "mine.yaml").is_file()
    assert main(["list", "agent=mine"]) == 0
    out = capsys.readouterr().out
    for name in ("start", "build_trust", "image_build", "bundle_build", "provision"):
        assert name in out

