"""Host-wide locks between concurrent doit runs: flock on a file under the cache dir, held by this process.

A lock is released when its holder lets go or its process ends, however it ends, so a killed run never
leaves a stale lock. Files are opened without following links, so a link planted in the locks dir
cannot make a run open (or create) something elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bottle_tasks.errors import BottleError
from bottle_tasks.sidecars.files import open_regular

_held: dict[Path, int] = {}     # the locks this process holds until release() or exit


def lock_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / "locks" / f"{name}.lock"


def _open(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return open_regular(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BottleError(f"{path} is a symbolic link; remove it (locks are plain files)") from None
        if exc.errno == errno.EINVAL:
            raise BottleError(f"{path} is not a regular file; remove it (locks are plain files)") from None
        raise BottleError(f"cannot open the lock {path}: {exc.strerror}") from None


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def acquire(path: Path, what: str, *, wait: bool = True, timeout: float | None = None) -> bool:
    """Hold the lock at path until release(path) or the end of the process. When another run holds it:
    say so (naming what it guards and who holds it) and wait, or return False when wait is off."""
    if path in _held:
        return True
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return False
        holder = _holder(fd)
        print(f"claude-bottle: {what} is in use by another run ({holder or 'pid unknown'}); waiting for it",
              file=sys.stderr, flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    os.close(fd)
                    raise BottleError(f"{what} stayed in use by another run ({holder or 'pid unknown'}) for "
                                      f"{timeout:.0f} s; wait for it to finish, then run the command again") from None
                time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
    _held[path] = fd
    return True


def release(path: Path) -> None:
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)      # closing the descriptor drops the flock


def held(path: Path) -> bool:
    return path in _held


@contextmanager
def holding(path: Path, what: str) -> Iterator[None]:
    """The lock for the duration of a block (a lock this process already held stays held after it)."""
    already = held(path)
    acquire(path, what)
    try:
        yield
    finally:
        if not already:
            release(path)
