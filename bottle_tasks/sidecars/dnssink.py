"""A DNS sink: every name is NXDOMAIN, nothing is ever forwarded.

    python -m bottle_tasks.sidecars.dnssink [--listen ip:port]

Listens on UDP and TCP at ``--listen`` (``ip:port``; IPv6 as ``[::]:53``), else at
``BOTTLE_DNS_LISTEN``, else at ``0.0.0.0:53``. A guest pointed here (smolvm ``--dns``)
resolves nothing, so a name can neither leak data through the lookup nor reach an address
outside the bundle.

A well-formed standard query (QR=0, one question, no answer/authority records) gets the
question echoed back with RCODE NXDOMAIN and no records; other opcodes get NOTIMP. Anything
else is dropped without a reply, so the sink cannot be used to reflect garbage. If started
as root, it drops to nobody once its sockets are bound. Each name asked for goes into the audit
stream (``QueryLog``: once per name per minute, so a flood of lookups is a few lines, not a torrent).
Standard library only (and the package's audit writer).
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from bottle_tasks.sidecars.audit import AuditWriter
from bottle_tasks.sidecars.daemon import (
    BoundedThreadingMixIn, install_stop_handlers, split_host_port, wait_for_stop_signal,
)

DEFAULT_LISTEN = "0.0.0.0:53"
HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
FLAG_QR = 0x8000
FLAG_RD = 0x0100
FLAG_RA = 0x0080
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
MAX_TCP_CONNECTIONS = 64
TCP_IDLE_TIMEOUT_S = 10.0
NOBODY_UID = NOBODY_GID = 65534


def question_end(packet: bytes, offset: int = HEADER.size) -> int | None:
    """Offset just past the first question (name, type, class), or None if malformed.

    Compression pointers are refused: the first name of a message has nothing earlier to
    point at that is not the header.
    """
    length_of_name = 0
    while offset < len(packet):
        label_length = packet[offset]
        offset += 1
        if label_length == 0:
            end = offset + 4  # QTYPE, QCLASS
            return end if end <= len(packet) else None
        if label_length > 63:
            return None
        length_of_name += label_length + 1
        if length_of_name > 255:
            return None
        offset += label_length
    return None


def question_name(query: bytes) -> str:
    """The first question's name, dotted and lower-case ("" when malformed); call after answer() accepted it."""
    labels, offset = [], HEADER.size
    while offset < len(query) and query[offset]:
        size = query[offset]
        labels.append(query[offset + 1:offset + 1 + size].decode("ascii", errors="replace"))
        offset += 1 + size
    return ".".join(labels).lower()


class QueryLog:
    """An audit line per name the guest looked up, at most once per name per ``window_s``, and at most
    ``remember`` lines in any window: random names (a flood) can neither grow the names remembered nor
    rotate the rest of the stream away. The first line of a later window says how many went unrecorded."""

    def __init__(self, audit: AuditWriter, window_s: float = 60.0, remember: int = 4096) -> None:
        self.audit = audit
        self.window_s = window_s
        self.remember = remember
        self._last: dict[str, float] = {}
        self._window_start = float("-inf")
        self._lines = 0          # written in the current window
        self._unrecorded = 0     # names left out since the last line
        self._lock = threading.Lock()

    def note(self, query: bytes, now: float | None = None) -> None:
        name = question_name(query)
        moment = time.monotonic() if now is None else now
        with self._lock:
            if moment - self._last.get(name, float("-inf")) < self.window_s:
                return
            if moment - self._window_start >= self.window_s:
                self._window_start, self._lines = moment, 0
                self._last = {n: t for n, t in self._last.items() if moment - t < self.window_s}
            if self._lines >= self.remember:
                self._unrecorded += 1
                return
            self._last[name] = moment
            self._lines += 1
            unrecorded, self._unrecorded = self._unrecorded, 0
        self.audit.emit("query", "block", reason_code="dns_refused", host=name[:253],
                        reason="the guest has no DNS for outside names: NXDOMAIN (the proxy resolves for it)",
                        detail={"names_not_recorded": unrecorded} if unrecorded else None)


def answer(query: bytes) -> bytes | None:
    """The sink's reply to one DNS message, or None to drop it."""
    if len(query) < HEADER.size:
        return None
    query_id, flags, qdcount, ancount, nscount, _arcount = HEADER.unpack_from(query)
    if flags & FLAG_QR or qdcount != 1 or ancount or nscount:
        return None
    end = question_end(query)
    if end is None:
        return None
    opcode = (flags >> 11) & 0xF
    rcode = RCODE_NXDOMAIN if opcode == 0 else RCODE_NOTIMP
    reply_flags = FLAG_QR | (opcode << 11) | (flags & FLAG_RD) | FLAG_RA | rcode
    return HEADER.pack(query_id, reply_flags, 1, 0, 0, 0) + query[HEADER.size:end]


# --------------------------------------------------------------------------- servers


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = answer(data)
        if reply is not None:
            sock.sendto(reply, self.client_address)
            self.server.queries.note(data)  # type: ignore[attr-defined]


def receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = b""
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return chunks


class TcpHandler(socketserver.BaseRequestHandler):
    """Length-prefixed messages (RFC 1035 4.2.2); several per connection; a bad one closes it."""

    def handle(self) -> None:
        self.request.settimeout(TCP_IDLE_TIMEOUT_S)
        try:
            while True:
                prefix = receive_exactly(self.request, 2)
                if prefix is None:
                    return
                query = receive_exactly(self.request, int.from_bytes(prefix, "big"))
                reply = answer(query) if query is not None else None
                if reply is None or query is None:
                    return
                self.request.sendall(len(reply).to_bytes(2, "big") + reply)
                self.server.queries.note(query)  # type: ignore[attr-defined]
        except OSError:
            return


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _BindsIpv4OrIpv6:
    """A socketserver whose family (IPv4 or IPv6) follows the host it binds."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self.address_family = address_family(address[0])  # read by the base __init__
        super().__init__(address, handler)  # type: ignore[call-arg]


class UdpServer(_BindsIpv4OrIpv6, socketserver.UDPServer):
    pass


class TcpServer(_BindsIpv4OrIpv6, BoundedThreadingMixIn, socketserver.TCPServer):
    max_connections = MAX_TCP_CONNECTIONS


class DnsSink:
    """UDP and TCP servers on one ip:port. Port 0 picks a free port for both."""

    def __init__(self, host: str, port: int, audit: AuditWriter | None = None) -> None:
        self.udp, self.tcp = self._bind_pair(host, port)
        self.queries = QueryLog(audit if audit is not None else AuditWriter.from_env("dns"))
        self.udp.queries = self.tcp.queries = self.queries  # type: ignore[attr-defined]
        self.port: int = self.udp.server_address[1]
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _bind_pair(host: str, port: int) -> tuple[UdpServer, TcpServer]:
        for _attempt in range(20 if port == 0 else 1):
            udp = UdpServer((host, port), UdpHandler)
            try:
                return udp, TcpServer((host, udp.server_address[1]), TcpHandler)
            except OSError:
                udp.server_close()
                if port != 0:
                    raise
        raise OSError(f"no port free for both UDP and TCP on {host}")

    def start(self) -> None:
        for server in (self.udp, self.tcp):
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


def listen_address(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, int]:
    """--listen, else BOTTLE_DNS_LISTEN, else 0.0.0.0:53; an empty host is 0.0.0.0."""
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.dnssink",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--listen", help=f"ip:port (default: $BOTTLE_DNS_LISTEN, else {DEFAULT_LISTEN})")
    args = parser.parse_args(list(argv))
    source, address = ("--listen", args.listen) if args.listen is not None else \
        ("BOTTLE_DNS_LISTEN", environ.get("BOTTLE_DNS_LISTEN", DEFAULT_LISTEN))
    try:
        return split_host_port(address, default_host="0.0.0.0")
    except ValueError:
        parser.exit(2, f"dnssink: {source} must be ip:port, got {address!r}\n")


def drop_root() -> None:
    """Once :53 is bound nothing here needs root; stay root only if we may not change uid."""
    if os.getuid() != 0:
        return
    try:
        os.setgroups([])
        os.setgid(NOBODY_GID)
        os.setuid(NOBODY_UID)
    except PermissionError as error:
        print(f"dnssink: could not drop root ({error}); continuing as root", flush=True)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    host, port = listen_address(sys.argv[1:] if argv is None else argv, environ)
    sink = DnsSink(host, port)
    drop_root()
    stopped = install_stop_handlers()
    sink.start()
    print(f"dnssink: answering NXDOMAIN on {host}:{sink.port} (udp, tcp); forwarding nothing",
          flush=True)
    wait_for_stop_signal(stopped)
    sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
