"""The local transport's fake upstream: HTTPS and HTTP on 127.0.0.1, recording everything that arrives.

Two of them run: the *public* one stands for every routed host, the *private* one for every
private address a case aims at (metadata service, loopback, RFC 1918). egress never dials either
by name: the harness maps the address egress checked onto one of these ports (egress_harness.py),
so an arrival at the private one means a request got to a private target.

For each case the transport sets the response its first request gets (a status, headers and body,
server-sent events, or WebSocket messages after the handshake); any other request gets a short JSON.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.corpus.cases import ServedResponse
from tests.corpus.certs import SniContexts
from tests.corpus.client import encode_frame, read_frame, websocket_accept
from tests.corpus.outcome import Arrival

DEFAULT_BODY = b'{"ok": true, "from": "corpus upstream"}'
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: "FakeUpstream", private: bool, tls: SniContexts | None):
        self.owner, self.private, self.tls = owner, private, tls
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15
    server: _Server

    def setup(self):
        if self.server.tls is not None:  # the handshake runs here, in this connection's thread
            self.request = self.server.tls.default.wrap_socket(self.request, server_side=True)
        super().setup()

    def handle(self):
        try:
            if getattr(self.request, "selected_alpn_protocol", lambda: None)() == "h2":
                self._serve_http2()
            else:
                super().handle()
        except (OSError, EOFError):
            pass  # the proxy hung up: nothing to answer

    def log_message(self, *args):
        pass

    def _handle(self):
        owner = self.server.owner
        with owner.busy():
            body, trailers = self._read_body()
            arrival = Arrival(private=self.server.private, method=self.command, path=self.path,
                              host=self.headers.get("Host", ""), headers=list(self.headers.items()),
                              body=body, trailers=trailers)
            served = owner.record(arrival)
            arrival.served_status = 101 if self._is_websocket() else served.status
            if self._is_websocket():
                return self._websocket(arrival, served)
            if served.sse is not None:
                return self._events(arrival, served)
            arrival.served_body = served.body if self.command != "HEAD" else b""
            self.send_response(served.status)
            for name, value in served.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(served.body)

    def _serve_http2(self) -> None:
        """HTTP/2 (what mitmproxy speaks upstream when the guest does): trailers arrive only this way."""
        import h2.config
        import h2.connection
        import h2.events

        owner = self.server.owner
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        self.request.sendall(conn.data_to_send())
        streams: dict[int, dict] = {}
        while chunk := self.request.recv(65536):
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.RequestReceived):
                    streams[event.stream_id] = {"headers": list(event.headers), "body": b"", "trailers": []}
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id]["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    streams[event.stream_id]["trailers"] = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
                    with owner.busy():
                        self._answer_http2(conn, event.stream_id, streams.pop(event.stream_id))
            self.request.sendall(conn.data_to_send())

    def _answer_http2(self, conn, stream_id: int, stream: dict) -> None:
        pseudo = {k: v for k, v in stream["headers"] if k.startswith(":")}
        headers = [(k, v) for k, v in stream["headers"] if not k.startswith(":")]
        arrival = Arrival(private=self.server.private, method=pseudo.get(":method", ""), path=pseudo.get(":path", ""),
                          host=pseudo.get(":authority", ""), headers=headers, body=stream["body"],
                          trailers=stream["trailers"])
        served = self.server.owner.record(arrival)
        body = b"".join(e + b"\n\n" for e in served.sse) if served.sse is not None else served.body
        arrival.served_status, arrival.served_body = served.status, body
        conn.send_headers(stream_id, [(":status", str(served.status))]
                          + [(k.lower(), v) for k, v in served.headers] + [("content-length", str(len(body)))])
        conn.send_data(stream_id, body, end_stream=True)  # small answers only: no flow-control wait

    def _read_body(self) -> tuple[bytes, list[tuple[str, str]]]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body, trailers = b"", []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            while (line := self.rfile.readline().rstrip(b"\r\n")):
                name, _, value = line.decode("latin-1").partition(":")
                trailers.append((name.strip(), value.strip()))
            return body, trailers
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else b""), []

    def _is_websocket(self) -> bool:
        return self.headers.get("Upgrade", "").lower() == "websocket"

    def _events(self, arrival: Arrival, served: ServedResponse) -> None:
        self.send_response(served.status)
        for name, value in served.headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        sent = b""
        for event in served.sse or []:
            chunk = event + b"\n\n"
            self.wfile.write(chunk)
            self.wfile.flush()
            sent += chunk
            time.sleep(0.01)
        arrival.served_body = sent
        self.close_connection = True

    def _websocket(self, arrival: Arrival, served: ServedResponse) -> None:
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket_accept(self.headers.get("Sec-WebSocket-Key", "")))
        self.end_headers()
        self.wfile.flush()
        for message in served.websocket:
            self.wfile.write(encode_frame(message.encode(), 1, mask=False))
        self.wfile.flush()
        arrival.served_body = "\n".join(served.websocket).encode()
        self.connection.settimeout(5)
        try:
            while True:
                opcode, payload = read_frame(self.rfile)
                if opcode == 8:
                    self.wfile.write(encode_frame(b"\x03\xe8", 8, mask=False))
                    break
                if opcode in (1, 2):
                    arrival.ws_messages.append(payload.decode("utf-8", "replace"))
        except (OSError, EOFError):
            pass
        self.close_connection = True


for _method in METHODS:
    setattr(_Handler, f"do_{_method}", _Handler._handle)


class FakeUpstream:
    """The public and the private fake upstream, each with an HTTPS and a plain HTTP port."""

    def __init__(self, ca_cert: Path, ca_key: Path, workdir: Path):
        self.response: ServedResponse | None = None
        self.arrivals: list[Arrival] = []
        self._lock = threading.Condition()
        self._in_flight = 0
        contexts = SniContexts(ca_cert, ca_key, workdir)
        self.servers = {(private, scheme): _Server(self, private, contexts if scheme == "https" else None)
                        for private in (False, True) for scheme in ("https", "http")}
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def port(self, *, private: bool, scheme: str) -> int:
        return self.servers[(private, scheme)].port

    def begin(self, response: ServedResponse | None) -> None:
        with self._lock:
            self.response = response
            self.arrivals = []

    def record(self, arrival: Arrival) -> ServedResponse:
        """Keep the arrival; the answer for it: the case's response for its first request (a
        redirect's target gets the default), the default answer otherwise."""
        with self._lock:
            self.arrivals.append(arrival)
            if self.response is not None and len(self.arrivals) == 1:
                return self.response
        return ServedResponse(headers=[["Content-Type", "application/json"]], body=DEFAULT_BODY)

    @contextlib.contextmanager
    def busy(self):
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def settle(self, timeout: float = 5.0) -> list[Arrival]:
        """The case's arrivals once no request is still being answered (a WebSocket still reading)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight and time.monotonic() < deadline:
                self._lock.wait(0.05)
            return list(self.arrivals)

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
