"""Where the bundle build takes pipelock from (settings.pipelock_source), what stops it
(pipelock_problem, pipelock_binary_choice), and the pipelock_binary task that pulls the image."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import pytest
from doit.doit_cmd import reset_vars, set_var

from bottle_tasks.errors import BottleError
from bottle_tasks.plan import make_plan
from bottle_tasks.settings import (
    DEFAULT_PIPELOCK_IMAGE, ROOT, Settings, local_pipelock, pipelock_binary_choice, pipelock_problem, pipelock_source,
)
from bottle_tasks.spec import load_spec
from bottle_tasks.tasks import common, images
from tests.unit.fakes import FakeRunner


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "nowhere"),
                              "BOTTLE_STATE_DIR": str(tmp_path / "state"), "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), **env})


LOCAL = Path("/opt/local/pipelock")


@pytest.mark.parametrize("env, expected", [
    ({}, (LOCAL, DEFAULT_PIPELOCK_IMAGE)),                                   # the image, the local binary as fallback
    ({"BOTTLE_PIPELOCK_IMAGE": "registry.local:5000/pl:2.3.0"}, (LOCAL, "registry.local:5000/pl:2.3.0")),
    ({"BOTTLE_PIPELOCK_IMAGE": ""}, (LOCAL, "")),                            # no image: the local binary alone
    ({"BOTTLE_PIPELOCK_BIN": "/srv/pl"}, (Path("/srv/pl"), "")),             # the override: nothing is pulled
    ({"BOTTLE_PIPELOCK_BIN": "/srv/pl", "BOTTLE_PIPELOCK_IMAGE": "x/y:1"}, (Path("/srv/pl"), "")),
    ({"BOTTLE_PIPELOCK": "off", "BOTTLE_PIPELOCK_BIN": "/srv/pl"}, (None, "")),  # off keeps pipelock out
    ({"BOTTLE_PIPELOCK": "required"}, (LOCAL, DEFAULT_PIPELOCK_IMAGE)),
])
def test_selection_order(env, expected):
    assert pipelock_source(env, LOCAL) == expected


def test_without_a_local_binary_the_image_is_all(tmp_path):
    assert pipelock_source({}, None) == (None, DEFAULT_PIPELOCK_IMAGE)
    assert pipelock_source({"BOTTLE_PIPELOCK_IMAGE": ""}, None) == (None, "")


def test_the_local_binary_is_on_path_or_in_go_bin(tmp_path):
    home = tmp_path / "home"
    assert local_pipelock({"HOME": str(home), "PATH": str(tmp_path / "bin")}) is None
    go_bin = executable(home / "go/bin/pipelock")
    assert local_pipelock({"HOME": str(home), "PATH": str(tmp_path / "bin")}) == go_bin
    on_path = executable(tmp_path / "bin" / "pipelock")
    assert local_pipelock({"HOME": str(home), "PATH": str(tmp_path / "bin")}) == on_path


def test_the_plan_runs_pipelock_from_the_image_alone_and_keeps_it_out_when_off(tmp_path):
    spec = load_spec(ROOT / "agents" / "example.yaml")
    assert make_plan(spec, settings(tmp_path)).pipelock_enabled
    assert not make_plan(spec, settings(tmp_path, BOTTLE_PIPELOCK="off")).pipelock_enabled
    assert not make_plan(spec, settings(tmp_path, BOTTLE_PIPELOCK_IMAGE="")).pipelock_enabled


@pytest.mark.parametrize("env, setting", [
    ({"BOTTLE_PIPELOCK": "of"}, "BOTTLE_PIPELOCK="),
    ({"BOTTLE_PIPELOCK_IMAGE": "Not An Image!"}, "BOTTLE_PIPELOCK_IMAGE="),
    ({"BOTTLE_PIPELOCK_IMAGE": ""}, "BOTTLE_PIPELOCK=off"),         # nothing found: every way out is named
    ({"BOTTLE_PIPELOCK_BIN": "/nonexistent/pipelock"}, "BOTTLE_PIPELOCK_BIN"),
])
def test_each_problem_names_the_setting_to_change(tmp_path, env, setting):
    problem = pipelock_problem(settings(tmp_path, **env))
    assert problem is not None and setting in problem
    if env.get("BOTTLE_PIPELOCK_IMAGE") == "":
        assert "BOTTLE_PIPELOCK_IMAGE" in problem and "BOTTLE_PIPELOCK_BIN" in problem


def test_no_problem_when_off_or_set(tmp_path):
    assert pipelock_problem(settings(tmp_path, BOTTLE_PIPELOCK="off", BOTTLE_PIPELOCK_IMAGE="Not An Image!")) is None
    assert pipelock_problem(settings(tmp_path)) is None  # the default image: whether it pulls is the task's to find
    binary = executable(tmp_path / "pl")
    assert pipelock_problem(settings(tmp_path, BOTTLE_PIPELOCK_BIN=str(binary))) is None


def test_after_the_pull_the_image_wins_then_the_fallback_then_an_error(tmp_path):
    pulled = tmp_path / "pulled"
    fallback = executable(tmp_path / "home/go/bin/pipelock")
    s = settings(tmp_path)
    assert s.pipelock_bin == fallback
    assert pipelock_binary_choice(s, pulled, "") == pulled
    assert pipelock_binary_choice(s, None, "no route to ghcr.io") == fallback
    with pytest.raises(BottleError) as raised:
        pipelock_binary_choice(replace(s, pipelock_bin=None), None, "no route to ghcr.io")
    message = str(raised.value)
    assert "no route to ghcr.io" in message
    assert all(name in message for name in ("BOTTLE_PIPELOCK_IMAGE", "BOTTLE_PIPELOCK_BIN", "BOTTLE_PIPELOCK=off"))


# -- the pipelock_binary task ---------------------------------------------------------------------


@pytest.fixture
def run_with(monkeypatch):
    def install(s: Settings, runner: FakeRunner) -> None:
        monkeypatch.setattr(common, "_run", common.Run(s, common.Docker(runner=runner)))
    yield install


def docker_cp_writes(argv):
    Path(argv[-1]).write_bytes(b"\x7fELF pipelock")
    return 0, "", ""


def test_the_image_is_pulled_only_when_absent_and_its_binary_copied_out(tmp_path, run_with):
    s = settings(tmp_path)
    runner = FakeRunner({("docker", "image", "inspect"): (1, "", "No such image"), ("docker", "cp"): docker_cp_writes})
    run_with(s, runner)
    images.fetch_pipelock(s)
    target = images.pulled_pipelock(s)
    assert target.read_bytes() == b"\x7fELF pipelock" and target.stat().st_mode & stat.S_IXUSR
    assert runner.commands("docker", "pull") == [["docker", "pull", DEFAULT_PIPELOCK_IMAGE]]
    (create,) = runner.commands("docker", "create")
    assert create[-1] == DEFAULT_PIPELOCK_IMAGE and runner.commands("docker", "rm")  # created, copied from, removed
    (copy,) = runner.commands("docker", "cp")
    assert copy[2].endswith(":/pipelock")

    present = FakeRunner({("docker", "image", "inspect"): (0, '[{"Id": "sha256:1"}]', ""), ("docker", "cp"): docker_cp_writes})
    run_with(s, present)
    images.fetch_pipelock(s)
    assert present.commands("docker", "pull") == []


def test_an_image_that_cannot_be_pulled_falls_back_to_the_local_binary(tmp_path, run_with, capsys):
    executable(tmp_path / "home/go/bin/pipelock").write_text("#!/bin/sh\necho local\n")
    s = settings(tmp_path)
    run_with(s, FakeRunner({("docker", "image", "inspect"): (1, "", ""),
                            ("docker", "pull"): (1, "", "dial tcp: lookup ghcr.io: no such host")}))
    images.fetch_pipelock(s)
    assert images.pulled_pipelock(s).read_text() == "#!/bin/sh\necho local\n"
    assert "no such host" in capsys.readouterr().out

    s = replace(s, pipelock_bin=None)
    run_with(s, FakeRunner({("docker", "image", "inspect"): (1, "", ""), ("docker", "pull"): (1, "", "denied")}))
    with pytest.raises(BottleError, match="BOTTLE_PIPELOCK_IMAGE"):
        images.fetch_pipelock(s)


def test_the_bundle_build_waits_for_the_binary_and_an_unchanged_start_pulls_nothing(tmp_path, monkeypatch):
    for name, value in {"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "nowhere"),
                        "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), "BOTTLE_STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(name, value)
    for name in ("BOTTLE_PIPELOCK", "BOTTLE_PIPELOCK_BIN", "BOTTLE_PIPELOCK_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    reset_vars()
    set_var("agent", "example")
    try:
        common.new_run()
        s = common.settings()
        task = images.task_pipelock_binary()
        assert task["targets"] == [str(images.pulled_pipelock(s))]
        # One config_changed (two would make it stale forever): an unchanged start finds the target and pulls nothing.
        (uptodate,) = task["uptodate"]
        assert uptodate.config == {"image": DEFAULT_PIPELOCK_IMAGE, "fallback": []}
        assert str(images.pulled_pipelock(s)) in images.task_bundle_build()["file_dep"]  # doit runs pipelock_binary first
        monkeypatch.setenv("BOTTLE_PIPELOCK_IMAGE", "")
        common.new_run()
        assert images.task_pipelock_binary()["actions"] is None and images.bundle_pipelock(common.settings()) is None
    finally:
        reset_vars()
        common.new_run()
