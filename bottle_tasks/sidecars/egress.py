"""egress: the bundle's only front door, a mitmproxy (11.x) addon plus its launcher.

    python -m bottle_tasks.sidecars.egress --routes /etc/bottle/routes.yaml --ca-dir /etc/bottle/ca

Implements "Egress decisions, in order" from docs/bundle-contract.md:

1. CONNECT / plain request to an unrouted host          -> 403 route_not_allowed
   a port outside the route's ``ports``, at CONNECT and on every request -> 403 port_not_allowed
   on a wildcard route, a name carrying a secret or encoded data, before DNS -> 403 hostname_*
2. ClientHello without SNI / SNI != CONNECT host        -> connection killed, sni_missing / sni_mismatch
3. Host != the request's authority                      -> 403 authority_mismatch
   (every Host header and HTTP/2 :authority must name the CONNECT authority inside a tunnel, the
   URL's authority for an absolute-form request; none, two, or another port is refused)
   an https URL sent in the clear, without CONNECT      -> 403 https_requires_connect
4. method / path outside the route                      -> 403 method_not_allowed / path_not_allowed
   on a route with ``paths``, a path not in normal form or ambiguous -> 403 path_ambiguous
   a request body over the route's ``max_body_bytes``   -> 413 body_too_large, before it is read
5. host resolving to a non-global address               -> 403 private_address (unless private_network)
6. DLP on URL, header names and values, trailers, body, before any token is filled, then the
   route's ``dlp`` action (inspection.py)               -> 403 dlp_match, or forwarded redacted / logged
   (dlp_unavailable if pipelock fails or the body cannot be decoded with a bound); a body decoding
   past max_body_bytes, or to more than 200 times its size -> 413 body_too_large / compression_ratio
7. credentialed route over plain HTTP                   -> 403 token_requires_tls
8. token slot header set to ``format`` with the real value; the real value is replaced by the
   placeholder in response headers and bodies.
9. with pipelock, a response on a route whose ``responses`` is not off, scanned for prompt
   injection (SSE event by event)                       -> 502 response_injection, or logged (warn)

Why these shapes:

- https absolute-form (``GET https://host/ HTTP/1.1`` sent in the clear to the proxy port) is
  refused, not normalised: a real client CONNECTs for https, and for this form egress would
  originate the TLS itself on the guest's behalf, the one request the token must never ride.
  Plain-http absolute-form is kept (clients use it), with its Host checked like a tunnel's, so
  the token (https only) is never sent with a Host its route does not name.
- Paths are not rewritten: a path whose normal form differs from what was sent is refused, so
  the path the globs matched is the path the upstream receives (targets.path_problem). Routes
  without ``paths`` skip this check: no glob to get around, and npm's ``@scope%2fname`` works.
- Request bodies. mitmproxy reads a body whole before the ``request`` hook, and a response set
  in ``requestheaders`` is only sent once the body has been read; its own limit
  (``body_size_limit``) is global and refuses large *responses* too. So egress wraps the HTTP
  layer's body-size check (install_body_limit): a declared Content-Length over the route's limit
  gets the 413 before a byte of the body is read, and a chunked or HTTP/2 body gets it as soon
  as the buffered part passes the limit; an HTTP/1 connection is then closed, so nothing more is
  read. Decoding is incremental with a bound and scanning goes window by window, in a worker
  thread (bodies.py), so no body is expanded whole and no scan stalls other clients.
  The raw body is still buffered (up to ``max_body_bytes``) rather than streamed: with request
  streaming mitmproxy sends the headers, token included, before the first body byte, and a secret
  found mid-stream can neither be recalled nor reliably stop an upstream from acting on the part
  it has. Buffering keeps the guarantee that nothing, and no token, leaves before the whole body
  has been scanned; ``max_body_bytes`` is what bounds the memory.

Beyond the list, fail-closed extras: raw TCP inside a tunnel is refused (``tcp_not_allowed``),
WebSocket messages get decision 6 from the guest and decision 9 from the server, and in direct mode a
server connection the request hook did not check is refused (``destination_unchecked``).
A compressed response is decoded for redaction with a bound too; one past it, or in an encoding
without a bounded decoder, is passed on as is, as a large compressed response always was (with
tokens to redact, egress offers upstreams only gzip, deflate and zstd, so br should not come back).

Token values come from the environment (names from routes.yaml) and are never logged: every log
line also passes through a scrubber that replaces them with their placeholders.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import secrets as token_source
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, TextIO

from mitmproxy import connection, http, tcp, tls, websocket
from mitmproxy.proxy import server_hooks

from bottle_tasks.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_ROUTE_PORTS, Route, TokenSlot, normalize_host
from bottle_tasks.sidecars import bodies, dlp, pipelock_scan
from bottle_tasks.sidecars.advice import Where, fix_for
from bottle_tasks.sidecars.audit import AuditWriter
from bottle_tasks.sidecars.inspection import (
    RESPONSE_SCAN_LIMIT, Block, Inspector, OutgoingRequest, SseInjectionFilter,
)
from bottle_tasks.sidecars.addresses import is_lan_address, is_public_address, resolve_host
from bottle_tasks.sidecars.configfile import PIPELOCK_TOKEN_ENV, pipelock_scan_token
from bottle_tasks.sidecars.routes import RoutesConfig, RoutesError, load_routes, route_for
from bottle_tasks.sidecars.scrub import SecretScrubber
from bottle_tasks.sidecars.targets import authority_problem, path_problem

BLOCK_HEADER = "X-Bottle-Block-Reason"
REQUEST_ID_HEADER = "X-Bottle-Request-Id"
# How often the policy overlay's file is looked at (a stat); an approval re-reads it at once.
OVERLAY_CHECK_S = 0.1
HOLD_POLL_S = 0.1
# ask: requests waiting for a human at once, and their bodies (kept in memory while they wait).
MAX_HELD_REQUESTS = 64
MAX_HELD_BYTES = 64 << 20
# egress's log events, as the audit stream's decisions; "connect" (a tunnel opened) is not a decision.
AUDIT_DECISIONS = {"block": "block", "allow": "allow", "learn": "learn", "hold": "hold", "dlp_logged": "log",
                   "dlp_redacted": "redact", "response_warning": "warn", "response_not_redacted": "warn",
                   "approved": "approve", "start": "info"}
DEFAULT_UPSTREAM_CA = "/etc/bottle/upstream-ca.pem"
DEFAULT_PIPELOCK_CONFIG = "/etc/bottle/pipelock.yaml"
# Responses up to this size (with a Content-Length) are buffered and redacted whole; larger or
# length-less ones (server-sent events) are streamed and redacted chunk by chunk.
BUFFER_LIMIT = 8 << 20
# A buffered compressed response is decoded for redaction up to this size, and passed on as is past it.
RESPONSE_DECODE_LIMIT = 4 * BUFFER_LIMIT

_REASON_WORDS = {"allow": "allowed by its route", "learn": "allowed: learn mode records hosts no route names",
                 "hold": "held for a human: no route names this host (unknown_hosts: ask)",
                 "approved": "a human approved it"}

Resolver = Callable[[str, int], Awaitable[list[str]]]
Emit = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# logs


def json_line_emitter(out: TextIO, scrubber: SecretScrubber) -> Emit:
    def emit(record: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **record}, ensure_ascii=True, sort_keys=False)
        out.write(scrubber.text(line) + "\n")  # belt and braces: no token value ever reaches a log
        out.flush()

    return emit


# ---------------------------------------------------------------------------------------------
# routes: the file's, and the overlay's, re-read live


class LiveRoutes:
    """routes.yaml's routes, then the policy overlay's (routes a human approved with scope=always),
    which the host rewrites while egress runs: its file is stat'ed at most every OVERLAY_CHECK_S and
    re-read when it changed. A route of the file always wins over one of the overlay. An overlay
    route never carries a token, and reaches private addresses only with network.unknown_private_network."""

    def __init__(self, config: RoutesConfig, log: Callable[[str], None] = lambda text: None):
        self.config = config
        self.path = Path(config.overlay) if config.overlay else None
        self.overlay: tuple[Route, ...] = ()
        self._seen: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._log = log

    def route_for(self, host: str) -> Route | None:
        route = self.config.route_for(host)
        if route is not None or self.path is None:
            return route
        self.refresh()
        return route_for(self.overlay, host)

    def key_of(self, route: Route | None) -> str:
        """Where the route comes from, as a user finds it: routes[3], or the overlay."""
        if route is None:
            return ""
        if route in self.config.routes:
            return f"routes[{self.config.routes.index(route)}]"
        return "the policy overlay's route (doit policy promote prints it for the agent file)"

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked_at < OVERLAY_CHECK_S):
            return
        self._checked_at = now
        try:
            info = os.stat(self.path)
            seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        self._seen = seen
        if seen is None:
            self.overlay = ()
            return
        from bottle_tasks.sidecars.overlay import OverlayError, load_overlay

        try:
            routes = load_overlay(self.path)
        except OverlayError as error:
            self._log(f"policy overlay not applied, the last good one stays: {error}")
            return
        private = self.config.unknown_private_network
        self.overlay = tuple(dataclasses.replace(r, private_network=private) for r in routes if r.token is None)


# ---------------------------------------------------------------------------------------------
# the addon


class Egress:
    """mitmproxy addon enforcing routes.yaml. Hooks are called by mitmproxy; see module docstring."""

    def __init__(
        self,
        config: RoutesConfig,
        secrets: Mapping[str, str],
        *,
        emit: Emit | None = None,
        pipelock: pipelock_scan.PipelockClient | None = None,
        resolve: Resolver = resolve_host,
        dial_directly: bool | None = None,
        audit: AuditWriter | None = None,
    ):
        missing = [slot.env for slot in config.token_slots() if not secrets.get(slot.env)]
        if missing:
            raise ValueError(f"token env vars not set: {', '.join(sorted(set(missing)))}")
        self.config = config
        self.secrets = {slot.env: secrets[slot.env] for slot in config.token_slots()}
        self.scrubber = SecretScrubber.placeholders({secrets[slot.env]: slot.placeholder for slot in config.token_slots()})
        self.emit = emit or json_line_emitter(sys.stdout, self.scrubber)
        self.audit = audit if audit is not None else AuditWriter.from_env("egress", scrubber=self.scrubber)
        self.routes = LiveRoutes(config, lambda text: self.emit({"event": "error", "reason": text}))
        self._holds: dict[tuple[str, int], asyncio.Future] = {}  # (host, port) -> the decision being waited for
        self._held_requests = 0   # waiting in _hold now, and the bytes of their bodies
        self._held_bytes = 0
        self.pipelock = pipelock
        self.inspector = Inspector(pipelock)
        self.resolve = resolve
        # Upstream mode: pipelock dials, so there is no connection of ours to pin.
        self.dial_directly = (config.upstream_proxy == "") if dial_directly is None else dial_directly
        self._tunnels: dict[str, tuple[str, int]] = {}  # client id -> CONNECT authority
        self._refused_tls: set[str] = set()  # client ids whose ClientHello failed the SNI check
        self._pins: dict[tuple[str, int], str] = {}  # (host, port) -> the IP the request hook checked
        self._pinned_servers: dict[str, tuple[str, int]] = {}  # server id -> address before pinning

    # -- logging ------------------------------------------------------------------------------

    def log(self, event: str, *, reason: str = "", method: str = "", host: str = "", path: str = "",
            pattern: str = "", where: str = "", request_id: str = "", port: int | None = None, detail: str = "",
            fix: str = "") -> None:
        # The query string is dropped and DLP patterns redacted: a URL can carry the very secret
        # that was blocked. Header values and bodies are never passed in.
        safe_path = dlp.redact(path.split("?", 1)[0])
        safe_host = dlp.redact(host)
        self.emit({"event": event, "reason": reason, "method": method, "host": safe_host,
                   "path": safe_path, "pattern": pattern, "where": where,
                   **({"request_id": request_id} if request_id else {})})
        decision = AUDIT_DECISIONS.get(event)
        if decision is None:
            return
        kind = "connect" if method == "CONNECT" else (where if where in ("tls", "response", "websocket", "tcp")
                                                      else "request")
        self.audit.emit(kind, decision, reason_code=reason, reason=detail or _REASON_WORDS.get(event, reason),
                        request_id=request_id, method=method, host=safe_host, port=port, path=safe_path,
                        dlp_pattern=pattern, dlp_where=where if pattern else "", fix=fix)

    def request_id(self, flow: http.HTTPFlow) -> str:
        """The id a 403, the audit line and a held request's supervise entry share."""
        return flow.metadata.setdefault("bottle_request_id", token_source.token_hex(8))

    def where(self, flow: http.HTTPFlow, host: str, route: Route | None) -> Where:
        tunnel = self._tunnels.get(flow.client_conn.id)
        port = tunnel[1] if tunnel else flow.request.port
        return Where(agent_file=self.config.agent_file, unknown_hosts=self.config.unknown_hosts, host=host,
                     port=port, method=flow.request.method, path=flow.request.path.split("?", 1)[0],
                     route=route, route_key=self.routes.key_of(route))

    def block(self, flow: http.HTTPFlow, block: Block, host: str, route: Route | None = None) -> None:
        request_id = self.request_id(flow)
        where = self.where(flow, host, route if route is not None else self.routes.route_for(host))
        fix = fix_for(block.reason, where, size=block.size, pattern=block.pattern)
        flow.response = self.block_response(block, request_id, fix)
        self.log("block", reason=block.reason, method=flow.request.method, host=block.log_host or host,
                 path=flow.request.path, pattern=block.pattern, where=block.where, request_id=request_id,
                 port=where.port, detail=block.detail, fix=fix)

    def block_response(self, block: Block, request_id: str = "", fix: str = "") -> http.Response:
        body = f"claude-bottle egress blocked this request: {block.reason} ({block.detail})\n"
        if request_id:
            body += f"request id: {request_id} (doit logs shows it)\n"
        if fix:
            body += f"to allow it: {fix}\n"
        headers = {"Content-Type": "text/plain; charset=utf-8", BLOCK_HEADER: block.reason}
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        return http.Response.make(block.status, self.scrubber.text(body), headers)

    # -- decision 1: CONNECT ------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        host, port = normalize_host(flow.request.host), flow.request.port
        route = self.routes.route_for(host)
        if route is None:
            if self.config.unknown_hosts == "deny":
                self.block(flow, Block("route_not_allowed", f"no route for {host}"), host)
                return
            # ask, learn: the tunnel opens (nothing is dialled yet: connection_strategy lazy) and each
            # request in it is decided in request(), where its method and path are known.
            route = self._unknown_host_route(host, port)
        if not route.allows_port(port):
            self.block(flow, _port_block(route, host, port), host)
            return
        problem = _hostname_block(route, flow.request.host, unknown=self.routes.route_for(host) is None)
        if problem is not None:
            self.block(flow, problem, host, route)
            return
        self._tunnels[flow.client_conn.id] = (host, port)
        self.log("connect", method="CONNECT", host=host)

    # -- decision 2: SNI ----------------------------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        tunnel = self._tunnels.get(client.id)
        connect_host = tunnel[0] if tunnel else ""
        sni = data.client_hello.sni
        if not sni:
            reason = "sni_missing"
        elif not connect_host or normalize_host(sni) != connect_host:
            reason = "sni_mismatch"  # also TLS sent straight at the proxy, without a CONNECT
        else:
            return
        # The connection cannot be killed from this hook; tls_start_client withholds the TLS
        # context, which makes mitmproxy close it before any byte reaches an upstream.
        self._refused_tls.add(client.id)
        self.log("block", reason=reason, method="CONNECT", host=connect_host or (sni or ""), where="tls")

    def tls_start_client(self, data: tls.TlsData) -> None:
        if data.context.client.id in self._refused_tls:
            data.ssl_conn = None  # runs after mitmproxy's TlsConfig (addons are called in order)

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.pop(client.id, None)
        self._refused_tls.discard(client.id)

    # -- decisions 1, 3-8: requests -----------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (another addon, or a replay)
        req = flow.request
        tunnel = self._tunnels.get(flow.client_conn.id)
        host = tunnel[0] if tunnel else normalize_host(req.host)
        port = tunnel[1] if tunnel else req.port

        route = self.routes.route_for(host)
        unknown = route is None
        if route is None:
            if self.config.unknown_hosts == "deny":
                return self.block(flow, Block("route_not_allowed", f"no route for {host}"), host)
            route = self._unknown_host_route(host, port)
        problem = self._check_target(req, route, host, port, in_tunnel=tunnel is not None, unknown=unknown)
        if problem is not None:
            return self.block(flow, problem, host, route)

        if unknown and self.config.unknown_hosts == "ask":
            # DLP before a human sees it: a request carrying a secret is refused, never offered for approval.
            problem = await self._scan(flow, route, host)
            if problem is not None:
                return self.block(flow, problem, host, route)
            problem, route = await self._hold(flow, host, port, route)
            if problem is not None:
                return self.block(flow, problem, host)
            pinned_ip, problem = await self._check_destination(route, host, port)   # the floor, after approval too
            if problem is not None:
                return self.block(flow, problem, host, route)
        else:
            pinned_ip, problem = await self._check_destination(route, host, port)
            if problem is not None:
                return self.block(flow, problem, host, route)
            problem = await self._scan(flow, route, host)
            if problem is not None:
                return self.block(flow, problem, host, route)

        if route.token is not None:
            if req.scheme != "https":
                return self.block(flow, Block("token_requires_tls", f"{host} carries a token; use https"), host)
            self._fill_token(req, route.token)
        if self.scrubber:
            _accept_only_bounded_encodings(req)  # so what comes back can be decoded for redaction

        if self.dial_directly and pinned_ip:
            self._pins[(host, port)] = pinned_ip
        learned = unknown and self.config.unknown_hosts == "learn"
        self.log("learn" if learned else "allow", method=req.method, host=host, path=req.path,
                 request_id=self.request_id(flow), port=port)

    def _unknown_host_route(self, host: str, port: int) -> Route:
        """The route a host no route names is held (ask) or allowed (learn) under: the defaults, no
        token, never a private address. ask admits any port (the human sees it); learn the default ones."""
        ports = (port,) if self.config.unknown_hosts == "ask" else DEFAULT_ROUTE_PORTS
        return Route(host, ports=ports, private_network=self.config.unknown_private_network)

    async def _hold(self, flow: http.HTTPFlow, host: str, port: int, route: Route) -> tuple[Block | None, Route]:
        """ask: file the request in the supervise queue and wait for a human (up to hold_seconds).
        Requests to the same host and port while one is held wait for that one decision. Approved
        with scope=always, the route is in the overlay by the time the decision is: it is re-read and
        used from then on, and every waiting request passes. Approved once, only the request the human
        saw passes; each other one waiting is held again, as itself. A denial refuses them all."""
        size = len(flow.request.raw_content or b"")
        if self._held_requests >= MAX_HELD_REQUESTS or self._held_bytes + size > MAX_HELD_BYTES:
            # Each held request keeps its body in memory for up to hold_seconds: a flood must not fill egress.
            return Block("approvals_full", f"{self._held_requests} requests ({self._held_bytes} bytes) already wait "
                         f"for a human, at most {MAX_HELD_REQUESTS} ({MAX_HELD_BYTES} bytes); retry once they are "
                         "decided", status=429), route
        key = (host, port)
        while True:
            waiting = self._holds.get(key)
            if waiting is None:
                waiting = asyncio.get_running_loop().create_future()
                self._holds[key] = waiting
                asyncio.ensure_future(self._decide_hold(flow, host, port, waiting))
            self._held_requests += 1
            self._held_bytes += size
            try:
                status, by, reason, scope, shown = await asyncio.shield(waiting)
            finally:
                self._held_requests -= 1
                self._held_bytes -= size
                if waiting.done() and self._holds.get(key) is waiting:
                    del self._holds[key]
            if status == "approved" and scope != "always" and shown != self.request_id(flow):
                continue   # the human approved another request once, not this one
            break
        if status == "approved":
            if scope == "always":
                self.routes.refresh(force=True)
                route = self.routes.route_for(host) or route
            return None, route
        if status == "denied":
            words = f"denied by {by}" + (f": {reason}" if reason else "")
            return Block("denied_by_human", words), route
        if status == "refused":
            return Block("approvals_full", reason, status=429), route
        return Block("approval_expired", f"no decision within {self.config.hold_seconds} s"), route

    async def _decide_hold(self, flow: http.HTTPFlow, host: str, port: int, waiting: asyncio.Future) -> None:
        from bottle_tasks.sidecars.supervise_store import Store, SuperviseError, TooManyRequests

        request_id = self.request_id(flow)
        method, path = flow.request.method, flow.request.path.split("?", 1)[0]
        store = Store(Path(self.config.approvals_dir))
        safe_path = dlp.redact(path)
        try:
            held = await asyncio.to_thread(
                store.create_request, f"egress {method} {host}",
                {"host": host, "port": port, "method": method, "path": safe_path,
                 "scheme": flow.request.scheme}, f"a request to {host}:{port}, which no route names: {method} {safe_path}",
                self.config.hold_seconds, "egress", request_id)
        except TooManyRequests as error:
            waiting.set_result(("refused", "", str(error), "", ""))
            return
        except (SuperviseError, OSError) as error:
            waiting.set_result(("refused", "", f"the supervise queue is unavailable: {error}", "", ""))
            return
        self.log("hold", method=method, host=host, path=path, request_id=request_id, port=port,
                 fix=f"doit approve id={request_id} scope=once|always, or doit deny id={request_id} reason=...")
        deadline = time.monotonic() + self.config.hold_seconds + 5   # the store's expiry, with its grace
        while time.monotonic() < deadline:
            try:
                current = await asyncio.to_thread(store.get, held.id)
            except (SuperviseError, OSError):
                current = None
            if current is not None and not current.pending:
                scope = getattr(current, "scope", "") or "once"
                if current.status == "approved":
                    self.log("approved", method=method, host=host, path=path, request_id=request_id, port=port,
                             detail=f"approved by {current.by} (scope {scope})")
                waiting.set_result((current.status, current.by, current.reason, scope, request_id))
                return
            await asyncio.sleep(HOLD_POLL_S)
        waiting.set_result(("expired", "", "", "", request_id))

    def _check_target(self, req: http.Request, route: Route, host: str, port: int, *, in_tunnel: bool,
                      unknown: bool = False) -> Block | None:
        """Decisions 1 (port), 3 and 4: what the request line and headers alone decide."""
        if not in_tunnel and req.scheme == "https":
            return Block("https_requires_connect", "an https URL sent in the clear to the proxy; "
                         "send https through a CONNECT tunnel")
        if not route.allows_port(port):
            return _port_block(route, host, port)
        problem = _hostname_block(route, req.host, unknown=unknown)
        if problem is not None:
            return problem
        if in_tunnel and (normalize_host(req.host) != host or req.port != port):
            return Block("authority_mismatch", "the request target differs from the CONNECT authority")
        problem = authority_problem(req.headers.get_all("host"), req.authority, req.scheme, host, port)
        if problem is not None:
            return Block("authority_mismatch", f"{problem} ({host}:{port})")
        if not route.allows_method(req.method):
            return Block("method_not_allowed", f"{req.method} not allowed for {host}")
        if route.paths:
            problem = path_problem(req.path)
            if problem is not None:
                return Block("path_ambiguous", problem)
        if not route.allows_path(req.path):
            return Block("path_not_allowed", f"path not allowed for {host}")
        size = len(req.raw_content or b"")
        if size > route.max_body_bytes:  # install_body_limit refuses it sooner; this holds without it
            return _body_too_large(route, host, size)
        return None

    async def _check_destination(self, route: Route, host: str, port: int) -> tuple[str, Block | None]:
        addresses = await self.resolve(host, port)
        if not addresses:
            return "", Block("dns_unresolvable", f"{host} does not resolve", status=502)
        # A host the agent chose (ask, learn, the overlay) reaches at most a LAN with
        # unknown_private_network: never loopback (the bundle's own ports) or link-local (metadata).
        chosen_by_agent = route not in self.config.routes
        for ip in addresses:
            if is_public_address(ip) or (route.private_network and (not chosen_by_agent or is_lan_address(ip))):
                continue
            return "", Block("private_address", f"{host} resolves to non-global address {ip}")
        return addresses[0], None

    async def _scan(self, flow: http.HTTPFlow, route: Route, host: str) -> Block | None:
        """Decision 6, in a worker thread: decoding and regex scans of a large body never hold up
        the event loop, and with it every other client. Then the route's dlp action
        (inspection.py): a block, the redacted request in place of the one sent, or a log line."""
        req = flow.request
        outgoing = OutgoingRequest(
            host=req.host, path=req.path, headers=tuple(req.headers.items(multi=True)),
            trailers=tuple(req.trailers.items(multi=True)) if req.trailers else (),
            raw_body=req.raw_content or b"", content_encoding=req.headers.get("content-encoding", ""),
            content_type=req.headers.get("content-type", ""))
        verdict = await asyncio.to_thread(self.inspector.inspect_request, outgoing, route)
        if verdict.refusal is not None:
            return verdict.refusal
        if verdict.action == "redact":
            _apply_redaction(req, verdict)
        event = {"log": "dlp_logged", "redact": "dlp_redacted"}.get(verdict.action)
        for match in (verdict.redacted or verdict.found) if event else ():
            self.log(event, reason="dlp_match", method=req.method, host=host, path=outgoing.path,
                     pattern=match.pattern, where=match.where)
        return None

    # -- decision 4, as the body arrives (install_body_limit) ----------------------------------

    def body_limit_response(self, flow: http.HTTPFlow, buffered: int | None) -> http.Response | None:
        """egress's 413 when a request body is over its route's max_body_bytes, else None.
        buffered: bytes of the body read so far; None before the first, when only a declared
        Content-Length can tell. Called from mitmproxy's HTTP layer (install_body_limit)."""
        req = flow.request
        tunnel = self._tunnels.get(flow.client_conn.id)
        host = tunnel[0] if tunnel else normalize_host(req.host)
        route = self.routes.route_for(host)
        limit = route.max_body_bytes if route is not None else DEFAULT_MAX_BODY_BYTES
        size = buffered if buffered is not None else _declared_length(req)
        if size is None or size <= limit:
            return None
        block = _body_too_large(route, host, size, whole=buffered is None)
        self.log("block", reason=block.reason, method=req.method, host=host, path=req.path, where="body")
        return self.block_response(block)

    def _fill_token(self, req: http.Request, slot: TokenSlot) -> None:
        req.headers[slot.header] = slot.header_value(self.secrets[slot.env])

    # -- pinning (direct mode): dial the address that was checked, not a fresh DNS answer --------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if not self.dial_directly or data.server.address is None:
            return
        host, port = normalize_host(str(data.server.address[0])), int(data.server.address[1])
        pinned = self._pins.get((host, port))
        if pinned is None:
            data.server.error = "destination_unchecked"  # fail closed: only checked hosts are dialled
            self.log("block", reason="destination_unchecked", host=host, where="connect")
            return
        self._pinned_servers[data.server.id] = data.server.address
        data.server.address = (pinned, port)  # SNI stays the host name: server.sni is already set

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self._pinned_servers.pop(data.server.id, None)
        if original is not None:
            # Put the host name back so mitmproxy reuses this connection for later requests to the
            # same host (its pool matches on address). The socket stays on the checked IP.
            # Server.__setattr__ forbids changing address on an open connection, hence object's.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._pinned_servers.pop(data.server.id, None)

    # -- responses: reflected tokens, prompt injection ------------------------------------------

    def _route_of(self, flow: http.HTTPFlow) -> tuple[str, Route | None]:
        tunnel = self._tunnels.get(flow.client_conn.id)
        host = tunnel[0] if tunnel else normalize_host(flow.request.host)
        return host, self.routes.route_for(host)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        host, route = self._route_of(flow)
        scanned = self.inspector.scans_responses(route, response.headers.get("content-type", ""))
        if self.scrubber:
            fields = response.headers.fields
            if any(self.scrubber.data(k + b"\0" + v) != k + b"\0" + v for k, v in fields):
                response.headers.fields = tuple((self.scrubber.data(k), self.scrubber.data(v)) for k, v in fields)
        if scanned and _is_event_stream(response):
            assert route is not None
            # Server-sent events (MCP over HTTP, streamed tool results): scanned event by event as they pass.
            redact = self.scrubber.stream() if self.scrubber else None
            injection = SseInjectionFilter(self.inspector.injection_in, route.responses,
                                           lambda reason, matches: self._report_injection(flow, host, reason, matches))
            response.stream = injection if redact is None else (lambda chunk: injection(redact(chunk)))
            return
        if scanned:
            return  # buffered whole; response() scans it (and redacts tokens)
        if not self.scrubber:
            response.stream = True   # nothing to scan or redact: pass bytes through as they arrive
            return
        length = _content_length(response)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if length is not None and length <= BUFFER_LIMIT:
            return  # buffered; response() redacts and mitmproxy recomputes Content-Length
        if encoding not in ("", "identity"):
            if length is None or length <= BUFFER_LIMIT:
                return  # buffered; response() decodes, redacts, re-encodes
            # Larger than BUFFER_LIMIT and compressed: streamed as is, not redacted (documented limit).
            response.stream = True
            return
        # Streamed, so server-sent events reach the agent as they arrive. With a Content-Length the
        # redaction must keep the length (the client counts bytes; HTTP/2 treats a mismatch as a
        # protocol error), so the placeholder is padded or cut to the token's length there.
        scrubber = self.scrubber if length is None else self.scrubber.same_length()
        response.stream = scrubber.stream() if scrubber else True

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.stream or BLOCK_HEADER in response.headers:
            return  # streamed (redacted or scanned as it passed), or egress's own answer
        host, route = self._route_of(flow)
        scanned = self.inspector.scans_responses(route, response.headers.get("content-type", ""))
        if not self.scrubber and not scanned:
            return
        content, problem, matches = await asyncio.to_thread(self._read_response, response, scanned)
        if problem is not None and not scanned:
            # Passed on as is, unredacted, like a compressed response over BUFFER_LIMIT (streamed).
            self.log("response_not_redacted", reason=problem, method=flow.request.method,
                     host=host, path=flow.request.path, where="response")
            return
        if problem is not None or matches:
            self._report_injection(flow, host, problem or "response_injection", matches)
            if flow.response is not response:
                return  # replaced by the block
        if self.scrubber and content:
            redacted = self.scrubber.data(content)
            if redacted != content:
                response.content = redacted

    def _read_response(self, response: http.Response, scanned: bool) -> tuple[bytes, str | None, list[dlp.DlpMatch]]:
        """(decoded content, why it could not be read or scanned, injection findings). Worker thread."""
        encoding = response.headers.get("content-encoding", "")
        try:  # not get_content(): an upstream's 8 MiB of gzip must not become gigabytes here
            content = b"".join(bodies.decoded_pieces(response.raw_content or b"", encoding, RESPONSE_DECODE_LIMIT))
        except bodies.BodyRefused as refused:
            return b"", refused.reason, []
        if not scanned or not content:
            return content, None, []
        if len(content) > RESPONSE_SCAN_LIMIT:
            return content, "response_too_large_to_scan", []
        try:
            return content, None, self.inspector.injection_in(content.decode("utf-8", errors="replace"))
        except pipelock_scan.DlpUnavailable:
            return content, "dlp_unavailable", []

    def _report_injection(self, flow: http.HTTPFlow, host: str, reason: str, matches: list[dlp.DlpMatch]) -> None:
        """A response (or one of its events) pipelock flagged, or could not scan: blocked (502) on a
        route whose responses action is block, logged with warn."""
        _, route = self._route_of(flow)
        pattern = matches[0].pattern if matches else ""
        action = route.responses if route is not None else "block"
        self.log("block" if action == "block" else "response_warning", reason=reason, method=flow.request.method,
                 host=host, path=flow.request.path, pattern=pattern, where="response")
        if action == "block" and flow.response is not None and not flow.response.stream:
            detail = f"pipelock found {pattern} in the response" if pattern else "the response could not be scanned"
            flow.response = self.block_response(Block(reason, f"{detail} from {host}; routes[].responses", status=502))

    # -- other protocols -----------------------------------------------------------------------

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Raw TCP would bypass DLP and token rules; rawtcp=False makes this rare, this makes it never.
        flow.server_conn.error = "tcp_not_allowed"  # checked by mitmproxy before it dials
        if flow.killable:
            flow.kill()
        address = flow.server_conn.address
        self.log("block", reason="tcp_not_allowed", host=str(address[0]) if address else "", where="tcp")

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        """From the guest: DLP with the route's action. From the server: tokens redacted, then a
        prompt-injection scan when the route's responses are scanned. A message to drop kills the
        connection: a WebSocket cannot say why, and a half-blocked stream would mislead."""
        assert flow.websocket is not None
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        host, route = self._route_of(flow)
        text = message.content.decode("utf-8", errors="replace")
        if message.from_client:
            if route is None:
                return self._drop_message(flow, message, host, "route_not_allowed", "")
            try:
                matches, passed = await asyncio.to_thread(self.inspector.inspect_message_to_server, text, route)
            except pipelock_scan.DlpUnavailable:
                return self._drop_message(flow, message, host, "dlp_unavailable", "")
            if passed is None:
                return self._drop_message(flow, message, host, "dlp_match", matches[0].pattern)
            for match in matches:
                self.log("dlp_logged" if passed == text else "dlp_redacted", reason="dlp_match", method="WEBSOCKET",
                         host=host, path=flow.request.path, pattern=match.pattern, where="websocket")
            if passed != text:
                message.content = passed.encode()
            return
        if self.scrubber:
            message.content = self.scrubber.data(message.content)
        if not self.inspector.scans_responses(route, "text/plain"):
            return
        assert route is not None
        try:
            matches = await asyncio.to_thread(self.inspector.injection_in, text)
        except pipelock_scan.DlpUnavailable:
            matches, reason = [], "dlp_unavailable"
        else:
            reason = "response_injection"
        if not matches and reason == "response_injection":
            return
        pattern = matches[0].pattern if matches else ""
        if route.responses == "warn" and matches:
            self.log("response_warning", reason=reason, method="WEBSOCKET", host=host, path=flow.request.path,
                     pattern=pattern, where="websocket")
            return
        self._drop_message(flow, message, host, reason, pattern)

    def _drop_message(self, flow: http.HTTPFlow, message: websocket.WebSocketMessage, host: str, reason: str,
                      pattern: str) -> None:
        message.drop()
        if flow.killable:
            flow.kill()
        self.log("block", reason=reason, method="WEBSOCKET", host=host, path=flow.request.path, pattern=pattern,
                 where="websocket")


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower() == "text/event-stream"


def _hostname_block(route: Route, host: str, *, unknown: bool = False) -> Block | None:
    """Decision 1b: on a wildcard route, a name whose labels carry a secret or look like encoded
    data is refused before anything resolves it (a DNS lookup is itself a way out). host as the
    guest sent it: mixed case is itself a sign of base64. A host no route names (ask, learn) was
    chosen by the agent whole, so every label but the top-level domain counts."""
    if unknown:
        pattern = "*." + normalize_host(host).rsplit(".", 1)[-1]
    elif route.host.startswith("*."):
        pattern = route.host
    else:
        return None
    problem = dlp.hostname_problem(host, pattern)
    if problem is None:
        return None
    # Logged under the route's pattern: the name itself is what must not be written down.
    return Block(problem, f"a name under {pattern} that carries a secret or encoded data; "
                 "such names are refused before they are resolved", log_host=pattern)


def _apply_redaction(req: http.Request, verdict) -> None:
    """The redacted parts in place of what the guest sent (inspection.RequestVerdict)."""
    def headers(fields):
        return http.Headers([(name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
                             for name, value in fields])

    if verdict.path is not None:
        req.path = verdict.path
    if verdict.headers is not None:
        req.headers = headers(verdict.headers)
    if verdict.trailers is not None and req.trailers is not None:
        req.trailers = headers(verdict.trailers)
    if verdict.body is not None:
        req.headers.pop("content-encoding", None)  # sent decoded: the redaction is of the decoded text
        req.raw_content = verdict.body
        if "content-length" in req.headers:
            req.headers["content-length"] = str(len(verdict.body))


def _content_length(response: http.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _declared_length(request: http.Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _port_block(route: Route, host: str, port: int) -> Block:
    allowed = ", ".join(str(p) for p in route.ports)
    return Block("port_not_allowed", f"port {port} not allowed for {host} (allowed: {allowed}; routes[].ports)")


def _body_too_large(route: Route | None, host: str, size: int, *, whole: bool = True) -> Block:
    """whole: size is the body's size; otherwise only the part read before egress stopped."""
    limit = route.max_body_bytes if route is not None else DEFAULT_MAX_BODY_BYTES
    amount = f"{size} bytes" if whole else f"more than {limit} bytes"
    return Block("body_too_large", f"a request body of {amount} exceeds max_body_bytes ({limit} bytes) for {host}",
                 status=413, size=size)


def _accept_only_bounded_encodings(req: http.Request) -> None:
    """Accept-Encoding cut to the codings the guest accepts and egress can decode with a bound."""
    offered = req.headers.get("accept-encoding")
    if offered is None:
        return
    kept = [item.strip() for item in offered.split(",")
            if item.split(";", 1)[0].strip().lower() in bodies.BOUNDED_ENCODINGS]
    req.headers["accept-encoding"] = ", ".join(kept) or "identity"


# ---------------------------------------------------------------------------------------------
# the request-body limit inside mitmproxy's HTTP layer


def install_body_limit(refuse: Callable[[http.HTTPFlow, int | None], http.Response | None]) -> None:
    """Make mitmproxy stop reading a request body that is over its limit, and answer it.

    mitmproxy 11's HttpStream calls check_body_size(request=True) once the request headers are in
    (before the requestheaders hook) and again after every chunk of body it buffers. The wrapper
    asks ``refuse(flow, buffered)`` (buffered: bytes read so far, None before the first) and, given
    a response, sends it, drops the stream and, for HTTP/1, closes the connection: the rest of the
    body is never read. mitmproxy's own check then runs as before. Raises RuntimeError when
    mitmproxy lacks the method, so a changed mitmproxy stops egress rather than losing the limit.
    """
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers import http as layers

    stream = getattr(layers, "HttpStream", None)
    current = getattr(stream, "check_body_size", None)
    original = getattr(current, "__wrapped__", current)  # installing twice wraps once
    if original is None or list(inspect.signature(original).parameters) != ["self", "request"]:
        raise RuntimeError("mitmproxy's HttpStream.check_body_size is not the one egress wraps (mitmproxy 11); "
                           "egress cannot limit request bodies")

    def check_body_size(self, request: bool):
        if request and self.flow.request.method != "CONNECT":
            response = refuse(self.flow, len(self.request_body_buf) if self.request_body_buf else None)
            if response is not None:
                self.flow.response = response
                client = self.context.client
                yield layers.SendHttp(layers.ResponseHeaders(self.stream_id, response, False), client)
                yield layers.SendHttp(layers.ResponseData(self.stream_id, response.raw_content or b""), client)
                yield layers.SendHttp(layers.ResponseEndOfMessage(self.stream_id), client)
                self.client_state = self.server_state = self.state_errored
                self.flow.live = False
                yield layers.DropStream(self.stream_id)
                if not (self.flow.request.is_http2 or self.flow.request.is_http3):
                    yield commands.CloseConnection(client)  # HTTP/1: the only way to stop the body
                return True
        return (yield from original(self, request))

    check_body_size.__wrapped__ = original  # type: ignore[attr-defined]
    stream.check_body_size = check_body_size


# ---------------------------------------------------------------------------------------------
# launcher


class MissingTokenError(ValueError):
    """A token slot's env var is unset or empty; the message names the variable, never a value."""


def read_secrets(config: RoutesConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Token values by env name."""
    secrets: dict[str, str] = {}
    for slot in config.token_slots():
        value = environ.get(slot.env, "")
        if not value:
            raise MissingTokenError(
                f"egress: token env var {slot.env} is not set or empty in the bundle "
                f"(routes.yaml token.env); pass it with `docker run -e {slot.env}`"
            )
        secrets[slot.env] = value
    return secrets


def write_confdir(ca_dir: Path, confdir: Path) -> None:
    """mitmproxy's confdir with mitmproxy-ca.pem = bottle CA key + cert (mitmproxy's expected layout).

    The key may be SEC1 ("EC PRIVATE KEY"): mitmproxy loads it with cryptography's
    load_pem_private_key, which accepts it, and then signs leaf certificates with ECDSA-SHA256.
    """
    key = (ca_dir / "ca-key.pem").read_bytes()
    cert = (ca_dir / "ca.pem").read_bytes()
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = confdir / "mitmproxy-ca.pem"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.rstrip(b"\n") + b"\n" + cert.rstrip(b"\n") + b"\n")


def mitmproxy_options(config: RoutesConfig, confdir: Path, upstream_ca: Path | None) -> dict[str, Any]:
    mode = f"upstream:{config.upstream_proxy}" if config.upstream_proxy else "regular"
    options: dict[str, Any] = {
        "mode": [mode],
        "listen_host": config.listen_host,
        "listen_port": config.listen_port,
        "confdir": str(confdir),
        # Decide before dialling: no upstream connection at CONNECT time, leaf certs from SNI.
        "connection_strategy": "lazy",
        "upstream_cert": False,
        "rawtcp": False,  # non-HTTP inside a tunnel is parsed as HTTP (and fails), never relayed
        "http2": True,
        "http3": False,
        "termlog_verbosity": "warn",
        "stream_large_bodies": None,  # request bodies are buffered whole: DLP must see all of them
    }
    if upstream_ca is not None:
        options["ssl_verify_upstream_trusted_ca"] = str(upstream_ca)
    return options


async def run_proxy(config: RoutesConfig, secrets: Mapping[str, str], confdir: Path,
                    upstream_ca: Path | None, pipelock_token: str) -> None:
    from mitmproxy.addons import core, disable_h2c, dns_resolver, errorcheck, next_layer, proxyserver, termlog, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.options import Options

    # Only the addons a proxy needs, not DumpMaster's 34: every hook is dispatched to every addon,
    # and that dispatch was a third of egress's CPU per request. Absent too, so nothing to switch
    # off: the mitm.it onboarding app, command history, replay, saving flows, scripts.
    master = Master(Options())
    master.addons.add(
        termlog.TermLog(out=sys.stderr),  # mitmproxy's own log: stderr; decisions: stdout
        core.Core(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(), dns_resolver.DnsResolver(),
        next_layer.NextLayer(), tlsconfig.TlsConfig(), errorcheck.ErrorCheck(),
    )
    master.options.update(**mitmproxy_options(config, confdir, upstream_ca))
    pipelock = pipelock_scan.PipelockClient(config.pipelock_scan_url, pipelock_token) if config.pipelock_scan_url else None
    addon = Egress(config, secrets, pipelock=pipelock)
    master.addons.add(addon)  # last, so tls_start_client runs after mitmproxy's TlsConfig
    install_body_limit(addon.body_limit_response)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, master.shutdown)  # the init supervisor stops daemons with SIGTERM
    addon.emit({"event": "start", "reason": "", "method": "", "host": f"{config.listen_host}:{config.listen_port}",
                "path": "", "pattern": "", "where": "upstream" if config.upstream_proxy else "direct"})
    await master.run()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.egress", description=__doc__.split("\n")[0])
    parser.add_argument("--routes", required=True, type=Path, help="routes.yaml")
    parser.add_argument("--ca-dir", required=True, type=Path, help="directory with ca.pem and ca-key.pem")
    parser.add_argument("--upstream-ca", type=Path, default=Path(DEFAULT_UPSTREAM_CA),
                        help=f"extra CAs for upstream TLS, used when the file exists (default {DEFAULT_UPSTREAM_CA})")
    parser.add_argument("--pipelock-config", type=Path, default=Path(DEFAULT_PIPELOCK_CONFIG),
                        help="pipelock.yaml, read for the scan API bearer token "
                             f"(default {DEFAULT_PIPELOCK_CONFIG}; {PIPELOCK_TOKEN_ENV} overrides)")
    parser.add_argument("--confdir", type=Path, default=None,
                        help="mitmproxy confdir to create (default: a fresh temporary directory)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    try:
        config = load_routes(args.routes)
    except RoutesError as exc:
        print(f"egress: {exc}", file=sys.stderr)
        return 2
    try:
        secrets = read_secrets(config, os.environ)
    except MissingTokenError as exc:
        print(exc, file=sys.stderr)
        return 2
    pipelock_token = pipelock_scan_token(os.environ, args.pipelock_config) if config.pipelock_scan_url else ""
    if config.pipelock_scan_url and not pipelock_token:
        print(f"egress: warning: pipelock_scan_url is set but no scan API token was found ({PIPELOCK_TOKEN_ENV} "
              f"or scan_api.auth.bearer_tokens in {args.pipelock_config}); pipelock will refuse scans and every "
              "request will be blocked (dlp_unavailable)", file=sys.stderr)

    # The confdir holds a copy of the CA key: a private temp dir, removed on exit.
    confdir = args.confdir or Path(tempfile.mkdtemp(prefix="bottle-egress-"))
    try:
        try:
            write_confdir(args.ca_dir, confdir)
        except OSError as exc:
            print(f"egress: cannot read the bottle CA in {args.ca_dir}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        upstream_ca = args.upstream_ca if args.upstream_ca.is_file() else None
        try:
            asyncio.run(run_proxy(config, secrets, confdir, upstream_ca, pipelock_token))
        except KeyboardInterrupt:
            pass
        except RuntimeError as exc:
            print(f"egress: {exc}", file=sys.stderr)
            return 2
        return 0
    finally:
        if args.confdir is None:
            shutil.rmtree(confdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
