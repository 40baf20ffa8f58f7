"""The policy overlay: routes a human approved for good (``doit approve ... scope=always``), kept in the
bottle's state dir next to what the agent file routes, and applied live by egress.

    <state dir>/policy/overlay.json      0600, its dir 0700; written by the host, read by egress

    {"version": 1,
     "routes": [{"host": "example.com", "ports": [443, 8443], "methods": [], "paths": []}],
     "approvals": [{"host": "example.com", "port": 443, "request_id": "<egress request id>",
                    "by": "alice (Alice Example)", "at": "2026-01-31T12:00:00.000Z", "reason": "docs"}]}

``routes``: one per host, each with only host, ports, methods ([] = any) and paths ([] = any), checked by
routes.py's own route parser: an overlay route means what the same route would in routes.yaml
(private_network off, dlp and responses at the host's defaults, no token). An approval names an exact
host and one port; a second port approved for the same host joins that host's route.
``approvals``: who approved which host and port, when, why, and which held request (egress's request id,
which its audit line and the supervise queue name) asked for it; one per request id.

Only the host writes it (``approve_route``, ``withdraw_approval``), under a flock on ``.overlay.lock``
next to it, so two approvals at once both land; every write replaces the file whole
(files.atomic_write_json), so egress, which stats the file and re-reads it when it changes, never
sees half of one. A missing file is an empty overlay. Runs in the bundle too: standard library and
the package's own modules only.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from bottle_tasks.contract import Route, normalize_host
from bottle_tasks.sidecars.configfile import (
    config_failer, list_of, nested_mapping, refuse_duplicates, string_value, versioned_document,
)
from bottle_tasks.sidecars.files import atomic_write_json, tighten_mode
from bottle_tasks.sidecars.routes import parse_route
from bottle_tasks.sidecars.supervise_store import iso, utc_now

OVERLAY_FILE = "overlay.json"
SUPPORTED_VERSION = 1
OVERLAY_ROUTE_KEYS = frozenset({"host", "ports", "methods", "paths"})
APPROVAL_KEYS = {"host", "port", "request_id", "by", "at", "reason"}
FILE_MODE = 0o600   # who approved what: the host user's alone, like the supervise store
DIR_MODE = 0o700
LOCK_FILE = ".overlay.lock"


class OverlayError(ValueError):
    """The overlay is unreadable, malformed or cannot be written; the message names the file and the key."""


@dataclass(frozen=True)
class Approval:
    host: str
    port: int
    request_id: str
    by: str
    at: str
    reason: str = ""


@dataclass(frozen=True)
class Overlay:
    routes: tuple[Route, ...] = ()
    approvals: tuple[Approval, ...] = ()

    def approvals_of(self, host: str) -> tuple[Approval, ...]:
        return tuple(a for a in self.approvals if a.host == host)


@dataclass(frozen=True)
class OverlayChange:
    """What one approve_route added, so withdraw_approval can take exactly that back out."""
    host: str
    port: int
    request_id: str
    port_added: bool       # the host's route (or the port on it) is new
    approval_added: bool


def overlay_path(policy_dir: str | Path) -> Path:
    return Path(policy_dir) / OVERLAY_FILE


def load_overlay(path: str | Path) -> tuple[Route, ...]:
    """The overlay's routes (none when there is no file); OverlayError names the file and the key."""
    return read_overlay(path).routes


def read_overlay(path: str | Path) -> Overlay:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Overlay()
    except OSError as error:
        raise OverlayError(f"{path}: cannot read the policy overlay: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise OverlayError(f"{path}: not valid JSON (line {getattr(error, 'lineno', '?')}); "
                           "fix it, or remove the file to drop every route approved with scope=always") from None
    return parse_overlay(data, source=str(path))


def parse_overlay(data: Any, *, source: str = OVERLAY_FILE) -> Overlay:
    fail = config_failer(OverlayError, source)
    versioned_document(data, {"routes", "approvals"}, SUPPORTED_VERSION, fail)
    routes = tuple(parse_route(item, f"routes[{i}]", fail, OVERLAY_ROUTE_KEYS)
                   for i, item in enumerate(list_of(data, "routes", fail)))
    refuse_duplicates([route.host for route in routes], "routes", "host", fail)
    approvals = tuple(_approval(item, f"approvals[{i}]", fail) for i, item in enumerate(list_of(data, "approvals", fail)))
    return Overlay(routes, approvals)


def _approval(item: Any, key: str, fail) -> Approval:
    nested_mapping(item, APPROVAL_KEYS, key, fail)
    port = item.get("port")
    if not _is_port(port):
        raise fail(f"{key}.port", f"must be a port number from 1 to 65535, got {port!r}")
    return Approval(host=normalize_host(string_value(item, "host", f"{key}.host", fail, required=True)), port=port,
                    request_id=string_value(item, "request_id", f"{key}.request_id", fail, required=True),
                    by=string_value(item, "by", f"{key}.by", fail, required=True),
                    at=string_value(item, "at", f"{key}.at", fail, required=True),
                    reason=string_value(item, "reason", f"{key}.reason", fail))


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def approve_route(path: str | Path, host: str, port: int, *, request_id: str, by: str,
                  reason: str = "") -> OverlayChange:
    """Route exactly host on port from now on, and record who approved it (host side). Idempotent: the
    same approval again changes nothing, and an unchanged overlay is not rewritten."""
    path = Path(path)
    host = normalize_host(host)

    def refuse(_key: str, problem: str) -> OverlayError:
        return OverlayError(f"{path}: cannot approve {host!r} port {port!r}: {problem}")

    if host.startswith("*."):
        raise refuse("host", "an approval routes one exact host, not a wildcard")
    if not _is_port(port):
        raise refuse("port", "not a port number from 1 to 65535")
    if not request_id or not by.strip():
        raise refuse("request_id", "an approval needs the request id and who approves")
    approved = parse_route({"host": host, "ports": [port]}, "host", refuse, OVERLAY_ROUTE_KEYS)
    with _locked(path):
        current = read_overlay(path)
        routes = list(current.routes)
        index = next((i for i, route in enumerate(routes) if route.host == host), None)
        port_added = index is None or port not in routes[index].ports
        if index is None:
            routes.append(approved)
        elif port_added:
            routes[index] = replace(routes[index], ports=(*routes[index].ports, port))
        approval_added = all(a.request_id != request_id for a in current.approvals)
        approvals = list(current.approvals)
        if approval_added:
            approvals.append(Approval(host, port, request_id, by.strip(), iso(utc_now()), reason.strip()))
        if port_added or approval_added:
            _write(path, Overlay(tuple(routes), tuple(approvals)))
    return OverlayChange(host, port, request_id, port_added, approval_added)


def withdraw_approval(path: str | Path, change: OverlayChange) -> None:
    """Take back what approve_route added (the decision it was for did not land). A port stays while
    another approval still names it."""
    path = Path(path)
    with _locked(path):
        current = read_overlay(path)
        approvals = tuple(a for a in current.approvals
                          if not (change.approval_added and a.request_id == change.request_id))
        still_approved = any((a.host, a.port) == (change.host, change.port) for a in approvals)
        routes = []
        for route in current.routes:
            if change.port_added and not still_approved and route.host == change.host:
                route = replace(route, ports=tuple(p for p in route.ports if p != change.port))
                if not route.ports:
                    continue
            routes.append(route)
        if (tuple(routes), approvals) != (current.routes, current.approvals):
            _write(path, Overlay(tuple(routes), approvals))


def overlay_document(overlay: Overlay) -> dict[str, Any]:
    """The file's JSON shape (module docstring)."""
    return {
        "version": SUPPORTED_VERSION,
        "routes": [{"host": r.host, "ports": list(r.ports), "methods": list(r.methods), "paths": list(r.paths)}
                   for r in overlay.routes],
        "approvals": [{"host": a.host, "port": a.port, "request_id": a.request_id, "by": a.by, "at": a.at,
                       "reason": a.reason} for a in overlay.approvals],
    }


def _write(path: Path, overlay: Overlay) -> None:
    try:
        atomic_write_json(path, overlay_document(overlay), mode=FILE_MODE, fsync=True)
    except OSError as error:
        raise OverlayError(f"{path}: cannot write the policy overlay: {error.strerror or error}") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (two `doit approve` at once): a flock on a file next to the overlay."""
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        tighten_mode(path.parent, DIR_MODE)
        lock = os.open(path.parent / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        raise OverlayError(f"{path.parent}: cannot prepare the policy overlay's dir: {error.strerror or error}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the flock
