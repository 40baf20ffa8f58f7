"""What `doit logs` shows of a bottle's audit stream: which records (kind=, since=) and how one reads.

Pure: records, times and the environment come in as arguments. Every field of a record passes
through ``printable`` before it is shown: the agent chose the host and path it asked for, so an
escape sequence in them must reach the terminal spelled out, never acting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any, Callable, Mapping, TextIO

from bottle_tasks.errors import BottleError
from bottle_tasks.sidecars.audit import record_time
from bottle_tasks.supervise_cli import printable

Record = Mapping[str, Any]

# What a human decided, or a hold waiting for one.
SUPERVISE_DECISIONS = ("hold", "approve", "deny", "expire")

KINDS: dict[str, Callable[[Record], bool]] = {
    "block": lambda r: r.get("decision") in ("block", "deny", "expire"),
    "dlp": lambda r: "dlp" in r,
    "git": lambda r: r.get("source") == "git-gate",
    "supervise": lambda r: (r.get("source") == "supervise" or r.get("decision") in SUPERVISE_DECISIONS
                            or str(r.get("event", "")).startswith("approval")),
    "daemon": lambda r: r.get("source") == "init" or str(r.get("event", "")).startswith("daemon"),
}

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """kind=block,dlp -> ("block", "dlp"); nothing -> () (every record)."""
    kinds = tuple(part.strip().lower() for part in (text or "").split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise BottleError(f"kind={text}: unknown kind {', '.join(map(repr, unknown))}; use one or more of "
                          f"{', '.join(KINDS)}, comma-separated (kind=block,dlp)")
    return kinds


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """since=30s / 10m / 2h / 1d before now, or an ISO time (local when it names no zone); None for nothing."""
    text = (text or "").strip()
    if not text:
        return None
    match = _DURATION.fullmatch(text.lower())
    if match:
        return now - timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BottleError(f"since={text!r} is neither a duration (30s, 10m, 2h, 1d) nor an ISO time "
                          "(2026-12-02T12:00:00Z, or 2026-12-02T13:00 in local time)") from None
    return moment if moment.tzinfo else moment.astimezone()


@dataclass(frozen=True)
class LogFilter:
    """A record passes when it is of any of the kinds (no kinds: every record) and not older than since."""
    kinds: tuple[str, ...] = ()
    since: datetime | None = None

    def __call__(self, record: Record) -> bool:
        if self.kinds and not any(KINDS[kind](record) for kind in self.kinds):
            return False
        if self.since is not None:
            moment = record_time(record)
            return moment is not None and moment >= self.since
        return True


# --------------------------------------------------------------------------- how a record reads

RED, YELLOW, GREEN, RESET = "\033[31m", "\033[33m", "\033[32m", "\033[0m"
DECISION_COLOURS = {"block": RED, "deny": RED, "hold": YELLOW, "warn": YELLOW,
                    "allow": GREEN, "approve": GREEN, "learn": GREEN}
DECISION_WIDTH = 7      # APPROVE
SOURCE_WIDTH = 9        # supervise


def use_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not environ.get("NO_COLOR")


def clock(record: Record, zone: tzinfo | None = None) -> str:
    """HH:MM:SS.mmm in local time (or zone); the raw ts, made printable, when it does not parse."""
    moment = record_time(record)
    if moment is None:
        return printable(record.get("ts", "?"))[:12].ljust(12)
    local = moment.astimezone(zone)
    return local.strftime("%H:%M:%S.") + f"{local.microsecond // 1000:03d}"


def target(record: Record) -> str:
    """method host:port path, as far as the record has them; the event when it names no host."""
    host = printable(record.get("host", ""))
    if not host:
        return printable(record.get("event", ""))
    port = record.get("port")
    address = f"{host}:{printable(port)}" if port not in (None, "") else host
    return " ".join(part for part in (printable(record.get("method", "")), address,
                                      printable(record.get("path", ""))) if part)


def why(record: Record) -> str:
    code, reason = printable(record.get("reason_code", "")), printable(record.get("reason", ""))
    return f"{code}: {reason}" if code and reason else code or reason


def format_record(record: Record, *, colour: bool = False, zone: tzinfo | None = None) -> str:
    """One line, and the fix (the change that would allow it) indented under it."""
    decision = printable(record.get("decision", "?")).upper()
    shown = decision.ljust(DECISION_WIDTH)
    tint = DECISION_COLOURS.get(str(record.get("decision", "")))
    if colour and tint:
        shown = f"{tint}{decision}{RESET}{' ' * (len(shown) - len(decision))}"
    parts = [clock(record, zone), printable(record.get("source", "?")).ljust(SOURCE_WIDTH), shown,
             target(record), why(record)]
    found = record.get("dlp")
    if isinstance(found, Mapping):
        parts.append(f"(dlp {printable(found.get('pattern', '?'))} in {printable(found.get('where', '?'))})")
    if record.get("request_id"):
        parts.append(f"[id {printable(record['request_id'])}]")
    if record.get("dropped"):
        parts.append(f"({printable(record['dropped'])} earlier lines lost: the audit sink was behind)")
    lines = ["  ".join(part for part in parts if part)]
    fix = str(record.get("fix", "") or "")
    for number, line in enumerate(fix.splitlines()):
        lines.append(f"    {'fix: ' if number == 0 else '     '}{printable(line)}")
    return "\n".join(lines)


def render_line(raw: bytes, keep: LogFilter, *, as_json: bool = False, colour: bool = False,
                zone: tzinfo | None = None) -> str | None:
    """What to print for one stored line: the line itself (json), or its readable form; None when the
    filter drops it or it is not a record."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not keep(record):
        return None
    if as_json:
        # As stored (ASCII JSON, so printable leaves a well-formed line alone).
        return printable(raw.decode("ascii", errors="replace").rstrip("\n"))
    return format_record(record, colour=colour, zone=zone)


def describe(keep: LogFilter, raw_kinds: str, raw_since: str) -> str:
    """The filter in the words it was given, for "no records match ..."."""
    words = [f"kind={raw_kinds}" if keep.kinds else "", f"since={raw_since}" if keep.since else ""]
    return " ".join(word for word in words if word)
