"""Built-in secret patterns and the pipelock scan-API client (bottle_tasks.sidecars.dlp).

Every "secret" here is generated from a prefix and filler, never a real credential.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from bottle_tasks.sidecars import dlp
from tests.unit.fakes import FakePipelock

FAKE_AWS_KEY = "AKIA" + "Z" * 16
FAKE_SECRETS = {
    "aws_access_key_id": FAKE_AWS_KEY,
    "aws_secret_access_key": "aws_secret_access_key = " + "Ab1/" * 10,
    "github_token": "ghp_" + "a1B2" * 9,
    "github_pat": "github_pat_" + "Z9_" * 10,
    "anthropic_api_key": "sk-ant-api03-" + "x" * 40,
    "openai_api_key": "sk-proj-" + "Q" * 40,
    "slack_token": "xoxb-" + "1234567890-" * 2 + "abc",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----",
    "google_api_key": "AIza" + "S" * 35,
}


@pytest.mark.parametrize("name, secret", sorted(FAKE_SECRETS.items()))
def test_each_builtin_pattern_matches(name, secret):
    matches = dlp.scan_text(f"some text {secret} more", "body")
    assert dlp.DlpMatch(name, "body") in matches


def test_openssh_and_ec_private_keys():
    for header in ("-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----",
                   "-----BEGIN PRIVATE KEY-----", "-----BEGIN ENCRYPTED PRIVATE KEY-----"):
        assert [m.pattern for m in dlp.scan_text(header, "body")] == ["private_key"]


def test_anthropic_key_is_not_also_an_openai_key():
    assert [m.pattern for m in dlp.scan_text(FAKE_SECRETS["anthropic_api_key"], "x")] == ["anthropic_api_key"]


@pytest.mark.parametrize(
    "text",
    [
        "bottle-placeholder-ANTHROPIC_API_KEY",
        "AKIA" + "Z" * 15,  # too short
        "XAKIA" + "Z" * 16 + "Z",  # embedded in a longer token
        "task-ant-colony and sk-short",
        "the public key: -----BEGIN PUBLIC KEY-----",
        "aws_secret_access_key = <redacted>",
        '{"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hello"}]}',
    ],
)
def test_ordinary_text_is_clean(text):
    assert dlp.scan_text(text, "body") == []


def test_percent_encoded_secret_is_found():
    encoded = urllib.parse.quote(FAKE_AWS_KEY, safe="")  # AKIA is plain; encode a letter by hand too
    assert dlp.scan_text("/upload?k=%41KIA" + "Z" * 16, "url") == [dlp.DlpMatch("aws_access_key_id", "url")]
    double = urllib.parse.quote("%41KIA" + "Z" * 16, safe="")
    assert dlp.scan_text(f"/x?k={double}", "url") == [dlp.DlpMatch("aws_access_key_id", "url")]
    assert dlp.scan_text(encoded, "url")


def test_matches_never_carry_the_secret():
    for secret in FAKE_SECRETS.values():
        for match in dlp.scan_text(secret, "header:x-foo"):
            assert secret not in repr(match)


def test_redact_removes_every_match():
    text = " ".join(FAKE_SECRETS.values())
    redacted = dlp.redact(text)
    assert dlp.scan_text(redacted, "x") == []
    assert "[REDACTED:aws_access_key_id]" in redacted


def test_scan_request_reports_where():
    parts = dlp.RequestParts(
        url=f"example.com/p?key={FAKE_AWS_KEY}",
        headers=(("X-Leak", FAKE_SECRETS["github_token"]), ("Accept", "*/*")),
        body=json.dumps({"k": FAKE_SECRETS["slack_token"]}),
    )
    assert dlp.scan_request(parts) == [
        dlp.DlpMatch("aws_access_key_id", "url"),
        dlp.DlpMatch("github_token", "header:x-leak"),
        dlp.DlpMatch("slack_token", "body"),
    ]


# -- pipelock scan API ----------------------------------------------------------------------




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
    scanner = dlp.PipelockScanner(server.url, bearer_token="scan-token")
    assert scanner.scan(PARTS) == ([], [])
    (payload, auth), = server.requests
    assert auth == "Bearer scan-token"
    assert set(payload) == {"kind", "input"} and payload["kind"] == "dlp"
    assert set(payload["input"]) == {"text"}
    assert "api.example.com/v1/x" in payload["input"]["text"] and "hello" in payload["input"]["text"]


def test_pipelock_warn_passes(pipelock_server):
    server = pipelock_server(lambda req: completed("warn", [{"scanner": "dlp", "rule_id": "DLP-x"}]))
    assert dlp.PipelockScanner(server.url).scan(PARTS) == ([], [])


def test_pipelock_deny_with_secret_finding_blocks(pipelock_server):
    finding = {"scanner": "dlp", "rule_id": "DLP-AWS Access Key", "severity": "critical", "message": "m"}
    server = pipelock_server(lambda req: completed("deny", [finding]))
    matches, advisories = dlp.PipelockScanner(server.url).scan(PARTS)
    assert matches == [dlp.DlpMatch("pipelock:DLP-AWS Access Key", "request")] and advisories == []


def test_pipelock_deny_for_mentioned_url_only_is_advisory(pipelock_server):
    finding = {"scanner": "url", "rule_id": "SSRF-Private-IP", "severity": "high", "message": "m"}
    server = pipelock_server(lambda req: completed("deny", [finding]))
    assert dlp.PipelockScanner(server.url).scan(PARTS) == ([], ["SSRF-Private-IP"])


def test_pipelock_deny_without_findings_blocks(pipelock_server):
    server = pipelock_server(lambda req: completed("deny"))
    matches, _ = dlp.PipelockScanner(server.url).scan(PARTS)
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
    with pytest.raises(dlp.DlpUnavailable):
        dlp.PipelockScanner(server.url).scan(PARTS)


def test_pipelock_unreachable_is_unavailable():
    with pytest.raises(dlp.DlpUnavailable):
        dlp.PipelockScanner("http://127.0.0.1:9/api/v1/scan", timeout=2).scan(PARTS)


def test_pipelock_large_body_is_chunked_with_overlap(pipelock_server):
    server = pipelock_server(lambda req: completed("allow"))
    body = "a" * 250 + "MARK" + "b" * 250
    dlp.PipelockScanner(server.url, chunk_chars=100).scan(dlp.RequestParts("h/", (), body))
    texts = [payload["input"]["text"] for payload, _ in server.requests]
    assert len(texts) > 1 and all(len(t) <= 100 for t in texts)
    assert any("MARK" in t for t in texts)
