"""Host side of supervise: list, approve and deny what the agent asked for, or watch for it.

Works on the host state dir (``<state>/<agent>/supervise``) directly, so it needs neither the
bundle nor docker: a decision is a file the daemon picks up (docs/bundle-contract.md).

    python -m bottle_tasks.supervise_cli --state-dir DIR pending
    python -m bottle_tasks.supervise_cli --state-dir DIR approve ID [--reason TEXT] [--by NAME]
                                          [--scope once|always --overlay POLICY_DIR/overlay.json]
    python -m bottle_tasks.supervise_cli --state-dir DIR deny ID [--reason TEXT] [--by NAME]
    python -m bottle_tasks.supervise_cli --state-dir DIR watch [--interval 2] [--no-notify]

``--scope always`` (only for a request egress holds: a host the agent file does not name) puts the
host and port in the bottle's policy overlay (sidecars/overlay.py) first, then writes the decision:
egress acts on the decision and must find the route by then. When the decision cannot be written
(already decided, expired), what went into the overlay is taken out again.

Errors are one line (``unknown request id 'x'``, ``request ... was already approved by ...``)
and exit 1.

What the agent wrote (tool, summary, input) reaches the terminal and the desktop notification
only through ``printable``: control characters (C0, DEL, C1, so every ANSI escape sequence) and
the invisible bidi/line controls show as ``\x1b`` / ``\u202e`` instead of acting.
"""

from __future__ import annotations

import argparse
import getpass
import html
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable, TextIO

from bottle_tasks.plan import audit_dir_of
from bottle_tasks.sidecars.audit import AuditWriter
from bottle_tasks.sidecars.overlay import OverlayChange, OverlayError, approve_route, withdraw_approval
from bottle_tasks.sidecars.supervise_store import Request, Store, SuperviseError


# C0 (newline and tab too: one field, one line), DEL, C1; bidi overrides, isolates and marks and the
# Unicode line separators, which could make the text read differently from what it is.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def printable(text: object) -> str:
    """text with every control character spelled out: ESC -> ``\\x1b``, U+202E -> ``\\u202e``."""
    def spell(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return _UNPRINTABLE.sub(spell, str(text))


def short_duration(seconds: float) -> str:
    """45s, 12m05s, 3h07m, 4d02h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


# Who filed a request, in words: the agent's text is its own claim; git-gate's is the bundle's account of a push.
SOURCE_WORDS = {"guest": "the agent in the guest (its own words: tool, summary and input are unverified)",
                "git-gate": "git-gate, holding a push it received (repo, refs, commits and diffstat are git-gate's)",
                "egress": "egress, holding a request to a host the agent file does not name "
                          "(host, port, method and path are egress's account)"}
# What egress files for a held request (network.unknown_hosts: ask), in the order shown.
HELD_REQUEST_FIELDS = ("host", "port", "method", "path", "scheme")


def format_request(request: Request) -> str:
    """One pending request: id, age, tool, summary, full input (egress's held request: host, port,
    method, path), time left; every field printable."""
    lines = [
        f"request {printable(request.id)}  ({short_duration(request.age_seconds())} ago, "
        f"{short_duration(request.seconds_left())} left, expires {printable(request.expires_at)})",
        f"  from:    {SOURCE_WORDS.get(request.source, printable(request.source))}",
        f"  tool:    {printable(request.tool)}",
        f"  summary: {printable(request.summary)}",
    ]
    if request.source == "egress":
        lines += [f"  {name + ':':<8} {printable(request.input.get(name, '?'))}" for name in HELD_REQUEST_FIELDS]
        lines.append("  approve once, or with scope=always to route this host and port from now on")
        return "\n".join(lines)
    body = json.dumps(request.input, indent=2, ensure_ascii=False, sort_keys=True)
    return "\n".join([*lines, "  input:", *(f"    {printable(line)}" for line in body.split("\n"))])


def format_pending(state_dir: Path | str) -> str:
    try:
        pending = Store(Path(state_dir)).list_pending()
    except OSError as error:
        raise SuperviseError(f"cannot read {state_dir}: {error.strerror or error}") from None
    if not pending:
        return "no pending supervise requests"
    return "\n\n".join(format_request(request) for request in pending)


def default_author() -> str:
    """The host user ($USER, else the login name), with `git config user.name` when set:
    ``alice (Alice Example)``."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    name = ""
    if shutil.which("git"):
        try:
            result = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5)
            name = result.stdout.strip() if result.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            name = ""
    return f"{user} ({name})" if name and name != user else user


def decide(state_dir: Path | str, request_id: str, decision: str, by: str | None = None,
           reason: str = "", scope: str | None = None) -> Request:
    """Approve ("approve") or deny ("deny") a pending request; scope: an approval's, recorded in its
    decision file. Raises SuperviseError with a one-line message for an unknown id, an already decided
    or expired request, or a bad decision."""
    try:
        return Store(Path(state_dir), audit=host_audit(Path(state_dir))).decide(
            request_id, decision, by or default_author(), reason, scope)
    except OSError as error:
        raise SuperviseError(f"cannot write the decision in {state_dir}: {error.strerror or error} "
                             "(the state dir and its decisions/ must belong to the host user)") from None


def host_audit(state_dir: Path) -> AuditWriter:
    """Decisions made on the host go into the bottle's audit stream too: <state>/audit, beside the queue."""
    return AuditWriter("supervise", directory=audit_dir_of(state_dir.parent), bottle=state_dir.parent.name)


def approve_always(state_dir: Path | str, overlay: Path | str, request_id: str, by: str | None = None,
                   reason: str = "") -> tuple[Request, OverlayChange]:
    """Approve a request egress holds and route its host and port from now on: the overlay first,
    then the decision; the overlay's change is taken back when the decision fails."""
    by = by or default_author()
    request = Store(Path(state_dir)).require_pending(request_id)
    if request.source != "egress":
        raise SuperviseError(f"request {request_id} comes from {request.source}, not egress: scope=always adds a "
                             "route, so it is only for a request egress holds; approve this one with scope=once")
    host, port = request.input.get("host"), request.input.get("port")
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise SuperviseError(f"request {request_id}: egress's input names no host and port, so there is no route "
                             "to add; approve it with scope=once")
    try:
        change = approve_route(overlay, host, port, request_id=request.id, by=by, reason=reason)
    except OverlayError as error:
        raise SuperviseError(str(error)) from None
    try:
        return decide(state_dir, request_id, "approve", by, reason, scope="always"), change
    except BaseException as failure:
        try:
            withdraw_approval(overlay, change)
        except OverlayError as error:
            raise SuperviseError(f"{failure}; and the route added for it is still in the overlay: {error}") from None
        raise


def notify_send(request: Request) -> None:
    """A desktop notification when notify-send exists; silently nothing otherwise. The agent's text
    is printable and markup-escaped (notification servers may render <b>, <a>, <img>)."""
    if not shutil.which("notify-send"):
        return
    title = f"claude-bottle: approve {printable(request.tool)[:100]}?"
    body = f"{printable(request.summary[:200])}\n{printable(request.id)}"
    try:
        subprocess.run(["notify-send", "--app-name=claude-bottle", "--", html.escape(title, quote=False),
                        html.escape(body, quote=False)], timeout=5, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pass


def watch(state_dir: Path | str, interval: float = 2.0, notify: bool = True, *, out: TextIO | None = None,
          stop: threading.Event | None = None) -> None:
    """Print each new pending request as it appears (and notify-send it when asked and available)
    until ``stop`` is set or Ctrl-C."""
    store = Store(Path(state_dir))
    stream = out or sys.stdout
    stop = stop or threading.Event()
    seen: set[str] = set()
    print(f"watching {printable(store.state_dir)} for supervise requests (Ctrl-C to stop)", file=stream, flush=True)
    try:
        while not stop.is_set():
            for request in store.list_pending():
                if request.id in seen:
                    continue
                seen.add(request.id)
                print(format_request(request), file=stream)
                safe_id = printable(request.id)
                print(f"  decide: approve {safe_id} / deny {safe_id} --reason ...\n", file=stream, flush=True)
                if notify:
                    notify_send(request)
            stop.wait(interval)
    except KeyboardInterrupt:
        pass


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.supervise_cli", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", required=True, type=Path, help="the bottle's supervise state dir")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pending", help="list pending requests")
    for name in ("approve", "deny"):
        sub = commands.add_parser(name, help=f"{name} a pending request")
        sub.add_argument("id")
        sub.add_argument("--reason", default="")
        sub.add_argument("--by", default=None, help="who decides (default: $USER and git user.name)")
    approve = commands.choices["approve"]
    approve.add_argument("--scope", choices=("once", "always"), default="once",
                         help="always: route the host from now on (egress's held requests only)")
    approve.add_argument("--overlay", type=Path, default=None, help="the bottle's policy overlay (for --scope always)")
    sub = commands.add_parser("watch", help="print new pending requests as they appear")
    sub.add_argument("--interval", type=float, default=2.0)
    sub.add_argument("--no-notify", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "pending":
            print(format_pending(args.state_dir))
        elif args.command == "approve" and args.scope == "always":
            if args.overlay is None:
                parser.error("--scope always needs --overlay (the bottle's <state dir>/policy/overlay.json)")
            request, change = approve_always(args.state_dir, args.overlay, args.id, args.by, args.reason)
            print(printable(f"{request.id}: {request.status} by {request.by}, and {change.host} port "
                            f"{change.port} is routed from now on ({args.overlay})"))
        elif args.command in ("approve", "deny"):
            request = decide(args.state_dir, args.id, args.command, args.by, args.reason,
                             args.scope if args.command == "approve" else None)
            print(printable(f"{request.id}: {request.status} by {request.by}")
                  + (f" ({printable(request.reason)})" if request.reason else ""))
        else:
            watch(args.state_dir, args.interval, not args.no_notify)
    except SuperviseError as error:
        print(f"supervise: {printable(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
