"""The tool as a user installs it (issue 12): the built wheel in a fresh venv, run outside the checkout
with agents found on the search path, starts a real bottle and cleans it away.

The venv gets the project's dependencies from the package index, as `pipx install` would; the images
get a prefix of their own, so the shared images the other tests use are never retagged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bottle_tasks.labels import LABEL
from bottle_tasks.settings import ROOT
from tests.integration.conftest import docker

AGENT = "wheel-probe"
IMAGE_PREFIX = "claude-bottle-wheel-test"


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(bottle_env, tmp_path_factory):
    """A venv outside the checkout holding only the wheel (and its dependencies); its bin dir."""
    root = tmp_path_factory.mktemp("wheel")
    env = {**bottle_env.test_env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(ROOT)], root, env)
    (wheel,) = (root / "dist").glob("claude_bottle-*.whl")
    _run([sys.executable, "-m", "venv", str(root / "venv")], root, env)
    _run([str(root / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], root, env)
    return root, root / "venv" / "bin"


def test_the_installed_wheel_starts_and_cleans_a_bottle_from_any_directory(bottle_env, installed):
    root, bin_dir = installed
    work = root / "work"
    work.mkdir()
    bottle = str(bin_dir / "bottle")
    env = {key: value for key, value in bottle_env.env.items() if key not in ("BOTTLE_AGENTS_DIR", "PYTHONPATH")}
    env.update({"HOME": str(root / "home"), "BOTTLE_IMAGE_PREFIX": IMAGE_PREFIX,
                "BOTTLE_STATE_DIR": str(root / "state"), "BOTTLE_CACHE_DIR": str(root / "cache")})
    # The installed package is the one that runs: not the checkout's, which is not on its path.
    where = _run([str(bin_dir / "python"), "-c", "import bottle_tasks; print(bottle_tasks.__file__)"], work, env).stdout
    assert str(root / "venv") in where and str(ROOT) not in where
    # An agent of the user's own, made by init, found in the config dir of the search path.
    _run([bottle, "init", AGENT], work, env)
    agent_file = root / "home" / ".config" / "claude-bottle" / "agents" / f"{AGENT}.yaml"
    agent_file.write_text("routes: []\n")
    listed = _run([bottle, "list", f"agent={AGENT}"], work, env).stdout
    assert "start" in listed and "image_build" in listed
    try:
        _run([bottle, "start", f"agent={AGENT}", "command=true"], work, env)
        running = docker("ps", "--filter", f"label={LABEL}.agent={AGENT}", "--format", "{{.Names}}").stdout.split()
        assert running, "start returned but no container of the bottle runs"
    finally:
        subprocess.run([bottle, "clean", f"agent={AGENT}", "purge=1"], cwd=work, env=env, capture_output=True, timeout=600)
        for tag in docker("images", "--format", "{{.Repository}}:{{.Tag}}", f"{IMAGE_PREFIX}/*").stdout.split():
            docker("rmi", tag, check=False)
    left = [*docker("ps", "-a", "--filter", f"label={LABEL}.agent={AGENT}", "--format", "{{.Names}}").stdout.split(),
            *docker("network", "ls", "--filter", f"label={LABEL}.agent={AGENT}", "--format", "{{.Name}}").stdout.split()]
    assert left == [], left
