"""Running git: a timeout that lets git clean up, git read as a stream, and the few questions git-gate asks it."""

from __future__ import annotations

import functools
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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


class GitStream:
    """A git whose stdout is read as a stream. input, when given, is written by a thread (git may
    answer before it has read it all: neither side waits on the other). stderr is kept (its first
    64 KiB). git is killed if left early or when it runs longer than timeout."""

    def __init__(self, args: Sequence[str], repo_dir: Path, env: Mapping[str, str] | None, *,
                 input: bytes | None = None, stdin: Any = None, timeout: float = BACKGROUND_GIT_TIMEOUT_S):
        if input is not None:
            stdin = subprocess.PIPE
        self.process = subprocess.Popen(["git", *args], cwd=repo_dir, env=dict(env) if env is not None else None,
                                        stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.errors: list[bytes] = []
        self.timeout = timeout
        self.timed_out = False
        self._threads = [threading.Thread(target=self._read_errors, daemon=True)]
        if input is not None:
            self._threads.append(threading.Thread(target=self._write, args=(input,), daemon=True))
        for thread in self._threads:
            thread.start()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.process.kill()  # its stdout ends, so the reader stops

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        try:
            self.errors.append(self.process.stderr.read(1 << 16))
            self.process.stderr.read()
        except (OSError, ValueError):
            pass

    def _write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(data)
        except (OSError, ValueError):
            pass  # git left early; close() tells why
        finally:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    @property
    def stdout(self) -> Any:
        assert self.process.stdout is not None
        return self.process.stdout

    def lines(self, piece: int) -> Iterator[bytes]:
        """stdout in pieces of at most piece bytes; a longer line comes in several."""
        return iter(functools.partial(self.stdout.readline, piece), b"")

    def records(self, piece: int, separator: bytes = b"\0") -> Iterator[tuple[bytes, bool]]:
        """stdout cut at separator (dropped) as (piece, whether it ends its record); a record longer
        than piece bytes comes in several pieces."""
        pending = b""
        while data := self.stdout.read1(1 << 16):
            pending += data
            start = 0
            while (cut := pending.find(separator, start)) >= 0:
                yield pending[start:cut], True
                start = cut + len(separator)
            while len(pending) - start >= piece:
                yield pending[start:start + piece], False
                start += piece
            pending = pending[start:]
        if pending:
            yield pending, True

    def close(self, what: str) -> None:
        """Wait for a git that was read to the end; RuntimeError when it failed."""
        code = self.process.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.timed_out:
            raise RuntimeError(f"git {what} timed out after {self.timeout:.0f} s")
        if code != 0:
            raise RuntimeError(f"git {what} failed: {git_error_line(b''.join(self.errors))}")

    def __enter__(self) -> "GitStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for thread in self._threads:
            thread.join(timeout=5)  # stderr ends with the process, and so does stdin
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
