"""The floor must not match ordinary high-entropy data: images in a Messages API request, hashes, ids.

pipelock's case-insensitive AWS rule matched random base64 images of 20k, 60k and 150k characters
4, 10 and 19 times in 20, which bricks a session. Here the same kind of data, several MB of it,
must give no match at all; and a rule of pipelock's shape does match it, so the data can trip one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import uuid

from bottle_tasks.sidecars import bodies, dlp

RNG_SEED = 20260101
PIPELOCK_LIKE = re.compile(r"(?i)(?:AKIA|A3T|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ASIA)[A-Z0-9]{16}")


def images(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.choice([15_000, 45_000, 110_000, 300_000])) for _ in range(14)]


def messages_body(image: str, text: str = "What is in this screenshot?") -> str:
    return json.dumps({"model": "claude-sonnet-4", "max_tokens": 1024, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": text}]}]})


def identifiers(rng: random.Random, count: int = 3000) -> list[str]:
    jwt_header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    found = []
    for _ in range(count):
        payload = json.dumps({"sub": str(rng.getrandbits(64)), "iat": rng.getrandbits(31)}).encode()
        found += [
            str(uuid.UUID(int=rng.getrandbits(128))),
            hashlib.sha1(rng.randbytes(16)).hexdigest(),  # a git SHA
            hashlib.sha256(rng.randbytes(16)).hexdigest(),
            "sha512-" + base64.b64encode(hashlib.sha512(rng.randbytes(16)).digest()).decode(),  # npm integrity
            ".".join((jwt_header, base64.urlsafe_b64encode(payload).decode().rstrip("="),
                      base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("="))),
        ]
    return found


def test_random_base64_images_match_nothing():
    rng = random.Random(RNG_SEED)
    naive_hits = 0
    for raw in images(rng):
        for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
                     base64.encodebytes(raw).decode(), json.dumps({"data": base64.b64encode(raw).decode()}).replace("/", "\\/")):
            assert dlp.scan_text(text, "body") == []
            naive_hits += len(PIPELOCK_LIKE.findall(text))
    assert naive_hits > 10  # the same data trips a rule of pipelock's shape


def test_a_messages_api_body_with_screenshots_is_clean_every_way_egress_reads_it():
    rng = random.Random(RNG_SEED + 1)
    for raw in images(rng)[:6]:
        body = messages_body(base64.b64encode(raw).decode())
        assert dlp.scan_body_text(body, "application/json") == []
        assert bodies.scan_body(body.encode(), "", len(body) + 1, lambda text: dlp.scan_text(text, "body") or None) is None
        redaction = dlp.redact_body(body, "application/json")
        assert redaction.text == body and not redaction.redacted and not redaction.unredactable


def test_random_hex_matches_nothing():
    rng = random.Random(RNG_SEED + 2)
    for raw in images(rng)[:6]:
        for text in (raw[:100_000].hex(), raw[:60_000].hex().upper(), " ".join(f"{b:02x}" for b in raw[:20_000])):
            assert dlp.scan_text(text, "body") == []


def test_ids_hashes_integrity_strings_and_jwts_match_nothing():
    found = identifiers(random.Random(RNG_SEED + 3))
    assert dlp.scan_text("\n".join(found), "body") == []
    body = json.dumps({"lockfile": {f"pkg{i}": {"resolved": f"https://registry.npmjs.org/p/-/p-{i}.tgz", "integrity": value}
                                    for i, value in enumerate(found)}})
    assert dlp.scan_body_text(body, "application/json") == []


def test_text_that_looks_like_key_names_matches_nothing():
    text = ("Set aws_secret_access_key in ~/.aws/credentials; the access key id starts with AKIA. "
            "Tokens look like ghp_..., sk-ant-..., xoxb-...; never paste them. ") * 2000
    assert dlp.scan_text(text, "body") == []
