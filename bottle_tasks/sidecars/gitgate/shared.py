"""What the gates of one agent share: the mirrors dir. Several bundles (one per bottle, one git-gate
each) mount it; each keeps the rest (spools, audit log, git files) in its own state dir.

- ``<mirrors_dir>/.locks/<name>.lock``: an flock every gate takes to create or fetch mirror <name>,
  so one fetch runs at a time; ``<name>.fetched``, whose mtime is the last successful fetch by any
  gate, so a gate that finds the mirror fetched within its interval fetches nothing. Both are opened
  with no link followed and only as regular files: a link planted there is refused, never followed.
- ``<name>.git/git-gate/pending/<gate>/``: one marker per ref that gate has accepted and not yet
  forwarded, with the value it pushed. Every gate's fetch leaves such a ref alone (a fetch forces the
  upstream's refs into the mirror, and would otherwise undo another gate's unforwarded push).

A gate is named by ``<state_dir>/gate-id`` (random, made at its first start).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from bottle_tasks.sidecars.files import atomic_write, open_directory, open_regular

LOCKS_DIR = ".locks"          # inside mirrors_dir
GATE_ID_FILE = "gate-id"      # inside state_dir
LOCK_POLL_S = 0.05
MAX_MARKER_BYTES = 4096
_GATE_ID = re.compile(r"^[0-9a-f]{16}$")
_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class MirrorLockError(OSError):
    """The mirror's lock could not be had: held past the deadline, or its path is no plain file."""


# ---------------------------------------------------------------------------------------------
# the lock and the fetch stamp


@dataclass(frozen=True)
class HeldMirror:
    """Mirror <name>'s lock, held: what is done here no other gate does at the same time."""
    dir_fd: int      # <mirrors_dir>/.locks, opened with no link followed
    directory: Path  # ... its path, for the errors
    name: str

    @property
    def stamp_name(self) -> str:
        return f"{self.name}.fetched"

    def fetched_within(self, seconds: float) -> bool:
        """Some gate fetched the mirror successfully less than seconds ago (a stamp from the future counts for nothing)."""
        try:
            info = os.stat(self.stamp_name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(info.st_mode) and 0 <= time.time() - info.st_mtime < seconds

    def stamp(self) -> None:
        """Record a successful fetch, for every gate."""
        try:
            fd = open_regular(self.stamp_name, os.O_WRONLY | os.O_CREAT, dir_fd=self.dir_fd)
        except OSError as exc:
            raise _refused(self.directory / self.stamp_name, exc) from None
        try:
            os.utime(fd)
        finally:
            os.close(fd)


def _refused(path: Path, exc: OSError) -> MirrorLockError:
    return MirrorLockError(exc.errno, f"{path}: not a plain directory or file ({exc.strerror}); git-gate follows "
                                      "no link here: remove it")


@contextmanager
def hold_mirror(mirrors_dir: Path, name: str, timeout: float) -> Iterator[HeldMirror]:
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
            yield HeldMirror(dir_fd, directory, name)
        finally:
            os.close(fd)  # releases the flock
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# the gate's name


def ensure_gate_id(state_dir: Path) -> str:
    """This gate's name, made at its first start; the same across restarts (the state dir is kept)."""
    existing = gate_id(state_dir)
    if existing:
        return existing
    try:
        atomic_write(state_dir / GATE_ID_FILE, secrets.token_hex(8) + "\n", exclusive=True)
    except FileExistsError:
        pass  # made meanwhile
    made = gate_id(state_dir)
    if not made:
        raise OSError(f"{state_dir / GATE_ID_FILE}: not a gate id; remove it and start again")
    return made


def gate_id(state_dir: Path) -> str:
    """"" when there is none (yet)."""
    try:
        fd = open_regular(state_dir / GATE_ID_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        text = handle.read(64).decode("ascii", "replace").strip()
    return text if _GATE_ID.match(text) else ""


# ---------------------------------------------------------------------------------------------
# refs accepted and not yet forwarded, by any gate


def _marker_name(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()[:40] + ".json"


def _gate_dir(pending: Path, gate: str, *, create: bool) -> int | None:
    """pending/<gate>, opened with no link followed (None when absent and not create). Every bundle of
    the agent writes the mirror and mounts its own state at the same path: a link planted here by
    another would steer this gate's deletes and writes into this gate's own spools."""
    if create:
        (pending / gate).mkdir(parents=True, exist_ok=True)  # a link there: the open below refuses it
    try:
        return open_directory(pending / gate)
    except FileNotFoundError:
        if create:
            raise
        return None


def mark_pending(pending: Path, gate: str, ref: str, new: str) -> None:
    """ref, pushed to new through this gate, waits to be forwarded: no gate's fetch may undo it."""
    name = _marker_name(ref)
    text = (json.dumps({"ref": ref, "new": new}) + "\n").encode()
    dir_fd = _gate_dir(pending, gate, create=True)
    try:
        try:
            with os.fdopen(open_regular(name, os.O_RDONLY, dir_fd=dir_fd), "rb") as handle:
                if handle.read(MAX_MARKER_BYTES) == text:
                    return
        except OSError:
            pass
        temp = f".{name}.{secrets.token_hex(6)}.tmp"
        with os.fdopen(open_regular(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd), "wb") as handle:
            handle.write(text)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def reconcile_pending(pending: Path, gate: str, queued: Callable[[], Mapping[str, str]]) -> None:
    """Make this gate's markers name what its queue holds (queued(): ref -> the value last pushed).
    Stale markers go first, then every queued ref is marked from a second read of the queue: a hook
    that queues meanwhile (it marks after it queues) is marked by it or by this."""
    before = queued()
    dir_fd = _gate_dir(pending, gate, create=False)
    if dir_fd is not None:
        try:
            wanted = {_marker_name(ref) for ref in before}
            for name in os.listdir(dir_fd):
                if name.endswith(".json") and name not in wanted:
                    try:
                        os.unlink(name, dir_fd=dir_fd)
                    except FileNotFoundError:
                        pass
        finally:
            os.close(dir_fd)
    for ref, new in queued().items():
        mark_pending(pending, gate, ref, new)


def marked_refs(pending: Path, current: Mapping[str, str]) -> set[str]:
    """The refs some gate's marker names at the value the mirror has now (current: ref -> oid). A
    marker whose ref has moved on since (or never was) counts for nothing, so one left behind by a
    gate that is gone holds a ref only until that ref is pushed again."""
    held: set[str] = set()
    try:
        gates = os.listdir(pending)
    except FileNotFoundError:
        return held
    for gate in gates:
        try:
            names = os.listdir(pending / gate)
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            entry = _read_marker(pending / gate / name)
            if entry and current.get(entry[0]) == entry[1]:
                held.add(entry[0])
    return held


def _read_marker(path: Path) -> tuple[str, str] | None:
    try:
        fd = open_regular(path, os.O_RDONLY)
    except OSError:
        return None  # gone meanwhile, a link, a FIFO: not a marker
    try:
        with os.fdopen(fd, "rb") as handle:
            entry = json.loads(handle.read(MAX_MARKER_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    ref, new = entry.get("ref"), entry.get("new")
    if not isinstance(ref, str) or not isinstance(new, str) or not _OID.match(new):
        return None
    return ref, new
