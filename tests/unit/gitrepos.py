"""Real git for the git-gate tests: running it, reading a ref, committing, and a clean environment
(no GIT_* variable of the machine's, no system or user config) with a repo that has one commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def git(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, input=input_text)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def rev(repo: Path, ref: str) -> str | None:
    result = git("rev-parse", "--verify", "--quiet", ref, cwd=repo, check=False)
    return result.stdout.strip() or None


def commit_file(work: Path, name: str, content: str, message: str) -> str:
    (work / name).write_text(content)
    git("add", name, cwd=work)
    git("commit", "--quiet", "-m", message, cwd=work)
    return rev(work, "HEAD")


def clean_git_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def one_commit_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/work on main with base.txt, in a clean git environment (HOME is tmp_path)."""
    clean_git_env(monkeypatch, tmp_path)
    work = tmp_path / "work"
    git("init", "--quiet", "-b", "main", str(work))
    git("config", "user.name", "T", cwd=work)
    git("config", "user.email", "t@example.invalid", cwd=work)
    commit_file(work, "base.txt", "base\n", "base")
    return work
