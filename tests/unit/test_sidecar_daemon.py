"""The scaffolding every bundle daemon shares (bottle_tasks.sidecars.daemon)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from bottle_tasks.sidecars.daemon import Backoff, BoundedThreadingMixIn, read_chunks, split_host_port


@pytest.mark.parametrize("address, expected", [
    ("10.243.7.2:8080", ("10.243.7.2", 8080)),
    ("[::1]:53", ("::1", 53)),
    (" 127.0.0.1:0 ", ("127.0.0.1", 0)),
])
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["localhost", "1.2.3.4:", "1.2.3.4:x", "1.2.3.4:65536", ":53"])
def test_split_host_port_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="ip:port"):
        split_host_port(address)


def test_an_empty_host_takes_the_default_when_there_is_one() -> None:
    assert split_host_port(":53", default_host="0.0.0.0") == ("0.0.0.0", 53)
    assert split_host_port("[]:53", default_host="0.0.0.0") == ("0.0.0.0", 53)


def test_backoff_starts_at_zero_doubles_and_is_capped() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=30.0)
    assert [backoff.delay(n) for n in range(0, 9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_read_chunks_stops_at_length_or_eof() -> None:
    import io

    assert b"".join(read_chunks(io.BytesIO(b"abcdef"), 4, chunk_size=3)) == b"abcd"
    assert b"".join(read_chunks(io.BytesIO(b"ab"), 10)) == b"ab"


class _Holding(socketserver.BaseRequestHandler):
    release = threading.Event()

    def handle(self) -> None:
        self.request.sendall(b"hi")
        self.release.wait(10)


class _CappedServer(BoundedThreadingMixIn, socketserver.TCPServer):
    max_connections = 2


def test_bounded_server_closes_connections_over_the_cap() -> None:
    server = _CappedServer(("127.0.0.1", 0), _Holding)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    held = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert sock.recv(2) == b"hi"
            held.append(sock)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as over:
            assert over.recv(2) == b"", "the third connection is closed unanswered"
        _Holding.release.set()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the slots come back once the handlers end
            with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
                if again.recv(2) == b"hi":
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("no slot came back")
    finally:
        server.shutdown()
        server.server_close()
