"""Running git: a timeout that lets git clean up, and the few questions git-gate asks it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Mapping, Sequence

BACKGROUND_GIT_TIMEOUT_S = 600.0


def run_git(args: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            input: bytes | None = None, timeout: float = BACKGROUND_GIT_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """``git <args>``; on timeout git gets SIGTERM first, so it removes its lock files."""
    process = subprocess.Popen(
        ["git", *args], cwd=cwd, env=dict(env) if env is not None else None,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        err += f"\ngit-gate: git {args[0]} timed out after {timeout:.0f}s".encode()
        return subprocess.CompletedProcess(process.args, 124, out, err)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def is_zero(oid: str) -> bool:
    """The all-zero object id: a ref that is being created (as old) or deleted (as new)."""
    return set(oid) == {"0"}


def is_ancestor(repo_dir: Path, old: str, new: str, env: Mapping[str, str] | None = None) -> bool:
    return run_git(["merge-base", "--is-ancestor", old, new], cwd=repo_dir, env=env).returncode == 0


def git_error_line(stderr: bytes | str) -> str:
    """The most telling line of git's stderr: the first fatal/error/rejection, else the first line."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:", "!", "remote: error", "git-gate:")):
            return line[:300]
    return lines[0][:300] if lines else ""
