"""Built-in secret patterns and the pipelock scan-API client (bottle_tasks.sidecars.dlp).

Every "secret" here is generated from a prefix and filler, never a real credential.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from bottle_tasks.sidecars import dlp

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
