"""What `doit policy show|promote|suggest` print: the agent file's routes beside the policy overlay's,
the overlay's routes ready for the agent file, and routes suggested from what learn mode let through.

Pure: tasks/policy.py reads the plan, the overlay (sidecars/overlay.py) and the audit stream and hands
them in. Routes for the agent file are YAML from templates/routes-snippet.yaml.j2, which JSON-quotes
every value (tojson), so a host or path the agent chose stays one YAML string; every other line from
the overlay or the audit stream, comments in the YAML included, passes through supervise_cli.printable.
A route the agent file could not take (a host or method its schema refuses) is left out with a note.

suggest reads the learn records (source egress, event request, decision learn) and makes one route per
host: the methods seen; the ports seen (always listed: left out they would be [443, 80], plain http
included); and the paths as the narrowest fnmatch globs that cover every path seen (a glob matches the
path without its query, and its `*` also matches `/`):

- at most EXACT_PATHS (8) distinct paths: each one exactly, with fnmatch's `[`, `*` and `?` bracketed so
  they match only themselves;
- more: grouped by their first segment. A segment with one path keeps it exactly. A segment with several
  gets the longest directory they share plus `*` (`/v1/users/1`, `/v1/users/2` -> `/v1/users/*`;
  `/v1/users/1`, `/v1/orgs/2` -> `/v1/*`), and the bare `/v1` exactly when that itself was seen;
- `/*` (any path) only when the paths have nothing in common: more than EXACT_PATHS and no two share a
  first segment, so the only narrower cover would be the list itself.

A path the audit line cut short (it ends in "..." at audit's limit) is a prefix: its glob ends in `*`. A
character past U+FFFF becomes `?`, since PyYAML reads its JSON escape back as two halves of a pair. A host
already routed (agent file or overlay) is left out: it is no longer learned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from bottle_tasks.contract import Route, normalize_host
from bottle_tasks.sidecars.audit import MAX_FIELD_CHARS
from bottle_tasks.sidecars.overlay import Overlay
from bottle_tasks.spec import route_schema
from bottle_tasks.supervise_cli import printable

EXACT_PATHS = 8
ANY_PATH = "/*"
LEARN_MODE = "network: {unknown_hosts: learn}"
_CUT_MARK = "..."   # audit._clip's end of a value it shortened


@dataclass(frozen=True)
class SnippetRoute:
    """One route for the agent file; () leaves the key out (any method, any path, the default ports)."""
    host: str
    ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()   # comment lines above it


@dataclass(frozen=True)
class LearnedRequest:
    ts: str
    host: str
    port: int | None
    method: str
    path: str | None
    path_cut: bool = False        # the audit line shortened the path: only its start is known


@dataclass
class _HostSeen:
    count: int = 0
    ports: set[int] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    paths: dict[str, bool] = field(default_factory=dict)   # path -> cut short
    dropped_paths: int = 0


# --------------------------------------------------------------------------- what the agent file takes


@cache
def _host_pattern() -> re.Pattern[str]:
    return re.compile(route_schema()["properties"]["host"]["pattern"])


@cache
def route_methods() -> tuple[str, ...]:
    """The methods an agent file's route may name (its schema's enum)."""
    return tuple(route_schema()["properties"]["methods"]["items"]["enum"])


def routable_host(host: str) -> bool:
    """An exact host name an agent file's route may take."""
    return not host.startswith("*.") and _host_pattern().fullmatch(host) is not None


# --------------------------------------------------------------------------- rendering


def render_snippet(comments: Iterable[str], routes: Iterable[SnippetRoute]) -> str:
    from bottle_tasks.render import render_template

    return render_template("routes-snippet.yaml.j2", comments=[printable(line) for line in comments],
                           routes=[{"host": r.host, "ports": r.ports, "methods": r.methods, "paths": r.paths,
                                    "notes": [printable(note) for note in r.notes]} for r in routes])


def _describe(route: Route) -> str:
    parts = [route.host, "ports " + ", ".join(map(str, route.ports)),
             "methods " + (", ".join(route.methods) or "any"), "paths " + (", ".join(route.paths) or "any")]
    if route.private_network:
        parts.append("private network")
    if route.token is not None:
        parts.append(f"token in {route.token.header}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- show, promote


def show(selector: str, spec_path: Path, unknown_hosts: str, routes: tuple[Route, ...], overlay_file: Path,
         overlay: Overlay) -> str:
    lines = [f"agent file {spec_path} (network.unknown_hosts: {unknown_hosts}):"]
    lines += [f"  routes[{i}]  {_describe(route)}" for i, route in enumerate(routes)] or ["  no routes"]
    lines.append(f"policy overlay {overlay_file} (approved with scope=always; egress applies it live):")
    if not overlay.routes:
        lines.append(f"  no routes (doit approve {selector} id=<id> scope=always adds the host of a request "
                     "egress holds)")
    for i, route in enumerate(overlay.routes):
        lines.append(f"  routes[{i}]  {_describe(route)}")
        lines += [f"    port {a.port} approved by {a.by} at {a.at} (request {a.request_id})"
                  + (f": {a.reason}" if a.reason else "") for a in overlay.approvals_of(route.host)]
    if overlay.routes:
        lines.append(f"doit policy promote {selector} prints the overlay's routes for the agent file")
    return "\n".join(printable(line) for line in lines)


def promote(selector: str, spec_path: Path, overlay_file: Path, overlay: Overlay) -> str:
    if not overlay.routes:
        return printable(f"the policy overlay {overlay_file} has no routes, so there is nothing to promote "
                         f"(doit approve {selector} id=<id> scope=always adds one)")
    comments = [f"The policy overlay of {selector} ({overlay_file}): routes approved with scope=always.",
                f"Paste them under routes: in {spec_path}; once the agent file has them, the overlay's copy "
                "can go (delete the file)."]
    routes = []
    for route in overlay.routes:
        if not routable_host(route.host):
            comments.append(f"left out {route.host}: not a host name an agent file's route can take")
            continue
        notes = tuple(f"port {a.port} approved by {a.by} at {a.at} (request {a.request_id})"
                      + (f": {a.reason}" if a.reason else "") for a in overlay.approvals_of(route.host))
        routes.append(SnippetRoute(route.host, route.ports, route.methods, route.paths, notes))
    return render_snippet(comments, routes)


# --------------------------------------------------------------------------- suggest


def learned_requests(records: Iterable[Mapping[str, Any]]) -> list[LearnedRequest]:
    """The audit stream's learn records, oldest first; a line missing its host or with odd types is skipped."""
    learned = []
    for record in records:
        if (record.get("source"), record.get("event"), record.get("decision")) != ("egress", "request", "learn"):
            continue
        host, port, method, path = (record.get(k) for k in ("host", "port", "method", "path"))
        if not isinstance(host, str) or not host or not isinstance(record.get("ts", ""), str):
            continue
        port = port if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535 else None
        path = path if isinstance(path, str) and path else None
        cut = path is not None and len(path) >= MAX_FIELD_CHARS["path"] and path.endswith(_CUT_MARK)
        learned.append(LearnedRequest(str(record.get("ts", "")), normalize_host(host), port,
                                      method.upper() if isinstance(method, str) else "",
                                      path[: -len(_CUT_MARK)] if cut else path, cut))
    return learned


def suggest(selector: str, spec_path: Path, audit_dir: Path, records: Iterable[Mapping[str, Any]],
            routed: tuple[Route, ...]) -> str:
    """Routes for what learn mode let through; routed: the agent file's and the overlay's routes."""
    learned = learned_requests(records)
    if not learned:
        return printable(f"no learned requests in the audit stream {audit_dir}: learn mode records them "
                         f"({LEARN_MODE} in {spec_path}, then doit start {selector})")
    hosts: dict[str, _HostSeen] = {}
    for request in learned:
        seen = hosts.setdefault(request.host, _HostSeen())
        seen.count += 1
        if request.port is not None:
            seen.ports.add(request.port)
        if request.method:
            seen.methods.add(request.method)
        if request.path is None:
            continue
        if request.path.startswith("/"):
            seen.paths[request.path] = seen.paths.get(request.path, False) or request.path_cut
        else:
            seen.dropped_paths += 1
    comments = [f"Suggested for {selector} from {len(learned)} learned requests since {learned[0].ts} "
                f"(audit stream {audit_dir}).",
                f"Learn mode let every one of them through: check each route before you paste it under "
                f"routes: in {spec_path}."]
    routes = []
    for host in sorted(hosts):
        seen = hosts[host]
        if any(route.matches_host(host) for route in routed):
            comments.append(f"left out {host}: a route names it now")
        elif not routable_host(host):
            comments.append(f"left out {host}: not a host name an agent file's route can take")
        else:
            routes.append(_suggested_route(host, seen))
    return render_snippet(comments, routes)


def _suggested_route(host: str, seen: _HostSeen) -> SnippetRoute:
    notes = [f"{seen.count} learned request{'s' if seen.count != 1 else ''}"]
    methods = tuple(sorted(seen.methods))
    unnamable = [m for m in methods if m not in route_methods()]
    if unnamable:
        notes.append(f"any method: an agent file's route cannot name {', '.join(unnamable)[:80]}")
        methods = ()
    paths = narrow_paths(seen.paths) if seen.paths else ()
    if paths == (ANY_PATH,):
        notes.append(f"any path: {len(seen.paths)} distinct paths with no first segment in common")
    if seen.dropped_paths:
        notes.append(f"{seen.dropped_paths} request target(s) not starting with /, which no path glob names")
    if not seen.paths:
        notes.append("any path: " + ("none of its request targets starts with /" if seen.dropped_paths
                                     else "no path was recorded"))
    return SnippetRoute(host, tuple(sorted(seen.ports)), methods, paths, tuple(notes))


def glob_literal(text: str) -> str:
    """text as an fnmatch glob that matches only itself (a character past U+FFFF: any one character)."""
    return "".join(f"[{c}]" if c in "[*?" else "?" if ord(c) > 0xFFFF else c for c in text)


def narrow_paths(seen: Mapping[str, bool]) -> tuple[str, ...]:
    """The globs for the paths seen (path -> only its start is known), by the rule of the module docstring."""
    def exact(path: str) -> str:
        return glob_literal(path) + ("*" if seen[path] else "")

    if len(seen) <= EXACT_PATHS:
        return tuple(sorted(exact(path) for path in seen))
    groups: dict[str, list[str]] = {}
    for path in seen:
        groups.setdefault(path.split("/", 2)[1], []).append(path)
    if all(len(members) == 1 for members in groups.values()):
        return (ANY_PATH,)
    globs = []
    for segment, members in groups.items():
        bare = "/" + segment
        deeper = [path for path in members if path != bare or seen[path]]
        if len(deeper) < len(members):
            globs.append(glob_literal(bare))
        if len(deeper) == 1:
            globs.append(exact(deeper[0]))
        elif deeper:
            common = os.path.commonprefix(deeper)
            directory = common[: common.rfind("/") + 1]
            # A first segment cut short ("/aaaa..."): no "/" after it to cut back to, so the shared start.
            globs.append(glob_literal(directory if len(directory) > 1 else common) + "*")
    return tuple(sorted(globs))
