"""egress: the bundle's only front door, a mitmproxy (11.x) addon plus its launcher.

    python -m bottle_tasks.sidecars.egress --routes /etc/bottle/routes.yaml --ca-dir /etc/bottle/ca

Implements "Egress decisions, in order" from docs/bundle-contract.md:

1. CONNECT / plain request to an unrouted host          -> 403 route_not_allowed
2. ClientHello without SNI / SNI != CONNECT host        -> connection killed, sni_missing / sni_mismatch
3. inner request Host != CONNECT authority              -> 403 authority_mismatch
4. method / path outside the route                      -> 403 method_not_allowed / path_not_allowed
5. host resolving to a non-global address               -> 403 private_address (unless private_network)
6. DLP on URL, headers, body, before any token is filled -> 403 dlp_match (dlp_unavailable if pipelock fails)
7. credentialed route over plain HTTP                   -> 403 token_requires_tls
8. token slot header set to ``format`` with the real value; the real value is replaced by the
   placeholder in response headers and bodies.

Beyond the list, fail-closed extras: raw TCP inside a tunnel is refused (``tcp_not_allowed``),
WebSocket messages from the guest go through the built-in DLP patterns, and in direct mode a
server connection the request hook did not check is refused (``destination_unchecked``).

Token values come from the environment (names from routes.yaml) and are never logged: every log
line also passes through a scrubber that replaces them with their placeholders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, TextIO

from mitmproxy import connection, http, tcp, tls, websocket
from mitmproxy.proxy import server_hooks

from bottle_tasks.contract import Route, TokenSlot, normalize_host
from bottle_tasks.sidecars import dlp
from bottle_tasks.sidecars.addresses import is_public_address, resolve_host
from bottle_tasks.sidecars.configfile import PIPELOCK_TOKEN_ENV, pipelock_scan_token
from bottle_tasks.sidecars.routes import RoutesConfig, RoutesError, load_routes
from bottle_tasks.sidecars.scrub import SecretScrubber

BLOCK_HEADER = "X-Bottle-Block-Reason"
DEFAULT_UPSTREAM_CA = "/etc/bottle/upstream-ca.pem"
DEFAULT_PIPELOCK_CONFIG = "/etc/bottle/pipelock.yaml"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Responses up to this size (with a Content-Length) are buffered and redacted whole; larger or
# length-less ones (server-sent events) are streamed and redacted chunk by chunk.
BUFFER_LIMIT = 8 << 20

Resolver = Callable[[str, int], Awaitable[list[str]]]
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Block:
    reason: str
    detail: str
    status: int = 403
    pattern: str = ""
    where: str = ""


# ---------------------------------------------------------------------------------------------
# logs


def json_line_emitter(out: TextIO, scrubber: SecretScrubber) -> Emit:
    def emit(record: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **record}, ensure_ascii=True, sort_keys=False)
        out.write(scrubber.text(line) + "\n")  # belt and braces: no token value ever reaches a log
        out.flush()

    return emit


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
        pipelock: dlp.PipelockScanner | None = None,
        resolve: Resolver = resolve_host,
        dial_directly: bool | None = None,
    ):
        missing = [slot.env for slot in config.token_slots() if not secrets.get(slot.env)]
        if missing:
            raise ValueError(f"token env vars not set: {', '.join(sorted(set(missing)))}")
        self.config = config
        self.secrets = {slot.env: secrets[slot.env] for slot in config.token_slots()}
        self.scrubber = SecretScrubber.placeholders({secrets[slot.env]: slot.placeholder for slot in config.token_slots()})
        self.emit = emit or json_line_emitter(sys.stdout, self.scrubber)
        self.pipelock = pipelock
        self.resolve = resolve
        # Upstream mode: pipelock dials, so there is no connection of ours to pin.
        self.dial_directly = (config.upstream_proxy == "") if dial_directly is None else dial_directly
        self._tunnels: dict[str, tuple[str, int]] = {}  # client id -> CONNECT authority
        self._refused_tls: set[str] = set()  # client ids whose ClientHello failed the SNI check
        self._pins: dict[tuple[str, int], str] = {}  # (host, port) -> the IP the request hook checked
        self._pinned_servers: dict[str, tuple[str, int]] = {}  # server id -> address before pinning

    # -- logging ------------------------------------------------------------------------------

    def log(self, event: str, *, reason: str = "", method: str = "", host: str = "", path: str = "",
            pattern: str = "", where: str = "") -> None:
        # The query string is dropped and DLP patterns redacted: a URL can carry the very secret
        # that was blocked. Header values and bodies are never passed in.
        safe_path = dlp.redact(path.split("?", 1)[0])
        self.emit({"event": event, "reason": reason, "method": method, "host": dlp.redact(host),
                   "path": safe_path, "pattern": pattern, "where": where})

    def block(self, flow: http.HTTPFlow, block: Block, host: str) -> None:
        body = f"claude-bottle egress blocked this request: {block.reason} ({block.detail})\n"
        flow.response = http.Response.make(
            block.status,
            self.scrubber.text(body),
            {"Content-Type": "text/plain; charset=utf-8", BLOCK_HEADER: block.reason},
        )
        self.log("block", reason=block.reason, method=flow.request.method, host=host,
                 path=flow.request.path, pattern=block.pattern, where=block.where)

    # -- decision 1: CONNECT ------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        host, port = normalize_host(flow.request.host), flow.request.port
        if self.config.route_for(host) is None:
            self.block(flow, Block("route_not_allowed", f"no route for {host}"), host)
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

        route = self.config.route_for(host)
        if route is None:
            return self.block(flow, Block("route_not_allowed", f"no route for {host}"), host)
        if tunnel is not None and not self._authority_matches(req, host, port):
            return self.block(flow, Block("authority_mismatch", "Host differs from the CONNECT authority"), host)
        if not route.allows_method(req.method):
            return self.block(flow, Block("method_not_allowed", f"{req.method} not allowed for {host}"), host)
        if not route.allows_path(req.path):
            return self.block(flow, Block("path_not_allowed", f"path not allowed for {host}"), host)

        pinned_ip, problem = await self._check_destination(route, host, port)
        if problem is not None:
            return self.block(flow, problem, host)

        problem = await self._scan(flow)
        if problem is not None:
            return self.block(flow, problem, host)

        if route.token is not None:
            if req.scheme != "https":
                return self.block(flow, Block("token_requires_tls", f"{host} carries a token; use https"), host)
            self._fill_token(req, route.token)

        if self.dial_directly and pinned_ip:
            self._pins[(host, port)] = pinned_ip
        self.log("allow", method=req.method, host=host, path=req.path)

    def _authority_matches(self, req: http.Request, host: str, port: int) -> bool:
        if normalize_host(req.host) != host or req.port != port:
            return False
        header = req.host_header
        if not header:
            return False
        try:
            header_host, header_port = _split_authority(header, _DEFAULT_PORTS.get(req.scheme, port))
        except ValueError:
            return False
        return header_host == host and header_port == port

    async def _check_destination(self, route: Route, host: str, port: int) -> tuple[str, Block | None]:
        addresses = await self.resolve(host, port)
        if not addresses:
            return "", Block("dns_unresolvable", f"{host} does not resolve", status=502)
        if not route.private_network:
            for ip in addresses:
                if not is_public_address(ip):
                    return "", Block("private_address", f"{host} resolves to non-global address {ip}")
        return addresses[0], None

    async def _scan(self, flow: http.HTTPFlow) -> Block | None:
        req = flow.request
        try:
            body = req.get_content(strict=True) or b""
        except ValueError:
            return Block("dlp_unavailable", "request body has an encoding DLP cannot read")
        parts = dlp.RequestParts(
            url=f"{req.host}{req.path}",
            headers=tuple((k, v) for k, v in req.headers.items(multi=True)),
            body=dlp.body_text(body),
        )
        matches = dlp.scan_request(parts)
        if not matches and self.pipelock is not None:
            try:
                matches, advisories = await asyncio.to_thread(self.pipelock.scan, parts)
            except dlp.DlpUnavailable as exc:
                return Block("dlp_unavailable", str(exc))
            for rule in advisories:
                self.log("dlp_advisory", reason="pipelock_url_finding", method=req.method,
                         host=req.host, path=req.path, pattern=f"pipelock:{rule}", where="request")
        if matches:
            first = matches[0]
            return Block("dlp_match", f"pattern {first.pattern} in {first.where}",
                         pattern=first.pattern, where=first.where)
        return None

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

    # -- responses: reflected tokens -----------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        if not self.scrubber:
            response.stream = True   # no token to redact: pass bytes through as they arrive
            return
        fields = response.headers.fields
        if any(self.scrubber.data(k + b"\0" + v) != k + b"\0" + v for k, v in fields):
            response.headers.fields = tuple((self.scrubber.data(k), self.scrubber.data(v)) for k, v in fields)

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

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not self.scrubber or response.stream:
            return
        content = response.get_content(strict=False)
        if content:
            redacted = self.scrubber.data(content)
            if redacted != content:
                response.content = redacted

    # -- other protocols -----------------------------------------------------------------------

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Raw TCP would bypass DLP and token rules; rawtcp=False makes this rare, this makes it never.
        flow.server_conn.error = "tcp_not_allowed"  # checked by mitmproxy before it dials
        if flow.killable:
            flow.kill()
        address = flow.server_conn.address
        self.log("block", reason="tcp_not_allowed", host=str(address[0]) if address else "", where="tcp")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if message.from_client:
            text = message.content.decode("utf-8", errors="replace")
            matches = dlp.scan_text(text, "websocket")
            if matches:
                message.drop()
                if flow.killable:
                    flow.kill()
                self.log("block", reason="dlp_match", method="WEBSOCKET", host=flow.request.host,
                         path=flow.request.path, pattern=matches[0].pattern, where="websocket")
        elif self.scrubber:
            message.content = self.scrubber.data(message.content)


def _content_length(response: http.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    authority = authority.strip()
    if authority.startswith("["):  # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, ""
    return normalize_host(host), int(port_text) if port_text else default_port


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
    pipelock = dlp.PipelockScanner(config.pipelock_scan_url, pipelock_token) if config.pipelock_scan_url else None
    addon = Egress(config, secrets, pipelock=pipelock)
    master.addons.add(addon)  # last, so tls_start_client runs after mitmproxy's TlsConfig
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
        return 0
    finally:
        if args.confdir is None:
            shutil.rmtree(confdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
