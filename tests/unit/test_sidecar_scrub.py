"""SecretScrubber: egress's placeholders and git-gate's credentials (bottle_tasks.sidecars.scrub)."""

from __future__ import annotations

import base64

from bottle_tasks.sidecars.scrub import SecretScrubber


def test_placeholders_replace_longest_first_in_text_and_bytes() -> None:
    scrubber = SecretScrubber.placeholders({"tok": "P1", "tok-longer": "P2", "": "ignored"})
    assert scrubber
    assert scrubber.text("a tok-longer and a tok") == "a P2 and a P1"
    assert scrubber.data(b"tok-longer") == b"P2"
    assert scrubber.same_length().text("tok-longer") == "P2________"
    assert not SecretScrubber.placeholders({})


def test_credentials_redact_token_basic_auth_and_url_userinfo() -> None:
    scrubber = SecretScrubber.credentials([("u", "s3cret"), ("v", "")])
    basic = base64.b64encode(b"u:s3cret").decode()
    text = scrubber.text(f"https://someone:pw@host/x Basic {basic} s3cret")
    assert text.startswith("https://[REDACTED]@host/x Basic [REDACTED]") and text.endswith(" [REDACTED]")
    assert "s3cret" not in text and basic.rstrip("=") not in text
    assert scrubber.data(b"ssh://git@host s3cret") == b"ssh://[REDACTED]@host [REDACTED]"


def test_stream_redactor_catches_a_token_split_across_chunks() -> None:
    redact = SecretScrubber.placeholders({"SECRET": "XXXXXX"}).stream()
    out = redact(b"abc SEC") + redact(b"RET def") + redact(b"")
    assert out == b"abc XXXXXX def"
