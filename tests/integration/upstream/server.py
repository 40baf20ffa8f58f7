"""Fake upstream for the isolation, token, DLP, real-client and corpus tests. Standard library only.

Every HTTP request is logged as one JSON line on stdout, before it is answered, headers included, so
a test can prove what arrived upstream (the real token) and what did not (a blocked secret). Each
line also carries the raw body (``body_b64``) and what the server answered (``served_status``,
``served_b64``); a WebSocket adds one ``{"event": "ws"}`` line per message from the client.

For the DLP corpus (tests/corpus/live.py) the test writes a response document to RESPONSE_FILE
before each case; the next request takes it, as the local corpus upstream gives a case's response
to its first request only. Any other request gets the ordinary answer (echo, Messages API stand-in,
bulk bytes, git).

Listen address and ports come from UPSTREAM_LISTEN and UPSTREAM_<NAME>_PORT (0 = any free port);
the ``ready`` line reports the ports bound.
"""

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import socketserver
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGE_TEXT = "hello from the stand-in messages api"
# tests/corpus/live.py's RESPONSE_FILE (this file runs alone in its image, so it cannot import it).
RESPONSE_FILE = os.environ.get("UPSTREAM_RESPONSE_FILE", "/tmp/corpus-response.json")
LISTEN = os.environ.get("UPSTREAM_LISTEN", "0.0.0.0")
DEFAULT_PORTS = {"https": 443, "http": 80, "udp": 5353, "tcp": 7000}
# Bodies larger than this are logged cut short ("body") or not at all (body_b64, served_b64): a cut
# raw body would read as one altered on the way.
LOG_BODY_LIMIT = 1_000_000
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_READ_TIMEOUT = 5.0


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


@dataclass
class Answer:
    """A response, settled before it is sent so that the request's log line can say what it was."""

    status: int
    headers: list
    body: bytes = b""
    events: list | None = None  # server-sent events: written one by one, no Content-Length, then close
    filler: int = 0  # that many bytes of "x" streamed instead of body (too large to hold or log)

    def served(self, method: str) -> bytes | None:
        """The bytes sent after the headers; None when too large to log."""
        if method == "HEAD":
            return b""
        if self.filler:
            return None
        return b"".join(event + b"\n\n" for event in self.events) if self.events is not None else self.body


class ResponseFile:
    """The corpus case's response document: taken (and removed) by the first request after the
    test wrote it. An empty file means the ordinary answer."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def take(self) -> dict | None:
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    text = handle.read()
                os.unlink(self.path)
            except FileNotFoundError:
                return None
        return json.loads(text) if text.strip() else None


def document_answer(document: dict) -> Answer:
    """{status, headers: [[k, v]], body_b64, sse_b64: [..] | null} as an Answer."""
    events = document.get("sse_b64")
    return Answer(status=int(document.get("status", 200)),
                  headers=[(name, value) for name, value in document.get("headers") or []],
                  body=base64.b64decode(document.get("body_b64") or ""),
                  events=None if events is None else [base64.b64decode(event) for event in events])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle each response would wait for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # our own JSON log instead
        pass

    def _read_body(self) -> tuple[bytes, list]:
        """The request body (Content-Length or chunked) and any trailers, as [[name, value]]."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return (self.rfile.read(length) if length else b""), []
        chunks = []
        while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after the chunk
        trailers = []
        while line := self.rfile.readline().rstrip(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append([name.strip(), value.strip()])
        return b"".join(chunks), trailers

    def _log_request(self, body: bytes, trailers: list, status: int, served: bytes | None) -> None:
        record = {"event": "request", "scheme": self.server.scheme, "method": self.command, "path": self.path,
                  "headers": dict(self.headers.items()), "body": body[:LOG_BODY_LIMIT].decode("utf-8", "replace"),
                  "trailers": trailers, "served_status": status}
        if len(body) <= LOG_BODY_LIMIT:
            record["body_b64"] = base64.b64encode(body).decode()
        if served is not None and len(served) <= LOG_BODY_LIMIT:
            record["served_b64"] = base64.b64encode(served).decode()
        log(record)

    def _write(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.events is not None:
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                for event in answer.events:
                    self.wfile.write(event + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.01)  # each event its own write, as a live stream arrives
            self.close_connection = True
            return
        self.send_header("Content-Length", str(answer.filler or len(answer.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if answer.filler:
            chunk, left = b"x" * 65536, answer.filler
            while left > 0:
                self.wfile.write(chunk[:left])
                left -= len(chunk)
        else:
            self.wfile.write(answer.body)

    def _handle(self) -> None:
        if self.path.startswith("/git/"):
            return self._git()
        body, trailers = self._read_body()
        document = self.server.responses.take()
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket(body, trailers, (document or {}).get("websocket") or [])
        if document is not None:
            answer = document_answer(document)
        elif self.path.startswith("/v1/messages") and self.command == "POST":
            answer = _messages(body)
        elif self.path.startswith("/bytes/"):
            answer = Answer(200, [("Content-Type", "application/octet-stream")], filler=int(self.path.split("/")[2]))
        else:
            echo = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                    "body": body.decode("utf-8", "replace")}
            answer = Answer(200, [("Content-Type", "application/json")], json.dumps(echo).encode())
        self._log_request(body, trailers, answer.status, answer.served(self.command))
        self._write(answer)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def _git(self) -> None:
        """git smart HTTP (git http-backend as CGI) behind basic auth with UPSTREAM_GIT_TOKEN."""
        body, _ = self._read_body()
        auth = self.headers.get("Authorization", "")
        expected = base64.b64encode(f"x-access-token:{os.environ.get('UPSTREAM_GIT_TOKEN', '')}".encode()).decode()
        log({"event": "git", "method": self.command, "path": self.path, "authorized": auth == f"Basic {expected}"})
        if auth != f"Basic {expected}":
            return self._write(Answer(401, [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Basic realm="git"')],
                                      b"auth required\n"))
        path, _, query = self.path[len("/git"):].partition("?")
        env = {**os.environ, "GIT_PROJECT_ROOT": "/srv/git", "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "agent",
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.receivepack", "GIT_CONFIG_VALUE_0": "true"}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        status = int(headers.pop("Status", "200").split()[0])
        ctype = headers.pop("Content-Type", "application/octet-stream")
        headers.pop("Content-Length", None)
        self._write(Answer(status, [("Content-Type", ctype), *headers.items()], payload))

    def _websocket(self, body: bytes, trailers: list, messages: list) -> None:
        """101, the configured messages as text frames, then each message from the client logged
        until it closes (answered with a close) or goes quiet."""
        self._log_request(body, trailers, 101, "\n".join(messages).encode())
        accept = base64.b64encode(hashlib.sha1((self.headers.get("Sec-WebSocket-Key", "") + WS_GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        for message in messages:
            self.wfile.write(ws_frame(WS_TEXT, message.encode()))
        self.wfile.flush()
        self.close_connection = True
        self.connection.settimeout(WS_READ_TIMEOUT)
        fragments, opcode = [], None
        try:
            while True:
                fin, code, payload = read_ws_frame(self.rfile)
                if code == WS_CLOSE:
                    self.wfile.write(ws_frame(WS_CLOSE, payload[:2] or struct.pack("!H", 1000)))
                    self.wfile.flush()
                    return
                if code == WS_PING:
                    self.wfile.write(ws_frame(WS_PONG, payload))
                    self.wfile.flush()
                    continue
                if code == WS_PONG:
                    continue
                if code != WS_CONTINUATION:
                    fragments, opcode = [], code
                fragments.append(payload)
                if fin and opcode in (WS_TEXT, WS_BINARY):
                    log({"event": "ws", "path": self.path, "message": b"".join(fragments).decode("utf-8", "replace")})
                    fragments, opcode = [], None
        except (OSError, EOFError):
            pass  # the client (or the proxy) hung up or went quiet: what arrived is logged


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server never masks)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return head + payload


def read_ws_frame(stream) -> tuple[bool, int, bytes]:
    """(fin, opcode, unmasked payload) of the next frame. EOFError when the stream ends."""
    first, second = _read_exact(stream, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _read_exact(stream, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _read_exact(stream, 8))
    key = _read_exact(stream, 4) if second & 0x80 else b""
    payload = _read_exact(stream, length)
    if key:
        payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    return bool(first & 0x80), first & 0x0F, payload


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:  # a buffered reader returns short only at the end of the stream
        raise EOFError("connection closed")
    return data


def _messages(body: bytes) -> Answer:
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        req = {}
    model = req.get("model", "claude-test")
    block, stop = _reply_block(req.get("messages") or [])
    message = {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
               "content": [block], "stop_reason": stop,
               "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 8}}
    if not req.get("stream"):
        return Answer(200, [("Content-Type", "application/json")], json.dumps(message).encode())
    start = dict(message, content=[], stop_reason=None, usage={"input_tokens": 10, "output_tokens": 1})
    if block["type"] == "text":
        opening, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        opening = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": opening}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 8}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    payload = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()
    return Answer(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")], payload)


def _reply_block(messages: list) -> tuple[dict, str]:
    """What the stand-in model answers. A prompt holding `RUN_BASH: <command>` gets one Bash tool
    call; the turn that carries its result gets that result echoed back as text."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = last.get("content")
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    if results:
        return {"type": "text", "text": "tool result: " + json.dumps(results[0].get("content"))[:500]}, "end_turn"
    text = " ".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
    match = re.search(r"RUN_BASH: ([^\n'\"]+)", text)
    if match:
        return {"type": "tool_use", "id": "toolu_bottle_test", "name": "Bash",
                "input": {"command": match.group(1).strip(), "description": "run the requested command"}}, "tool_use"
    return {"type": "text", "text": MESSAGE_TEXT}, "end_turn"


def http_server(port: int, scheme: str, responses: ResponseFile, context=None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((LISTEN, port), Handler)
    server.scheme = scheme
    server.responses = responses
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


class TcpBanner(socketserver.BaseRequestHandler):
    def handle(self):
        log({"event": "tcp", "peer": self.client_address[0]})
        self.request.sendall(b"upstream-tcp-banner\n")


def serve_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        log({"event": "udp", "peer": peer[0]})
        sock.sendto(b"upstream-udp:" + data, peer)


def main() -> None:
    cert, key = sys.argv[1], sys.argv[2]
    ports = {name: int(os.environ.get(f"UPSTREAM_{name.upper()}_PORT", default))
             for name, default in DEFAULT_PORTS.items()}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    responses = ResponseFile(RESPONSE_FILE)
    servers = {"https": http_server(ports["https"], "https", responses, ctx),
               "http": http_server(ports["http"], "http", responses)}
    tcp = socketserver.ThreadingTCPServer((LISTEN, ports["tcp"]), TcpBanner)
    tcp.daemon_threads = True
    servers["tcp"] = tcp
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((LISTEN, ports["udp"]))
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    bound = {name: server.server_address[1] for name, server in servers.items()}
    log({"event": "ready", "ports": {**bound, "udp": udp.getsockname()[1]}})
    threading.Event().wait()


if __name__ == "__main__":
    main()
