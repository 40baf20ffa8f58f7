"""Writing a file whole or not at all: readers see the old file or the new one, never half of one.

Used by the bundle's daemons (status.json, git-gate's spools, the supervise store) and by the host
when it renders the bundle's config. Standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes, *, mode: int = 0o644, exclusive: bool = False,
                 fsync: bool = False) -> Path:
    """Write data (str as UTF-8) to path through a temp file in the same directory.

    The parent directories are created; the file gets exactly ``mode`` (not the umask's).
    ``fsync``: the data is on disk before the file appears. ``exclusive``: never replace an existing
    file; raise FileExistsError instead (published with link(), so of two writers exactly one wins;
    on filesystems without hard links, a best-effort check-then-rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, temp_name = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        if not exclusive:
            os.replace(temp_name, path)
            return path
        try:
            os.link(temp_name, path)  # atomic, never replaces
        except FileExistsError:
            raise
        except OSError:
            # Filesystems without hard links (some host mounts): best effort check-then-rename.
            if path.exists():
                raise FileExistsError(str(path)) from None
            os.replace(temp_name, path)
        return path
    finally:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass


def _temp_file(path: Path) -> tuple[int, str]:
    """A new 0600 file next to path, by a path as relative as path is (not tempfile.mkstemp, which
    makes it absolute: a daemon working from its state dir may not search that dir's parents)."""
    for _ in range(100):
        temp_name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), temp_name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name next to {path}")


def open_regular(path: str | Path, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """os.open that follows no link, never blocks on a FIFO, and gives only a regular file (OSError
    otherwise): for a dir the bundle can write, where a planted link or FIFO must not steer or hang the host.
    dir_fd: path is relative to that open directory (itself opened with no link followed)."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def open_directory(path: str | Path, *, dir_fd: int | None = None) -> int:
    """os.open of a directory that follows no link (OSError otherwise), for walking a dir the bundle
    can write by descriptor. dir_fd: path is relative to that open directory."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def tighten_mode(path: str | Path, mode: int) -> None:
    """chmod path to mode when it is ours and looser; someone else's (an older root-owned file) stays,
    and so does a link's target (the bundle can plant links in the dirs it shares with the host)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and info.st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, document: Any, **options: Any) -> Path:
    """atomic_write of document as indented, key-sorted JSON plus a newline (options as for atomic_write)."""
    return atomic_write(path, json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n", **options)
