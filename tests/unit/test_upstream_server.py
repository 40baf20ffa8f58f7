"""The integration tests' stand-in upstream (tests/integration/upstream/server.py), run as its image
runs it but as a subprocess on 127.0.0.1 with free ports and a throwaway certificate: the corpus's
response document, server-sent events, WebSocket, chunked bodies, and the answers the other
integration tests rely on (echo, Messages API, bulk bytes, git auth, TCP banner, UDP)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http.client import HTTPResponse
from pathlib import Path

import pytest

from tests.corpus.client import encode_frame, read_frame
from tests.corpus.live import RESPONSE_FILE, LiveTransport
from tests.corpus.cases import load_site
from tests.integration.certs import mint_upstream_certs

SERVER = Path(__file__).resolve().parents[1] / "integration" / "upstream" / "server.py"
NAME = "upstream.test"
# RFC 6455 section 1.3's example handshake.
RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


class RunningUpstream:
    def __init__(self, tmp: Path):
        ca, cert, key = mint_upstream_certs(tmp / "certs", [NAME])
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.response_file = tmp / "corpus-response.json"
        self.git_token = secrets.token_hex(12)
        env = {**os.environ, "UPSTREAM_LISTEN": "127.0.0.1", "UPSTREAM_RESPONSE_FILE": str(self.response_file),
               "UPSTREAM_GIT_TOKEN": self.git_token,
               **{f"UPSTREAM_{name}_PORT": "0" for name in ("HTTPS", "HTTP", "UDP", "TCP")}}
        self.proc = subprocess.Popen([sys.executable, "-u", str(SERVER), str(cert), str(key)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.log: list[dict] = []
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        ready = self.wait_for(lambda r: r.get("event") == "ready")
        self.ports = ready["ports"]

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self.log.append(json.loads(line))

    def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((r for r in list(self.log) if predicate(r)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no such log line in {self.log}")

    def request_record(self, path: str) -> dict:
        return self.wait_for(lambda r: r.get("event") == "request" and r.get("path") == path)

    def serve(self, document: dict | None) -> None:
        """As the corpus test does before each case (docker exec ... cat > RESPONSE_FILE)."""
        self.response_file.write_text("" if document is None else json.dumps(document))

    def connect(self, scheme: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports[scheme]), timeout=10)
        return self.tls.wrap_socket(sock, server_hostname=NAME) if scheme == "https" else sock

    def send(self, method: str, path: str, *, scheme: str = "https", headers=(), body: bytes = b""):
        with self.connect(scheme) as sock:
            return exchange(sock, request_bytes(method, path, headers, body), method)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(5)  # it ends at the pipe's end
        self.proc.stdout.close()


def request_bytes(method: str, path: str, headers=(), body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {NAME}", *(f"{k}: {v}" for k, v in headers)]
    if body and not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(sock: socket.socket, raw: bytes, method: str = "GET") -> tuple[int, dict, bytes]:
    sock.sendall(raw)
    response = HTTPResponse(sock, method=method)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    running = RunningUpstream(tmp_path_factory.mktemp("upstream"))
    yield running
    running.close()


@pytest.fixture(autouse=True)
def no_document(upstream):
    upstream.response_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the corpus's response document


def test_a_configured_answer_goes_to_the_first_request_only_whatever_its_path(upstream):
    body = os.urandom(48)  # not UTF-8: served byte for byte
    tag = secrets.token_hex(8)
    upstream.serve({"status": 418, "headers": [["X-Case", tag], ["Content-Type", "application/x-case"]],
                    "body_b64": b64(body), "sse_b64": None, "websocket": []})
    # the Messages API stand-in's own path: the document still wins for the first request
    status, headers, got = upstream.send("POST", "/v1/messages", body=b'{"messages": []}')
    assert (status, headers["x-case"], headers["content-length"], got) == (418, tag, str(len(body)), body)
    assert not upstream.response_file.exists()
    # the next request, even on the other port, gets the ordinary answer
    status, _, echoed = upstream.send("POST", "/v1/messages", scheme="http", body=b'{"messages": []}')
    assert status == 200 and json.loads(echoed)["content"][0]["text"] == "hello from the stand-in messages api"
    # The server logs a request after answering it: wait for both lines, not just the answers.
    upstream.wait_for(lambda r: len([x for x in upstream.log if x.get("path") == "/v1/messages"]) >= 2)
    first, second = [r for r in upstream.log if r.get("path") == "/v1/messages"]
    assert (first["served_status"], first["served_b64"], first["scheme"]) == (418, b64(body), "https")
    assert (second["served_status"], second["served_b64"], second["scheme"]) == (200, b64(echoed), "http")


def test_an_empty_document_means_the_ordinary_echo(upstream):
    upstream.serve(None)
    status, _, got = upstream.send("GET", "/empty-doc")
    assert status == 200 and json.loads(got)["path"] == "/empty-doc"
    assert upstream.request_record("/empty-doc")["served_b64"] == b64(got)


def test_server_sent_events_stream_without_a_length_then_close(upstream):
    events = [b"data: {\"progress\": %d}" % n for n in (10, 60, 100)] + [b"event: done\ndata: " + os.urandom(8).hex().encode()]
    upstream.serve({"status": 200, "headers": [["Content-Type", "text/event-stream"]], "body_b64": "",
                    "sse_b64": [b64(e) for e in events], "websocket": []})
    with upstream.connect("https") as sock:
        status, headers, got = exchange(sock, request_bytes("GET", "/events"))
        assert sock.recv(1) == b""  # the server closed: the stream's end is the connection's end
    wanted = b"".join(e + b"\n\n" for e in events)
    assert (status, got) == (200, wanted)
    assert "content-length" not in headers and "transfer-encoding" not in headers
    assert upstream.request_record("/events")["served_b64"] == b64(wanted)


# ---------------------------------------------------------------------------------------------
# WebSocket


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame that may be a fragment (client.encode_frame always sets FIN)."""
    frame = bytearray(encode_frame(payload, opcode, mask=True))
    if not fin:
        frame[0] &= 0x7F
    return bytes(frame)


def open_websocket(upstream, path: str, scheme: str):
    sock = upstream.connect(scheme)
    sock.sendall(request_bytes("GET", path, [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                             ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", RFC_KEY)]))
    response = HTTPResponse(sock, method="GET")
    response.begin()
    return sock, response


def test_a_websocket_gets_the_configured_messages_and_every_client_message_is_logged(upstream):
    served = ["welcome", f"build {secrets.token_hex(6)} is green"]
    upstream.serve({"status": 200, "headers": [], "body_b64": "", "sse_b64": None, "websocket": served})
    sock, response = open_websocket(upstream, "/live", "https")
    with sock:
        assert response.status == 101 and response.getheader("Sec-WebSocket-Accept") == RFC_ACCEPT
        assert [read_frame(response.fp) for _ in served] == [(1, m.encode()) for m in served]
        big = secrets.token_hex(35_000)  # 70 kB: the 64-bit length form
        ping = os.urandom(4)
        sock.sendall(encode_frame(b"hello", 1, mask=True)
                     + masked_frame(1, b"frag-", fin=False) + masked_frame(9, ping)  # a ping between fragments
                     + masked_frame(0, b"men", fin=False) + masked_frame(0, b"t")
                     + encode_frame(b"\x00binary", 2, mask=True) + encode_frame(big.encode(), 1, mask=True)
                     + encode_frame(struct.pack("!H", 1000), 8, mask=True))
        assert read_frame(response.fp) == (10, ping)
        assert read_frame(response.fp) == (8, struct.pack("!H", 1000))
    upstream.wait_for(lambda r: r.get("event") == "ws" and r.get("message") == big)
    logged = [r["message"] for r in upstream.log if r.get("event") == "ws" and r.get("path") == "/live"]
    assert logged == ["hello", "frag-ment", "\x00binary", big]
    record = upstream.request_record("/live")
    assert record["served_status"] == 101 and base64.b64decode(record["served_b64"]).decode() == "\n".join(served)
    # the request line comes before its messages: the live transport gives messages to the last request
    assert upstream.log.index(record) < next(i for i, r in enumerate(upstream.log) if r.get("message") == "hello")


def test_a_websocket_on_any_path_without_a_document_is_answered_and_closed(upstream):
    sock, response = open_websocket(upstream, "/v1/messages?ws=1", "http")
    with sock:
        assert response.status == 101 and response.getheader("Sec-WebSocket-Accept") == RFC_ACCEPT
        sock.sendall(encode_frame(b"anyone there", 1, mask=True) + encode_frame(b"", 8, mask=True))
        assert read_frame(response.fp)[0] == 8  # no configured message comes first: the close does
    upstream.wait_for(lambda r: r.get("event") == "ws" and r.get("path") == "/v1/messages?ws=1"
                      and r.get("message") == "anyone there")


# ---------------------------------------------------------------------------------------------
# request bodies


def test_a_chunked_body_is_read_whole_with_its_trailers_and_the_connection_stays_usable(upstream):
    pieces = [b"hello ", os.urandom(40), b"world"]
    chunked = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\nX-Trailer: t1\r\n\r\n"
    with upstream.connect("https") as sock:
        status, _, got = exchange(sock, request_bytes("POST", "/chunked", [("Transfer-Encoding", "chunked")], chunked),
                                  "POST")
        again, _, _ = exchange(sock, request_bytes("GET", "/after-chunked"))
    body = b"".join(pieces)
    assert status == 200 and json.loads(got)["body"] == body.decode("utf-8", "replace")
    record = upstream.request_record("/chunked")
    assert base64.b64decode(record["body_b64"]) == body and record["trailers"] == [["X-Trailer", "t1"]]
    assert again == 200 and upstream.request_record("/after-chunked")


def test_a_body_is_logged_raw_beside_the_text_the_other_tests_read(upstream):
    body = b"key=" + os.urandom(16)
    upstream.send("PUT", "/raw", headers=[("X-Probe", "p")], body=body)
    record = upstream.request_record("/raw")
    assert base64.b64decode(record["body_b64"]) == body
    assert record["body"] == body.decode("utf-8", "replace") and record["headers"]["X-Probe"] == "p"


# ---------------------------------------------------------------------------------------------
# what the other integration tests rely on


def messages_request(content: str, stream: bool = False) -> bytes:
    return json.dumps({"model": "claude-x", "stream": stream, "messages": [{"role": "user", "content": content}]}).encode()


def test_the_messages_stand_in_answers_text_a_bash_call_and_a_stream(upstream):
    command = f"echo {secrets.token_hex(4)}"
    _, _, plain = upstream.send("POST", "/v1/messages", body=messages_request("hi"))
    _, _, tool = upstream.send("POST", "/v1/messages", body=messages_request(f"please RUN_BASH: {command}"))
    status, headers, streamed = upstream.send("POST", "/v1/messages", body=messages_request("hi", stream=True))
    assert json.loads(plain)["content"][0]["text"] == "hello from the stand-in messages api"
    block = json.loads(tool)["content"][0]
    assert (block["type"], block["input"]["command"], json.loads(tool)["stop_reason"]) == ("tool_use", command, "tool_use")
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert streamed.startswith(b"event: message_start\n") and streamed.endswith(b"event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n")
    assert json.loads(streamed.split(b"\n")[1][len(b"data: "):])["message"]["model"] == "claude-x"


def test_bulk_bytes_head_git_auth_tcp_and_udp_answer_as_before(upstream):
    status, headers, got = upstream.send("GET", "/bytes/150000")
    assert (status, got) == (200, b"x" * 150000)
    assert "served_b64" not in upstream.request_record("/bytes/150000")  # never held in full, never logged
    with upstream.connect("http") as sock:  # HEAD: the headers of a GET, and not one byte after them
        sock.sendall(request_bytes("HEAD", "/head"))
        received = b""
        sock.settimeout(0.5)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    head, _, after = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and after == b""
    assert upstream.request_record("/head")["served_b64"] == ""
    status, headers, _ = upstream.send("GET", "/git/repo.git/info/refs",
                                       headers=[("Authorization", "Basic " + b64(b"x-access-token:wrong"))])
    assert status == 401 and "basic" in headers["www-authenticate"].lower()
    assert upstream.wait_for(lambda r: r.get("event") == "git")["authorized"] is False
    with socket.create_connection(("127.0.0.1", upstream.ports["tcp"]), timeout=5) as tcp:
        assert tcp.recv(100) == b"upstream-tcp-banner\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"ping", ("127.0.0.1", upstream.ports["udp"]))
        assert udp.recv(100) == b"upstream-udp:ping"


# ---------------------------------------------------------------------------------------------
# the live transport's side


def test_the_live_transport_reads_what_the_server_logs(upstream):
    served = os.urandom(20)
    upstream.serve({"status": 201, "headers": [], "body_b64": b64(served), "sse_b64": None, "websocket": []})
    sent = b"secret-shaped " + os.urandom(10)
    upstream.send("POST", "/live-a", body=sent)
    sock, response = open_websocket(upstream, "/live-ws", "https")
    with sock:
        sock.sendall(encode_frame(b"from the guest", 1, mask=True) + encode_frame(b"", 8, mask=True))
        read_frame(response.fp)
    upstream.wait_for(lambda r: r.get("path") == "/live-ws" and r.get("event") == "ws")
    records = [r for r in upstream.log if r.get("path") in ("/live-a", "/live-ws")]
    first, ws = LiveTransport(None, load_site(), lambda d: None, mode="floor")._arrivals(records)
    assert (first.body, first.served_status, first.served_body) == (sent, 201, served)
    assert (ws.served_status, ws.ws_messages) == (101, ["from the guest"])


def test_the_server_reads_the_response_file_the_live_transport_names(monkeypatch):
    monkeypatch.delenv("UPSTREAM_RESPONSE_FILE", raising=False)
    spec = importlib.util.spec_from_file_location("upstream_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.RESPONSE_FILE == RESPONSE_FILE
    assert (module.LISTEN, module.DEFAULT_PORTS) == ("0.0.0.0", {"https": 443, "http": 80, "udp": 5353, "tcp": 7000})
