"""Request bodies for DLP (bottle_tasks.sidecars.bodies): bounded decoding and windowed scanning.

The windowed scanner must find everything a scan of the whole text finds: a secret across a window
boundary, encoded or not, and a match longer than any overlap (the two built-in patterns without a
length bound); and scan_body reassembles the fields of a body larger than a window.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import urllib.parse
import zlib

import pytest

from bottle_tasks.sidecars import bodies, dlp
from tests.unit.test_dlp import fake_aws_key

# One example per built-in pattern; each stands alone between spaces.
SECRETS = {
    "aws_access_key_id": "AKIA" + "Z" * 16,
    "aws_secret_access_key": 'aws_secret_access_key = "' + "A" * 40 + '"',
    "github_token": "ghp_" + "a" * 36,
    "github_pat": "github_pat_" + "a" * 22,
    "anthropic_api_key": "sk-ant-" + "a" * 24,
    "openai_api_key": "sk-" + "a" * 24,
    "slack_token": "xoxb-" + "1" * 12,
    "private_key": "-----BEGIN RSA PRIVATE KEY-----",
    "google_api_key": "AIza" + "a" * 35,
    "slack_webhook": "https://hooks.slack.com/services/T" + "A1B2C3D4E" + "/B" + "A1B2C3D4E5" + "/" + "a" * 24,
    "stripe_key": "sk_live_" + "a1B2" * 6,
    "gitlab_token": "glpat-" + "a" * 20,
    "npm_token": "npm_" + "a" * 36,
    "pypi_token": "pypi-AgEIcHlwaS5vcmc" + "a" * 50,
    "huggingface_token": "hf_" + "a" * 34,
    "sendgrid_api_key": "SG." + "a" * 22 + "." + "b" * 43,
}
WINDOW, OVERLAP = 2000, 700  # small, so a test body crosses many windows


def scan(text: str, *, window: int = WINDOW, overlap: int = OVERLAP, step: int = 97) -> list[str]:
    """Pattern names the windowed scanner finds in text, fed in pieces of step bytes."""
    scanner = bodies.WindowScanner(lambda window_text: [m.pattern for m in dlp.scan_text(window_text, "body")] or None,
                                   window=window, overlap=overlap)
    data = text.encode()
    for start in range(0, len(data), step):
        found = scanner.feed(data[start:start + step])
        if found:
            return found
    return scanner.finish() or []


def test_every_builtin_pattern_has_an_example():
    assert set(SECRETS) == {name for name, _ in dlp.BUILTIN_PATTERNS}
    for name, secret in SECRETS.items():
        assert dlp.matching_pattern_names(f" {secret} ") == [name]


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_secret_spanning_a_window_boundary_is_caught(name):
    secret = SECRETS[name]
    for offset in range(WINDOW - len(secret) - 3, WINDOW + 3):  # every cut through the secret
        text = "." * offset + " " + secret + " " + "." * (3 * WINDOW)
        assert name in scan(text), f"missed at offset {offset}"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_percent_encoded_secret_across_windows_is_caught(name):
    encoded = urllib.parse.quote(urllib.parse.quote(SECRETS[name], safe=""), safe="")  # double-encoded
    for offset in range(WINDOW - len(encoded), WINDOW + 3, 7):
        assert name in scan("." * offset + " " + encoded + " " + "." * (3 * WINDOW)), f"missed at offset {offset}"


@pytest.mark.parametrize("name, padded", [
    ("aws_secret_access_key", "aws_secret_key" + " \"'" * 3000 + "=" + "\n" * 5000 + "'" + "A" * 40),
    ("private_key", "-----BEGIN " + "RSA " * 4000 + "PRIVATE KEY-----"),
    ("aws_secret_access_key", urllib.parse.quote("aws_secret_key" + " " * 4000 + "=" + "A" * 40, safe="")),
])
def test_a_match_longer_than_the_overlap_is_still_caught(name, padded):
    assert len(padded) > 4 * WINDOW and dlp.matching_pattern_names(padded) == [name]
    for lead in (0, 5, WINDOW - 20, 3 * WINDOW + 11):
        assert name in scan("." * lead + " " + padded + " " + "." * WINDOW), f"missed after {lead} characters"


def test_windows_stay_bounded_for_ordinary_text():
    sizes: list[int] = []
    scanner = bodies.WindowScanner(lambda text: sizes.append(len(text)), window=WINDOW, overlap=OVERLAP)
    for _ in range(2000):
        scanner.feed(b"ordinary text, aws and BEGIN words, nothing secret. " * 3)
    scanner.finish()
    assert len(sizes) > 100 and max(sizes) < WINDOW + 200


def test_a_body_within_one_window_is_scanned_once_whole():
    seen: list[str] = []
    result = bodies.scan_body(b"small body", "", 1000, lambda text: seen.append(text))
    assert result is None and seen == ["small body"]
    assert bodies.scan_body(b"", "gzip", 1000, lambda text: seen.append(text)) is None and len(seen) == 1


def test_gzip_members_with_zero_padding_are_all_decoded():
    raw = gzip.compress(b"one ") + b"\0" * 10 + gzip.compress(b"two")
    assert b"".join(bodies.decoded_pieces(raw, "gzip", 1000)) == b"one two"


def test_decoding_never_hands_out_more_than_a_step():
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    raw = b"".join(compressor.compress(os.urandom(500_000).hex().encode()) for _ in range(3)) + compressor.flush()
    pieces = list(bodies.decoded_pieces(raw, "gzip", 10 << 20))
    assert sum(map(len, pieces)) == 3_000_000 and max(map(len, pieces)) <= bodies.DECODE_STEP


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "exotic"])
def test_encodings_without_a_bounded_decoder_are_refused(encoding):
    with pytest.raises(bodies.BodyRefused) as refused:
        list(bodies.decoded_pieces(b"data", encoding, 1000))
    assert refused.value.reason == "dlp_unavailable" and refused.value.status == 403


def test_windowed_scan_finds_whatever_a_whole_scan_finds():
    # Seeded and bounded: random mixes of secrets, their parts, padding and percent-encodings.
    rng = random.Random(20240601)
    fragments = [*SECRETS.values(), "aws_secret_key", "-----BEGIN ", "PRIVATE KEY-----", "RSA ", " ", "\n", '"',
                 "'", "=", "A" * 40, "AKIA", "Z" * 16, ".", "%", "%2", "%20", "+", "sk-", "ant-", "a" * 30]
    for _ in range(150):
        parts = []
        for _ in range(rng.randint(1, 60)):
            fragment, roll = rng.choice(fragments), rng.random()
            if roll < 0.1:
                fragment = "".join(f"%{ord(char):02X}" for char in fragment)
            elif roll < 0.25:
                fragment *= rng.randint(2, 300)
            parts.append(fragment)
        text = "".join(parts)
        if dlp.matching_pattern_names(text):
            assert scan(text, step=rng.randint(1, 300)), text[:200]


# -- encoded secrets and fields (dlp's decoders and reassembly) ------------------------------------

ENCODINGS = {
    "base64": lambda key: base64.b64encode(key.encode()).decode(),
    "hex": lambda key: key.encode().hex(),
    "JSON escapes": lambda key: "".join(f"\\u{ord(char):04x}" for char in key),
    "base64 of percent": lambda key: base64.b64encode("".join(f"%{b:02X}" for b in key.encode()).encode()).decode(),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_encoded_secret_across_a_window_cut_is_caught(encoding):
    # Inside a longer base64 run too, so that a window starts in the middle of a run, at any alignment.
    encoded = ENCODINGS[encoding](fake_aws_key())
    run_filler = base64.b64encode(os.urandom(3 * WINDOW)).decode()
    for offset in range(WINDOW - len(encoded) - 3, WINDOW + 3):
        for filler in ("." * (3 * WINDOW), run_filler):
            text = filler[:offset] + encoded + filler[:WINDOW]
            assert "aws_access_key_id" in scan(text), f"missed at offset {offset}"


def test_an_open_match_inside_a_base64_run_longer_than_the_overlap_is_caught():
    # The padded name is only there once decoded; the window carries from where the run starts.
    inner = "aws_secret_access_key" + " " * (3 * OVERLAP) + "= " + "Ab1/" * 10
    encoded = base64.b64encode(inner.encode()).decode()
    assert len(encoded) > 2 * OVERLAP
    for lead in (0, 5, WINDOW - 20, 3 * WINDOW + 11):
        assert "aws_secret_access_key" in scan("." * lead + " " + encoded + " " + "." * WINDOW), f"missed after {lead}"


def scan_body(body: bytes, content_type: str | None = None) -> list[str]:
    found = bodies.scan_body(body, "", len(body) + 1, lambda text: [m.pattern for m in dlp.scan_text(text, "body")] or None,
                             content_type=content_type)
    return found or []


def test_a_key_split_across_form_fields_of_a_large_body_is_caught():
    key = fake_aws_key().lower()
    body = (f"a={key[:10]}&b={key[10:]}&pad=" + "x" * (2 * bodies.SCAN_WINDOW)).encode()
    assert scan_body(body) == ["aws_access_key_id"]  # sniffed
    assert scan_body(body, "application/x-www-form-urlencoded; charset=utf-8") == ["aws_access_key_id"]
    assert scan_body(body, "text/plain") == []  # told it has no fields


def test_fields_are_reassembled_only_up_to_the_structure_limit(monkeypatch):
    key = fake_aws_key().lower()
    body = json.dumps({"a": key[:10], "b": key[10:], "pad": "x" * 5000}).encode()
    assert scan_body(body) == ["aws_access_key_id"]
    monkeypatch.setattr(bodies, "STRUCTURE_LIMIT", 1000)  # the documented limit: windows only
    assert scan_body(body) == []
