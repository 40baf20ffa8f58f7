"""The bottle's audit stream: one JSON line per decision, from every daemon, in one file per bottle.

    <state dir>/audit/audit.jsonl      (also reachable as <state dir>/audit.jsonl, a link the host makes)
    <state dir>/audit/audit.jsonl.1 .. .3   older lines, rotated by size; clean keeps them, purge deletes

The shape of a line is docs/audit.md and bottle_tasks/schema/audit-v1.schema.json; ``audit_record``
builds it, and nothing else does.

Who writes. Every daemon holds an ``AuditWriter``. In the bundle, init hands each daemon the write end
of one pipe (``$BOTTLE_AUDIT_FD``) and runs the ``audit`` daemon (this module's ``main``) with the read
end as its stdin: that one process appends to the file and rotates it, as the owner of the state dir,
so the files are the host user's and no two processes rotate at once. A line is at most
``MAX_LINE_BYTES``, below PIPE_BUF, so lines from several daemons never interleave. The pipe is
non-blocking: when the sink falls behind (a flood), a writer drops the line and counts it, and the
next line it gets through says how many were lost (``dropped``), so a flood never stalls egress.
Outside the bundle (the host deciding an approval, tests) a writer appends to the file itself, under
the same lock the sink takes.

Who reads. The host: ``doit logs`` (``follow_lines``, across rotations) and ``doit status``
(``records_since``, the last hour read from the end of the file).

What a line never holds: a token value (each daemon's scrubber replaces them with their
placeholders), anything a DLP rule matches (``dlp.redact`` over the whole line), a query string, a
header value or a body. Standard library only (plus the package's own dlp and scrub modules).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TextIO

from bottle_tasks.sidecars import dlp
from bottle_tasks.sidecars.files import open_regular
from bottle_tasks.sidecars.scrub import SecretScrubber

SCHEMA_VERSION = 1
AUDIT_FILE = "audit.jsonl"
AUDIT_FD_ENV = "BOTTLE_AUDIT_FD"
AUDIT_DIR_ENV = "BOTTLE_AUDIT_DIR"
SLUG_ENV = "BOTTLE_SLUG"
SOURCES = ("egress", "pipelock", "dns", "git-gate", "supervise", "init", "host")
DECISIONS = ("allow", "block", "hold", "learn", "redact", "log", "warn", "approve", "deny", "expire", "info")
# Below PIPE_BUF (4096 on Linux): one write() of a line is atomic on a pipe shared by many writers.
MAX_LINE_BYTES = 3800
READ_LINE_BYTES = 64 << 10   # a reader's bound: well past a line the sink stamped, far below a planted endless one
MAX_FIELD_CHARS = {"reason": 600, "fix": 900, "path": 400, "host": 253, "event": 64, "reason_code": 64,
                   "request_id": 64, "method": 16}
PIPE_BYTES = 1 << 20         # the pipe's buffer (F_SETPIPE_SZ), the default pipe-max-size
ROTATE_BYTES = 16 << 20     # one file; with ROTATE_KEEP older ones, at most 64 MiB per bottle
ROTATE_KEEP = 3
FILE_MODE = 0o600
DIR_MODE = 0o700


def utc_stamp(moment: float | None = None) -> str:
    """2026-12-02T12:00:00.123Z"""
    when = datetime.fromtimestamp(time.time() if moment is None else moment, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def audit_record(source: str, event: str, decision: str, *, reason_code: str = "", reason: str = "",
                 request_id: str = "", method: str = "", host: str = "", port: int | None = None, path: str = "",
                 dlp_pattern: str = "", dlp_where: str = "", fix: str = "", detail: Mapping[str, Any] | None = None,
                 bottle: str = "", ts: str | None = None) -> dict[str, Any]:
    """One line of the stream, as a dict in schema order. The path loses its query and fragment."""
    if source not in SOURCES:
        raise ValueError(f"audit source must be one of {', '.join(SOURCES)}, not {source!r}")
    if decision not in DECISIONS:
        raise ValueError(f"audit decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    record: dict[str, Any] = {
        "v": SCHEMA_VERSION, "ts": ts or utc_stamp(), "bottle": bottle, "source": source,
        "event": _clip(event, MAX_FIELD_CHARS["event"]), "decision": decision,
        "reason_code": _clip(reason_code, MAX_FIELD_CHARS["reason_code"]),
        "reason": _clip(reason, MAX_FIELD_CHARS["reason"]),
    }
    optional = {"request_id": request_id, "method": method, "host": host,
                "path": path.split("?", 1)[0].split("#", 1)[0] if path else "", "fix": fix}
    for key, value in optional.items():
        if value:
            record[key] = _clip(value, MAX_FIELD_CHARS[key])
    if port is not None:
        record["port"] = int(port)
    if dlp_pattern or dlp_where:
        record["dlp"] = {"pattern": _clip(dlp_pattern, 128), "where": _clip(dlp_where, 128)}
    if detail:
        record["detail"] = dict(detail)
    return record


def encode_line(record: Mapping[str, Any], scrubber: SecretScrubber | None = None) -> bytes:
    """The record as one scrubbed line of at most MAX_LINE_BYTES: token values become their
    placeholders, then whatever a DLP rule matches becomes a marker. Too long: detail goes first,
    then the free text is cut."""
    def render(doc: Mapping[str, Any]) -> bytes:
        text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str)
        if scrubber:
            text = scrubber.text(text)
        return (dlp.redact(text) + "\n").encode("ascii", errors="replace")

    line = render(record)
    if len(line) <= MAX_LINE_BYTES:
        return line
    trimmed = {k: v for k, v in record.items() if k != "detail"}
    trimmed["truncated"] = True
    line = render(trimmed)
    if len(line) <= MAX_LINE_BYTES:
        return line
    for key in ("reason", "fix", "path"):
        if key in trimmed:
            trimmed[key] = _clip(trimmed[key], 120)
    return render(trimmed)[:MAX_LINE_BYTES - 1] + b"\n"


# --------------------------------------------------------------------------- the file


class AuditFile:
    """audit.jsonl in one directory: append a line, rotate by size, both under one flock, so the
    sink and a host command appending at the same time never lose or split a line."""

    def __init__(self, directory: Path | str, *, rotate_bytes: int = ROTATE_BYTES, keep: int = ROTATE_KEEP):
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.keep = keep

    @property
    def path(self) -> Path:
        return self.directory / AUDIT_FILE

    def generations(self) -> list[Path]:
        """Oldest first: audit.jsonl.3 .. audit.jsonl.1, audit.jsonl (those that exist)."""
        older = [self.directory / f"{AUDIT_FILE}.{n}" for n in range(self.keep, 0, -1)]
        return [p for p in (*older, self.path) if p.exists()]

    def ensure(self) -> None:
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    def append(self, lines: Iterable[bytes]) -> None:
        data = b"".join(lines)
        if not data:
            return
        self.ensure()
        # O_NOFOLLOW: the bundle can write this dir; a link it planted must not make the host's
        # `doit approve` append to a file of the user's choosing (or the attacker's). O_NONBLOCK and
        # a regular file only: a FIFO planted here must not hang it either.
        lock = open_regular(self.directory / ".lock", os.O_WRONLY | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.rotate_bytes:
                self._rotate()
            fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        finally:
            os.close(lock)  # releases the flock

    def _rotate(self) -> None:
        for n in range(self.keep, 1, -1):
            older = self.directory / f"{AUDIT_FILE}.{n - 1}"
            if older.exists():
                os.replace(older, self.directory / f"{AUDIT_FILE}.{n}")
        os.replace(self.path, self.directory / f"{AUDIT_FILE}.1")


def _open(path: Path):
    """The file for reading: only a regular file, through no link, never blocking (the bundle writes
    this dir: a planted link, FIFO or device must neither steer nor hang the host)."""
    return os.fdopen(open_regular(path, os.O_RDONLY), "rb")


def _lines_of(path: Path) -> Iterator[bytes]:
    """Its lines; one longer than any writer makes is read in bounded pieces and skipped whole."""
    try:
        handle = _open(path)
    except OSError:
        return  # rotated away between listing and opening, or planted
    with handle:
        overlong = False
        while raw := handle.readline(READ_LINE_BYTES + 1):
            if not raw.endswith(b"\n") and len(raw) > READ_LINE_BYTES:
                overlong = True   # the rest of this line follows: skip it all
                continue
            if overlong:
                overlong = False
                continue
            yield raw


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_records(directory: Path | str) -> Iterable[dict[str, Any]]:
    """Every line of every generation, oldest first; a line that is not a JSON object is skipped, and
    so is a generation that is a link or not a regular file (the bundle writes this dir), and a line
    longer than any writer makes, read in bounded pieces."""
    for path in AuditFile(directory).generations():
        for raw in _lines_of(path):
            record = _record(raw)
            if record is not None:
                yield record


def _lines_backwards(path: Path, chunk: int = 64 << 10) -> Iterator[bytes]:
    """The file's lines, newest first, read from its end a chunk at a time."""
    try:
        handle = _open(path)
    except OSError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            lines = (handle.read(step) + rest).split(b"\n")
            rest = lines.pop(0)   # may continue in the chunk before
            yield from (line for line in reversed(lines) if line)
        if rest:
            yield rest


def records_since(directory: Path | str, since: datetime, *, generations: int = 2,
                  slack_seconds: float = 60.0) -> Iterator[dict[str, Any]]:
    """The records stamped at or after since, newest first: audit.jsonl (and audit.jsonl.1 when it
    reaches back that far) read from the end, stopping at the first line older than since by more
    than slack_seconds (lines from several writers arrive nearly, not strictly, in order)."""
    file = AuditFile(directory)
    paths = [file.path, *(file.directory / f"{AUDIT_FILE}.{n}" for n in range(1, generations))]
    horizon = since.timestamp() - slack_seconds
    for path in paths:
        for raw in _lines_backwards(path):
            record = _record(raw)
            moment = record_time(record) if record else None
            if moment is None:
                continue
            if moment.timestamp() < horizon:
                return
            if moment >= since:
                yield record


def record_time(record: Mapping[str, Any]) -> datetime | None:
    """A record's ts as an aware datetime; None when it has none that parses."""
    try:
        moment = datetime.fromisoformat(str(record.get("ts", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _Generation:
    """One open audit.jsonl: what was appended since the last read, whole lines only."""

    def __init__(self, path: Path) -> None:
        self.handle = _open(path)
        status = os.fstat(self.handle.fileno())
        self.identity = (status.st_dev, status.st_ino)
        self.partial = b""

    def read(self) -> list[bytes]:
        lines = (self.partial + self.handle.read()).split(b"\n")
        self.partial = lines.pop()
        return [line + b"\n" for line in lines if line]

    def rewind(self) -> None:
        self.handle.seek(0)
        self.partial = b""

    def close(self) -> None:
        self.handle.close()


def _open_current(path: Path) -> _Generation | None:
    try:
        return _Generation(path)
    except OSError:
        return None


def follow_lines(directory: Path | str, stop: threading.Event, interval: float = 0.25) -> Iterator[bytes]:
    """Every stored line, oldest first, then each line appended after, until stop is set (set
    already: what is stored, and return). Across a rotation nothing is lost or repeated: the open
    file is the one that was renamed to .1, so its last lines are read from it before the new
    audit.jsonl is read from its start. A file cut short in place is read again from its start."""
    file = AuditFile(directory)
    current = _open_current(file.path)   # first, so a rotation from here on is seen as one
    try:
        for path in file.generations():
            if path == file.path:
                continue   # read through `current` below, however it came to exist
            try:
                status = os.stat(path)
            except FileNotFoundError:
                continue
            if current is None or (status.st_dev, status.st_ino) != current.identity:
                yield from _lines_of(path)
        while True:
            if current is None:
                current = _open_current(file.path)
            if current is not None:
                yield from current.read()
            if stop.is_set():
                return
            try:
                status = os.stat(file.path)
            except FileNotFoundError:
                status = None
            if current is not None and status is not None:
                if (status.st_dev, status.st_ino) != current.identity:
                    yield from current.read()   # the rest of the file now named .1
                    current.close()
                    current = _open_current(file.path)
                    continue
                if status.st_size < current.handle.tell():
                    current.rewind()
                    continue
            stop.wait(interval)
    finally:
        if current is not None:
            current.close()


# --------------------------------------------------------------------------- writers


class AuditWriter:
    """What a daemon writes through. ``fd``: the pipe init gave it; else ``directory``: append to the
    file directly; neither: lines go nowhere (a daemon run by hand). Thread-safe."""

    def __init__(self, source: str, *, fd: int | None = None, directory: Path | str | None = None,
                 scrubber: SecretScrubber | None = None, bottle: str = "", echo: TextIO | None = None):
        if source not in SOURCES:
            raise ValueError(f"audit source must be one of {', '.join(SOURCES)}")
        self.source = source
        self.fd = fd
        self.file = AuditFile(directory) if directory is not None and fd is None else None
        self.scrubber = scrubber
        self.bottle = bottle
        self.echo = echo
        self.dropped = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, source: str, environ: Mapping[str, str] = os.environ, **options: Any) -> "AuditWriter":
        fd_text = environ.get(AUDIT_FD_ENV, "")
        fd = int(fd_text) if fd_text.isdigit() else None
        directory = environ.get(AUDIT_DIR_ENV) or None
        return cls(source, fd=fd, directory=directory, bottle=environ.get(SLUG_ENV, ""), **options)

    def emit(self, event: str, decision: str, **fields: Any) -> dict[str, Any]:
        """Write one line; returns the record as built (before scrubbing). Never raises for I/O."""
        record = audit_record(self.source, event, decision, bottle=self.bottle, **fields)
        with self._lock:
            if self.dropped:
                record["dropped"] = self.dropped
            line = encode_line(record, self.scrubber)
            if self._write(line):
                self.dropped = 0
            else:
                self.dropped += 1
            if self.echo is not None:
                self.echo.write(line.decode("ascii"))
                self.echo.flush()
        return record

    def _write(self, line: bytes) -> bool:
        try:
            if self.fd is not None:
                return os.write(self.fd, line) == len(line)
            if self.file is not None:
                self.file.append([line])
            return True
        except BlockingIOError:
            return False   # the sink is behind: counted, reported on the next line
        except OSError as error:
            if error.errno in (errno.EPIPE, errno.EBADF):
                return False
            print(f"audit: cannot write the audit stream: {error}", file=sys.stderr, flush=True)
            return False


def make_pipe() -> tuple[int, int]:
    """(read end, write end) of the stream's pipe; the write end is non-blocking (shared by every
    writer: a full pipe drops lines rather than stalling a daemon)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:  # room for a burst of some thousand lines before any is dropped (64 KiB is about 250)
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass   # above /proc/sys/fs/pipe-max-size: the default size stays
    return read_end, write_end


# --------------------------------------------------------------------------- pipelock's own log

# pipelock's log events (JSON lines on its stdout) that are decisions; the rest (allowed, tunnel_open...)
# are egress's to record, which saw the same request first.
PIPELOCK_EVENTS = {"blocked": "block", "body_dlp": "block", "header_dlp": "block", "sni_mismatch": "block",
                   "kill_switch_deny": "block", "response_scan": "warn", "anomaly": "warn", "config_reload": "info"}


def from_pipelock(line: str) -> tuple[str, str, dict[str, Any]] | None:
    """One of pipelock's log lines as (event, decision, fields) for the stream, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") not in PIPELOCK_EVENTS:
        return None
    target = str(record.get("url") or record.get("target") or "")
    host = target.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    path = "/" + target.split("://", 1)[-1].split("/", 1)[1] if "/" in target.split("://", 1)[-1] else ""
    return str(record["event"]), PIPELOCK_EVENTS[record["event"]], {
        "reason_code": str(record.get("scanner") or record["event"]),
        "reason": str(record.get("reason") or record.get("message") or ""),
        "method": str(record.get("method") or ""), "host": host.rsplit(":", 1)[0] if host.count(":") == 1 else host,
        "path": path}


# --------------------------------------------------------------------------- the sink (bundle daemon)


def stamp(raw: bytes, bottle: str) -> bytes | None:
    """A line from the pipe, checked and given the bottle's slug; None when it is not a record."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("v") != SCHEMA_VERSION or record.get("source") not in SOURCES:
        return None
    if bottle and not record.get("bottle"):
        record["bottle"] = bottle
    return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def sink(fd: int, file: AuditFile, bottle: str, *, read_bytes: int = 64 << 10) -> None:
    """Append every record read from fd (the pipe) until it ends. One read takes whatever has
    arrived, so a flood costs one lock and one write per batch, and a lone line is written at once."""
    pending = b""
    while True:
        chunk = os.read(fd, read_bytes)
        if not chunk:
            return
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE_BYTES:
            pending = b""  # no writer sends a line this long: not a record
        file.append(line for line in (stamp(raw, bottle) for raw in lines if raw) if line is not None)


def main(argv: Iterable[str] | None = None) -> int:
    from bottle_tasks.sidecars.supervise_store import become, state_dir_owner

    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.audit",
                                     description="the bundle's audit sink: records on stdin, appended to DIR/audit.jsonl")
    parser.add_argument("--dir", required=True, type=Path, help="the bottle's audit dir (mounted read-write)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    owner = state_dir_owner(args.dir)
    try:
        if owner is not None:
            os.chdir(args.dir)  # the dir's parents in the bundle are root's
            become(*owner)      # the files are the host user's, as the supervise store's are
            directory = Path(".")
        else:
            directory = args.dir
        AuditFile(directory).ensure()
    except OSError as error:
        print(f"audit: {args.dir}: {error}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"event": "listening", "dir": str(args.dir), "uid": os.geteuid()}), flush=True)
    try:
        sink(sys.stdin.fileno(), AuditFile(directory), os.environ.get(SLUG_ENV, ""))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
