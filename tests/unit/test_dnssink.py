"""The DNS sink answers NXDOMAIN to every well-formed query and drops everything else."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bottle_tasks.sidecars import dnssink
from bottle_tasks.sidecars.dnssink import DnsSink, answer, listen_address
from tests.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]

RCODE_NXDOMAIN = 3


def dns_query(name: str, query_id: int = 0x1234, qtype: int = 1, flags: int = 0x0100) -> bytes:
    header = struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def assert_nxdomain_for(reply: bytes, query: bytes) -> None:
    query_id, flags, qdcount, ancount, nscount, arcount = struct.unpack("!HHHHHH", reply[:12])
    assert query_id == struct.unpack("!H", query[:2])[0]
    assert flags & 0x8000, "QR bit set: this is a response"
    assert flags & 0x000F == RCODE_NXDOMAIN
    assert (qdcount, ancount, nscount, arcount) == (1, 0, 0, 0)
    assert reply[12:] == query[12:], "the question is echoed verbatim"


@pytest.fixture
def sink() -> Iterator[DnsSink]:
    server = DnsSink("127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def udp_exchange(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, ("127.0.0.1", port))
        return sock.recv(4096)


def tcp_exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(len(payload).to_bytes(2, "big") + payload)
    length = int.from_bytes(receive(sock, 2), "big")
    return receive(sock, length)


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def test_udp_query_gets_nxdomain(sink: DnsSink) -> None:
    query = dns_query("api.anthropic.com", query_id=0xBEEF)
    assert_nxdomain_for(udp_exchange(sink.port, query), query)


def test_tcp_queries_get_nxdomain_on_one_connection(sink: DnsSink) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=2.0) as sock:
        for query_id, name in ((1, "example.com"), (2, "exfil.secret.attacker.test")):
            query = dns_query(name, query_id=query_id, qtype=28)
            assert_nxdomain_for(tcp_exchange(sock, query), query)


def test_udp_garbage_is_dropped_and_the_sink_keeps_answering(sink: DnsSink) -> None:
    for garbage in (b"\x00\x01garbage", b"", b"\xff" * 40):
        with pytest.raises(socket.timeout):
            udp_exchange(sink.port, garbage, timeout=0.3)
    query = dns_query("still.alive.test")
    assert_nxdomain_for(udp_exchange(sink.port, query), query)


def test_tcp_garbage_closes_the_connection(sink: DnsSink) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=2.0) as sock:
        garbage = b"not dns at all, not even close"
        sock.sendall(len(garbage).to_bytes(2, "big") + garbage)
        assert sock.recv(100) == b""


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x12\x34",  # shorter than a header
        dns_query("example.com", flags=0x8100),  # a response, not a query
        struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0),  # no question
        struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + dns_query("a.test")[12:] * 2,
        dns_query("example.com")[:-3],  # question cut short
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01",
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
        struct.pack("!HHHHHH", 1, 0x0100, 1, 1, 0, 0) + dns_query("a.test")[12:],  # has answers
    ],
)
def test_malformed_messages_get_no_reply(packet: bytes) -> None:
    assert answer(packet) is None


def test_edns_query_is_answered_with_the_question_only() -> None:
    opt_record = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    base = dns_query("example.com")
    query = base[:10] + b"\x00\x01" + base[12:] + opt_record  # ARCOUNT = 1
    reply = answer(query)
    assert reply is not None
    assert reply[12:] == base[12:]
    assert struct.unpack("!H", reply[10:12])[0] == 0


def test_other_opcodes_get_notimp() -> None:
    reply = answer(dns_query("example.com", flags=0x2100))  # opcode 4 (NOTIFY)
    assert reply is not None
    assert struct.unpack("!H", reply[2:4])[0] & 0x000F == 4


def test_listen_comes_from_the_flag_then_the_environment_then_the_default() -> None:
    env = {"BOTTLE_DNS_LISTEN": "10.0.0.9:53"}
    assert listen_address(["--listen", "127.0.0.1:5353"], env) == ("127.0.0.1", 5353)
    assert listen_address([], env) == ("10.0.0.9", 53)
    assert listen_address([], {"BOTTLE_DNS_LISTEN": "[::]:53"}) == ("::", 53)
    assert listen_address([], {}) == ("0.0.0.0", 53)


def test_a_bad_listen_address_exits_2_naming_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        listen_address(["--listen", "nope"], {})
    assert exited.value.code == 2
    assert "--listen must be ip:port, got 'nope'" in capsys.readouterr().err


def test_the_daemon_answers_on_its_listen_flag() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "bottle_tasks.sidecars.dnssink", "--listen", f"127.0.0.1:{port}"],
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "BOTTLE_DNS_LISTEN": "bogus"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        query = dns_query("example.com")

        def answered() -> bytes | None:
            try:
                return udp_exchange(port, query, timeout=0.2)
            except OSError:
                return None

        assert_nxdomain_for(wait_for(answered, what="an answer from the dnssink process"), query)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    assert f"answering NXDOMAIN on 127.0.0.1:{port}" in stdout


def test_each_name_looked_up_reaches_the_audit_stream_once_a_minute(tmp_path):
    from bottle_tasks.sidecars import audit

    log = dnssink.QueryLog(audit.AuditWriter("dns", directory=tmp_path))
    query = dnssink.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + b"\x07example\x03COM\x00\x00\x01\x00\x01"
    for moment in (0.0, 1.0, 59.0, 61.0):
        log.note(query, now=moment)
    records = list(audit.read_records(tmp_path))
    assert [(r["source"], r["host"], r["reason_code"]) for r in records] == [("dns", "example.com", "dns_refused")] * 2
