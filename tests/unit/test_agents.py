"""Where agent files are found (the search path), `bottle init`, and what the package ships."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath

import pytest

from bottle_tasks import agents, cli
from bottle_tasks.errors import BottleError
from bottle_tasks.settings import PACKAGE_DIR, ROOT, package_dir
from bottle_tasks.spec import SpecError, load_spec


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), **extra}


def test_the_search_path_is_the_setting_then_dot_agents_then_the_config_dir(tmp_path):
    cwd = tmp_path / "work"
    dirs = agents.agent_dirs(_env(tmp_path, BOTTLE_AGENTS_DIR=str(tmp_path / "mine")), cwd)
    assert dirs == (tmp_path / "mine", cwd / "agents", tmp_path / "home" / ".config" / "claude-bottle" / "agents")
    assert agents.agent_dirs(_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg")), cwd) == (
        cwd / "agents", tmp_path / "xdg" / "claude-bottle" / "agents")
    assert agents.agent_dirs(_env(tmp_path, BOTTLE_AGENTS_DIR="rel"), cwd)[0] == cwd / "rel"


def test_the_first_file_on_the_path_wins_and_each_name_is_listed_once(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, names in ((first, ["one", "both"]), (second, ["both", "two"])):
        directory.mkdir()
        for name in names:
            (directory / f"{name}.yaml").write_text("routes: []\n")
    assert agents.find_agent_file("both", (first, second)) == first / "both.yaml"
    assert agents.find_agent_file("two", (first, second)) == second / "two.yaml"
    assert agents.agent_files((first, second)) == [first / "both.yaml", first / "one.yaml", second / "two.yaml"]


def test_an_unknown_agent_names_every_place_searched_and_the_way_to_make_one(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "known.yaml").write_text("routes: []\n")
    with pytest.raises(SpecError) as caught:
        agents.find_agent_file("nope", (first, second))
    message = str(caught.value)
    assert str(first / "nope.yaml") in message and "no such agent file" in message
    assert str(first) in message and str(second) in message and "bottle init nope" in message and "known" in message


def test_init_writes_a_valid_starter_where_the_path_looks_and_never_over_a_file(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = _env(tmp_path)
    assert agents.init_dir(env, cwd) == tmp_path / "home" / ".config" / "claude-bottle" / "agents"
    (cwd / "agents").mkdir()
    assert agents.init_dir(env, cwd) == cwd / "agents"
    assert agents.init_dir(_env(tmp_path, BOTTLE_AGENTS_DIR=str(tmp_path / "mine")), cwd) == tmp_path / "mine"
    path = agents.write_starter("my-agent", cwd / "agents")
    spec = load_spec(path)
    assert spec.name == "my-agent" and [route.host for route in spec.routes] == ["api.anthropic.com"]
    assert "ANTHROPIC_API_KEY" in path.read_text() and "bottle start agent=my-agent" in path.read_text()
    before = path.read_text()
    with pytest.raises(BottleError, match="exists already"):
        agents.write_starter("my-agent", cwd / "agents")
    assert path.read_text() == before
    with pytest.raises(BottleError, match="not usable"):
        agents.write_starter("../escape", cwd / "agents")
    assert sorted(p.name for p in (cwd / "agents").iterdir()) == ["my-agent.yaml"]


def test_bottle_init_is_a_command_of_its_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(tmp_path / "agents"))
    assert cli.main(["init", "helper"]) == 0
    assert (tmp_path / "agents" / "helper.yaml").is_file()
    assert "bottle start agent=helper" in capsys.readouterr().out
    assert cli.main(["init"]) == 2 and "usage: bottle init <name>" in capsys.readouterr().err
    assert cli.main(["init", "helper"]) == 2 and "exists already" in capsys.readouterr().err


def test_templates_and_images_are_package_data_read_from_the_package():
    assert package_dir("templates") == PACKAGE_DIR / "templates"
    assert package_dir("images") == PACKAGE_DIR / "images"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bottle_tasks"]
    shipped = [path.relative_to(PACKAGE_DIR).as_posix() for name in ("templates", "images", "schema")
               for path in (PACKAGE_DIR / name).rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    def matches(path: str, glob: str) -> bool:    # setuptools' glob: "*" stays within one directory
        return len(PurePosixPath(path).parts) == len(PurePosixPath(glob).parts) and PurePosixPath(path).match(glob)

    assert shipped and [path for path in shipped if not any(matches(path, glob) for glob in globs)] == []


def test_missing_package_data_is_a_clear_error():
    with pytest.raises(BottleError, match="package data nowhere/ is missing"):
        package_dir("nowhere")
