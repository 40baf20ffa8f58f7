"""Fake upstream for the isolation, token, DLP and real-client tests. Standard library only.

Every HTTP request is logged as one JSON line on stdout, headers included, so a test can prove
what arrived upstream (the real token) and what did not (a blocked secret).
"""

import base64
import json
import os
import re
import socket
import subprocess
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGE_TEXT = "hello from the stand-in messages api"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle each response would wait for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # our own JSON log instead
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _log(self, body: bytes) -> None:
        print(json.dumps({"event": "request", "scheme": self.server.scheme, "method": self.command,
                          "path": self.path, "headers": dict(self.headers.items()),
                          "body": body[:1_000_000].decode("utf-8", "replace")}), flush=True)

    def _send(self, status: int, payload: bytes, ctype: str = "application/json", extra=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        if self.path.startswith("/git/"):
            return self._git()
        body = self._body()
        self._log(body)
        if self.path.startswith("/v1/messages") and self.command == "POST":
            return self._messages(body)
        if self.path.startswith("/bytes/"):
            return self._bytes(int(self.path.split("/")[2]))
        echo = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                "body": body.decode("utf-8", "replace")}
        self._send(200, json.dumps(echo).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    def _git(self) -> None:
        """git smart HTTP (git http-backend as CGI) behind basic auth with UPSTREAM_GIT_TOKEN."""
        body = self._body()
        auth = self.headers.get("Authorization", "")
        expected = base64.b64encode(f"x-access-token:{os.environ.get('UPSTREAM_GIT_TOKEN', '')}".encode()).decode()
        print(json.dumps({"event": "git", "method": self.command, "path": self.path,
                          "authorized": auth == f"Basic {expected}"}), flush=True)
        if auth != f"Basic {expected}":
            return self._send(401, b"auth required\n", "text/plain", {"WWW-Authenticate": 'Basic realm="git"'})
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
        self._send(status, payload, ctype, headers)

    def _bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"x" * 65536
        while n > 0:
            self.wfile.write(chunk[: min(n, len(chunk))])
            n -= len(chunk)

    def _messages(self, body: bytes) -> None:
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
            return self._send(200, json.dumps(message).encode())
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
        self._send(200, payload, "text/event-stream", {"Cache-Control": "no-cache"})


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


def serve_http(port: int, scheme: str, context=None) -> None:
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.scheme = scheme
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


class TcpBanner(socketserver.BaseRequestHandler):
    def handle(self):
        print(json.dumps({"event": "tcp", "peer": self.client_address[0]}), flush=True)
        self.request.sendall(b"upstream-tcp-banner\n")


def serve_udp(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(2048)
        print(json.dumps({"event": "udp", "peer": peer[0]}), flush=True)
        sock.sendto(b"upstream-udp:" + data, peer)


def main() -> None:
    cert, key = sys.argv[1], sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    threads = [
        threading.Thread(target=serve_http, args=(443, "https", ctx), daemon=True),
        threading.Thread(target=serve_http, args=(80, "http"), daemon=True),
        threading.Thread(target=serve_udp, args=(5353,), daemon=True),
    ]
    tcp = socketserver.ThreadingTCPServer(("0.0.0.0", 7000), TcpBanner)
    tcp.daemon_threads = True
    threads.append(threading.Thread(target=tcp.serve_forever, daemon=True))
    for t in threads:
        t.start()
    print(json.dumps({"event": "ready"}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
