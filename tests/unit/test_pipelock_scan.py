"""The pipelock scan API client, against a fake pipelock speaking v2.3.0's shapes."""

from __future__ import annotations

import pytest

from bottle_tasks.sidecars import dlp, pipelock_scan
from tests.unit.fakes import FakePipelock


@pytest.fixture
def pipelock_server():
    servers = []

    def start(reply):
        server = FakePipelock(reply)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def completed(decision, findings=()):
    return 200, {"status": "completed", "decision": decision, "kind": "dlp", "scan_id": "scan-1",
                 "engine_version": "test", "findings": list(findings)}


PARTS = dlp.RequestParts(url="api.example.com/v1/x", headers=(("x-api-key", "placeholder"),), body="hello")


def test_pipelock_request_shape_and_allow(pipelock_server):
    server = pipelock_server(lambda req: completed("allow"))
    scanner = pipelock_scan.PipelockScanner(server.url, bearer_token="scan-token")
    assert scanner.scan(PARTS) == ([], [])
    (payload, auth), = server.requests
    assert auth == "Bearer scan-token"
    assert set(payload) == {"kind", "input"} and payload["kind"] == "dlp"
    assert set(payload["input"]) == {"text"}
    assert "api.example.com/v1/x" in payload["input"]["text"] and "hello" in payload["input"]["text"]


def test_pipelock_warn_passes(pipelock_server):
    server = pipelock_server(lambda req: completed("warn", [{"scanner": "dlp", "rule_id": "DLP-x"}]))
    assert pipelock_scan.PipelockScanner(server.url).scan(PARTS) == ([], [])


def test_pipelock_deny_with_secret_finding_blocks(pipelock_server):
    finding = {"scanner": "dlp", "rule_id": "DLP-AWS Access Key", "severity": "critical", "message": "m"}
    server = pipelock_server(lambda req: completed("deny", [finding]))
    matches, advisories = pipelock_scan.PipelockScanner(server.url).scan(PARTS)
    assert matches == [dlp.DlpMatch("pipelock:DLP-AWS Access Key", "request")] and advisories == []


def test_pipelock_deny_for_mentioned_url_only_is_advisory(pipelock_server):
    finding = {"scanner": "url", "rule_id": "SSRF-Private-IP", "severity": "high", "message": "m"}
    server = pipelock_server(lambda req: completed("deny", [finding]))
    assert pipelock_scan.PipelockScanner(server.url).scan(PARTS) == ([], ["SSRF-Private-IP"])


def test_pipelock_deny_without_findings_blocks(pipelock_server):
    server = pipelock_server(lambda req: completed("deny"))
    matches, _ = pipelock_scan.PipelockScanner(server.url).scan(PARTS)
    assert matches == [dlp.DlpMatch("pipelock:deny", "request")]


@pytest.mark.parametrize(
    "reply",
    [
        lambda req: (401, {"status": "error", "errors": [{"code": "unauthorized", "message": "m"}]}),
        lambda req: (429, {"status": "error"}),
        lambda req: (200, b"not json"),
        lambda req: (200, {"status": "error"}),
        lambda req: completed("maybe"),
    ],
)
def test_pipelock_failures_are_unavailable(pipelock_server, reply):
    server = pipelock_server(reply)
    with pytest.raises(pipelock_scan.DlpUnavailable):
        pipelock_scan.PipelockScanner(server.url).scan(PARTS)


def test_pipelock_unreachable_is_unavailable():
    with pytest.raises(pipelock_scan.DlpUnavailable):
        pipelock_scan.PipelockScanner("http://127.0.0.1:9/api/v1/scan", timeout=2).scan(PARTS)


def test_pipelock_large_body_is_chunked_with_overlap(pipelock_server):
    server = pipelock_server(lambda req: completed("allow"))
    body = "a" * 250 + "MARK" + "b" * 250
    pipelock_scan.PipelockScanner(server.url, chunk_chars=100).scan(dlp.RequestParts("h/", (), body))
    texts = [payload["input"]["text"] for payload, _ in server.requests]
    assert len(texts) > 1 and all(len(t) <= 100 for t in texts)
    assert any("MARK" in t for t in texts)
