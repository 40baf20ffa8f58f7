"""The guest's side of a corpus case: send wire requests through the bottle's proxy, byte for byte.

Standard library only, and no imports from the project: the live transport runs this file in the
guest with ``python3 -c``. There it reads ``{"wires": [...], "timeout": s}`` on stdin, takes the
proxy from HTTPS_PROXY and the trust store from the guest (SSL_CERT_FILE), and prints one JSON
list of exchanges per wire. The local transport imports it and calls perform().

https goes through a CONNECT tunnel (TLS to the bottle CA); http is sent in absolute form to the
proxy. Requests are written by hand, not by http.client, so header names, duplicate headers,
trailers and targets reach the proxy exactly as the case wrote them. Errors are reported by
exception type only: a message could quote a host name that carries a secret.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.parse

REDIRECTS = (301, 302, 303, 307, 308)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------------------------------------
# WebSocket frames (RFC 6455), shared with the fake upstream


def encode_frame(payload: bytes, opcode: int = 1, *, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(stream) -> tuple[int, bytes]:
    """(opcode, payload) of the next whole message; continuation frames are joined. EOFError at end."""
    opcode, payload = None, b""
    while True:
        head = _read_exact(stream, 2)
        fin, code, masked, length = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", _read_exact(stream, 2))[0]
        elif length == 127:
            length = struct.unpack("!Q", _read_exact(stream, 8))[0]
        key = _read_exact(stream, 4) if masked else b""
        data = _read_exact(stream, length)
        if masked:
            data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
        if code >= 8:  # control frames come whole, even between fragments
            return code, data
        opcode = code if opcode is None else opcode
        payload += data
        if fin:
            return opcode, payload


def _read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def websocket_accept(key: str) -> str:
    import hashlib

    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


# ---------------------------------------------------------------------------------------------
# requests


def perform(wire: dict, proxy: tuple[str, int], context: ssl.SSLContext, timeout: float = 15.0,
            http2_context: ssl.SSLContext | None = None) -> list[dict]:
    """Send one wire request (following redirects when it asks to); one exchange per hop.
    http2_context: a context offering ALPN h2, for wires that ask for HTTP/2."""
    exchanges = []
    for _ in range(4):
        exchange = _exchange(wire, proxy, http2_context if wire.get("http2") else context, timeout)
        exchanges.append(exchange)
        location = _header(exchange["headers"], "location")
        if not (wire.get("follow_redirects") and exchange["status"] in REDIRECTS and location):
            break
        wire = _redirected(wire, location)
    return exchanges


def _exchange(wire: dict, proxy: tuple[str, int], context: ssl.SSLContext, timeout: float) -> dict:
    exchange = {"status": None, "headers": [], "body_b64": "", "error": "", "ws_received": [],
                "url": f"{wire['scheme']}://{_authority(wire['host'], wire['port'], wire['scheme'])}"}
    sock = None
    try:
        sock = socket.create_connection(proxy, timeout=timeout)
        if wire["scheme"] == "https":
            authority = wire.get("connect") or f"{_bracket(wire['host'])}:{wire['port']}"
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            refused = _connect_refusal(sock)
            if refused is not None:
                exchange.update(refused)
                return exchange
            sni = wire.get("sni")
            server_name = wire["host"] if sni is None else (sni or None)
            sock = _tls_context(context, server_name).wrap_socket(sock, server_hostname=server_name)
            if wire.get("http2"):
                exchange.update(_http2_exchange(sock, wire))
                return exchange
            target = wire["target"]
        else:
            target = f"http://{_authority(wire['host'], wire['port'], 'http')}{wire['target']}"
        ws_key = base64.b64encode(os.urandom(16)).decode() if wire.get("websocket") is not None else ""
        sock.sendall(_request_bytes(wire, target, ws_key))
        response = http.client.HTTPResponse(sock, method=wire["method"])
        response.begin()
        exchange["status"] = response.status
        exchange["headers"] = [[k, v] for k, v in response.getheaders()]
        if response.status == 101 and ws_key:
            exchange["ws_received"] = _websocket(sock, response.fp, wire["websocket"])
        else:
            exchange["body_b64"] = base64.b64encode(response.read()).decode()
    except (OSError, EOFError, http.client.HTTPException, ValueError) as exc:
        exchange["error"] = type(exc).__name__
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    return exchange


def _tls_context(context: ssl.SSLContext, server_name: str | None) -> ssl.SSLContext:
    """The given context, or one that skips name checks where the case sends no name or an IP."""
    if server_name and not _is_ip(server_name):
        return context
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    return loose


def _connect_refusal(sock: socket.socket) -> dict | None:
    """None when the tunnel is open, else the proxy's answer as an exchange."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError("proxy closed the connection")
        head += chunk
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if status == 200:
        return None
    headers = [line.split(": ", 1) for line in lines[1:] if ": " in line]
    length = int(_header(headers, "content-length") or 0)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return {"status": status, "headers": headers, "body_b64": base64.b64encode(body).decode()}


def _request_bytes(wire: dict, target: str, ws_key: str) -> bytes:
    headers = [list(pair) for pair in wire["headers"]]
    names = {name.lower() for name, _ in headers}
    if "host" not in names:
        headers.insert(0, ["Host", _authority(wire["host"], wire["port"], wire["scheme"])])
    if ws_key:
        headers += [["Connection", "Upgrade"], ["Upgrade", "websocket"], ["Sec-WebSocket-Version", "13"],
                    ["Sec-WebSocket-Key", ws_key]]
    body = base64.b64decode(wire.get("body_b64", ""))
    trailers = wire.get("trailers") or []
    if trailers:
        headers.append(["Transfer-Encoding", "chunked"])
        headers.append(["Trailer", ", ".join(name for name, _ in trailers)])
        chunked = (f"{len(body):x}\r\n".encode() + body + b"\r\n") if body else b""
        tail = "".join(f"{name}: {value}\r\n" for name, value in trailers)
        body = chunked + b"0\r\n" + tail.encode() + b"\r\n"
    elif body or wire["method"] in ("POST", "PUT", "PATCH"):
        if "content-length" not in names:
            headers.append(["Content-Length", str(len(body))])
    head = f"{wire['method']} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8") + body


def _http2_exchange(sock: ssl.SSLSocket, wire: dict) -> dict:
    """One HTTP/2 request, trailers included (HTTP/1 trailers stop mitmproxy: NotImplementedError).
    Needs the h2 package: the local transport has it (mitmproxy's), the guest does not."""
    import h2.config
    import h2.connection
    import h2.events

    if sock.selected_alpn_protocol() != "h2":
        raise ValueError("the proxy did not negotiate h2")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    body = base64.b64decode(wire.get("body_b64", ""))
    trailers = [(k.lower(), v) for k, v in wire.get("trailers") or []]
    headers = [(":method", wire["method"]), (":scheme", "https"),
               (":authority", _authority(wire["host"], wire["port"], "https")), (":path", wire["target"])]
    headers += [(k.lower(), v) for k, v in wire["headers"] if k.lower() not in ("host", "connection")]
    conn.send_headers(stream, headers, end_stream=not body and not trailers)
    if body:
        conn.send_data(stream, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(stream, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    result = {"status": None, "headers": [], "body_b64": ""}
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                pairs = [(str(k), str(v)) for k, v in event.headers]
                result["status"] = int(dict(pairs)[":status"])
                result["headers"] = [[k, v] for k, v in pairs if not k.startswith(":")]
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                result["body_b64"] = base64.b64encode(data).decode()
                return result
        sock.sendall(conn.data_to_send())


def _websocket(sock: socket.socket, stream, spec: dict) -> list[str]:
    opcode = 2 if spec.get("binary") else 1
    for message in spec.get("send", []):
        sock.sendall(encode_frame(message.encode(), opcode, mask=True))
    received: list[str] = []
    sock.settimeout(3.0)
    try:
        while len(received) < spec.get("receive", 0):
            code, payload = read_frame(stream)
            if code == 8:
                break
            if code in (1, 2):
                received.append(payload.decode("utf-8", "replace"))
        sock.sendall(encode_frame(b"\x03\xe8", 8, mask=True))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            code, _ = read_frame(stream)
            if code == 8:
                break
    except (OSError, EOFError):
        pass  # a proxy that kills the connection ends the conversation: what arrived is the result
    return received


def _redirected(wire: dict, location: str) -> dict:
    current = f"{wire['scheme']}://{_authority(wire['host'], wire['port'], wire['scheme'])}{wire['target']}"
    url = urllib.parse.urljoin(current, location)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme if parts.scheme in ("http", "https") else "http"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return {**wire, "method": "GET", "scheme": scheme, "host": parts.hostname or "",
            "port": parts.port or (443 if scheme == "https" else 80), "target": target, "headers": [],
            "body_b64": "", "trailers": [], "connect": "", "sni": None, "websocket": None}


def _header(headers: list, name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _authority(host: str, port: int, scheme: str) -> str:
    default = 443 if scheme == "https" else 80
    return _bracket(host) if port == default else f"{_bracket(host)}:{port}"


def proxy_from_env(environ=os.environ) -> tuple[str, int]:
    url = environ.get("HTTPS_PROXY") or environ.get("https_proxy") or environ.get("HTTP_PROXY") or ""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        raise SystemExit("corpus client: no HTTPS_PROXY in the environment")
    return parts.hostname, parts.port or 8080


def main() -> int:
    job = json.load(sys.stdin)
    proxy = proxy_from_env()
    context = ssl.create_default_context()  # the guest's store: the bottle CA is in it
    results = [perform(wire, proxy, context, job.get("timeout", 15.0)) for wire in job["wires"]]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
