"""Readiness probes for the init supervisor: does a daemon accept TCP, answer HTTP 200, answer DNS?

Each probe answers True/False within PROBE_TIMEOUT_S and never raises. Standard library only.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import urllib.parse
from typing import Callable, Mapping

from bottle_tasks.sidecars.daemon import split_host_port

Probe = Callable[[], bool]

PROBE_TIMEOUT_S = 0.5


def dialable_host(host: str) -> str:
    """A wildcard bind address is probed through loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def tcp_accepts(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((dialable_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get_ok(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """GET url answers 200. http.client never consults *_PROXY variables, on purpose."""
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def dns_probe_query(query_id: int) -> bytes:
    """A standard query for 'bottle-probe.invalid. A' with the RD bit set."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    name = b"".join(bytes([len(label)]) + label for label in (b"bottle-probe", b"invalid"))
    return header + name + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A UDP query gets any response carrying our query id."""
    host = dialable_host(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    query_id = int.from_bytes(os.urandom(2), "big")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.send(dns_probe_query(query_id))
            reply = sock.recv(4096)
    except OSError:
        return False
    return len(reply) >= 12 and int.from_bytes(reply[:2], "big") == query_id


def probe_from_spec(spec: Mapping[str, str] | None) -> Probe | None:
    """The probe a daemon table entry names: {"tcp"|"http"|"dns": target}, or None for null.
    Raises ValueError for anything else."""
    if not spec:
        return None
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ValueError(f"a probe is one of {{\"tcp\"|\"http\"|\"dns\": target}} or null, got {spec!r}")
    (kind, target), = spec.items()
    if kind == "tcp":
        host, port = split_host_port(target)
        return lambda: tcp_accepts(host, port)
    if kind == "http":
        return lambda: http_get_ok(target)
    if kind == "dns":
        host, port = split_host_port(target)
        return lambda: dns_answers(host, port)
    raise ValueError(f"unknown probe kind {kind!r} (expected tcp, http or dns)")
