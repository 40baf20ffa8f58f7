"""What the gates of one agent share: the mirrors dir, which every bundle of the agent mounts and
writes. It holds objects and a lock, nothing any gate runs or takes a ref from:

- ``<mirrors_dir>/<name>.objects/``: a git objects dir, the objects fetched from the upstream. Each
  gate's own repo (``<state_dir>/<name>.git``: refs, config, hooks) borrows them as an alternate, and
  its fetch writes there, so what one gate has fetched no other gate downloads again (its fetch only
  lists the upstream's refs). Every gate takes its refs from the upstream itself, and a sibling
  bundle's writes here can at worst corrupt or remove objects: git checks every object it receives
  against its name, and the gates' git config takes no code, ref or commit graph from an alternate
  (``daemon.GITCONFIG``).
- ``<mirrors_dir>/.locks/<name>.lock``: an flock every gate holds while it fetches, so a second gate
  waits and then finds the objects there. Opened with no link followed and only as a regular file:
  a link planted there is refused, never followed.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bottle_tasks.sidecars.files import open_directory, open_regular

LOCKS_DIR = ".locks"          # inside mirrors_dir
LOCK_POLL_S = 0.05


class MirrorLockError(OSError):
    """The mirror's lock could not be had: held past the deadline, or its path is no plain file."""


def _refused(path: Path, exc: OSError) -> MirrorLockError:
    return MirrorLockError(exc.errno, f"{path}: not a plain directory or file ({exc.strerror}); git-gate follows "
                                      "no link here: remove it")


@contextmanager
def hold_mirror(mirrors_dir: Path, name: str, timeout: float) -> Iterator[None]:
    """Mirror <name>'s inter-process lock, waited for at most timeout seconds (MirrorLockError after)."""
    directory = mirrors_dir / LOCKS_DIR
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a link or file there: the open below says so
    try:
        dir_fd = open_directory(directory)
    except OSError as exc:
        raise _refused(directory, exc) from None
    try:
        try:
            fd = open_regular(f"{name}.lock", os.O_RDWR | os.O_CREAT, dir_fd=dir_fd)
        except OSError as exc:
            raise _refused(directory / f"{name}.lock", exc) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise MirrorLockError(f"another gate held {directory / f'{name}.lock'} (creating or fetching "
                                              f"{name}) for more than {timeout:g} s") from None
                    time.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        os.close(dir_fd)
