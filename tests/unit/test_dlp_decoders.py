"""The floor's decoders (bottle_tasks.sidecars.dlp views): every encoding an agent can wrap a key in.

Each case first checks that the rules alone, on the text as sent, see nothing (so the find is the
decoder's: the test fails if that decoder is removed), then that the scan finds the key.
"""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import urllib.parse
import zlib

import pytest

from bottle_tasks.sidecars import dlp
from tests.unit.test_dlp import ALNUM, fake_aws_key, fake_secrets, random_text


def plain_rules_see(text: str) -> bool:
    return any(pattern.search(text) for _, pattern in dlp.BUILTIN_PATTERNS)


def assert_found_only_by_decoding(encoded: str, name: str = "aws_access_key_id") -> None:
    assert not plain_rules_see(encoded), "the text as sent already matches: this case proves nothing"
    assert name in dlp.matching_pattern_names(encoded)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def percent_all(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


ENCODINGS = {
    "base64": b64,
    "base64 without padding": lambda key: b64(key).rstrip("="),
    "base64 url-safe": lambda key: base64.urlsafe_b64encode(("?>~" + key).encode()).decode(),  # has - and _
    "base64 lines of 76": lambda key: base64.encodebytes(((key + " ") * 8).encode()).decode(),
    "hex": lambda key: key.encode().hex(),
    "HEX": lambda key: key.encode().hex().upper(),
    "hex after a letter": lambda key: "q" + key.encode().hex(),
    "hex bytes with spaces": lambda key: " ".join(f"{byte:02x}" for byte in key.encode()),
    "hex bytes with colons": lambda key: ":".join(f"{byte:02X}" for byte in key.encode()),
    "hex array": lambda key: ", ".join(f"0x{byte:02x}" for byte in key.encode()),
    "JSON \\u": lambda key: "".join(f"\\u{ord(char):04x}" for char in key),
    "JSON \\u for some": lambda key: key[:5] + "".join(f"\\u{ord(char):04X}" for char in key[5:9]) + key[9:],
    "surrogate pairs around": lambda key: "\\ud83d\\ude00" + "".join(f"\\u{ord(char):04x}" for char in key) + "\\ud83d\\ude00",
    "JS \\x": lambda key: "".join(f"\\x{ord(char):02x}" for char in key),
    "JS \\u{}": lambda key: "".join(f"\\u{{{ord(char):x}}}" for char in key),
    "octal": lambda key: "".join(f"\\{ord(char):03o}" for char in key),
    "HTML decimal": lambda key: "".join(f"&#{ord(char)};" for char in key),
    "HTML hex": lambda key: "".join(f"&#x{ord(char):x};" for char in key),
    "escaped twice": lambda key: "".join(f"\\\\u{ord(char):04x}" for char in key),
    "percent": percent_all,
    "percent for one letter": lambda key: percent_all(key[0]) + key[1:],
    "percent twice": lambda key: urllib.parse.quote(percent_all(key)),
    "percent three times": lambda key: urllib.parse.quote(urllib.parse.quote(percent_all(key))),
    "percent %u": lambda key: "".join(f"%u{ord(char):04X}" for char in key),
    "base64 of percent": lambda key: b64(percent_all(key)),
    "percent of base64": lambda key: urllib.parse.quote(b64(key), safe=""),
    "hex of base64": lambda key: b64(key).encode().hex(),
    "base64 of hex": lambda key: b64(key.encode().hex()),
    "base64 three times": lambda key: b64(b64(b64(key))),
    "base64 of JSON escapes": lambda key: b64("".join(f"\\u{ord(char):04x}" for char in key)),
    "gzip then base64": lambda key: b64(gzip.compress(key.encode())),
    "zlib then base64": lambda key: b64(zlib.compress(("config: " + key).encode())),
    "UTF-16LE then base64": lambda key: b64(key.encode("utf-16-le")),
    "UTF-16BE then base64": lambda key: b64(key.encode("utf-16-be")),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_encoded_key_is_found(encoding):
    encoded = ENCODINGS[encoding](fake_aws_key())
    for text in (encoded, f"data: {encoded} end", json.dumps({"data": encoded})):
        assert_found_only_by_decoding(text)


@pytest.mark.parametrize("name", ["github_token", "aws_secret_access_key", "private_key", "slack_token", "anthropic_api_key"])
@pytest.mark.parametrize("encoding", ["base64", "hex", "JSON \\u", "percent twice", "base64 of percent"])
def test_other_patterns_decode_too(name, encoding):
    assert_found_only_by_decoding(ENCODINGS[encoding](fake_secrets()[name]), name)


def test_a_base64_key_inside_a_longer_run_is_found_at_every_offset():
    # Encoded on its own and pasted into a larger run: it decodes only at its own alignment.
    key = fake_aws_key()
    for lead in range(12):
        before = b64(secrets.token_bytes(200 + lead)).rstrip("=")
        after = b64(secrets.token_bytes(200)).rstrip("=")
        assert_found_only_by_decoding(before + b64(key).rstrip("=") + after)


def test_a_key_inside_a_larger_encoded_text_is_found():
    # The key is one line of a file the agent base64-encodes whole.
    dotenv = f"USER=me\nHOME=/home/me\nAWS_ACCESS_KEY_ID={fake_aws_key()}\nEDITOR=vi\n" * 3
    assert_found_only_by_decoding(b64(dotenv))


def test_escaped_slashes_inside_a_secret():
    # PHP and some JSON encoders write "/" as "\/". In a body too large to parse whole (egress
    # scans it window by window) the escape view puts the slashes back.
    value = random_text(ALNUM, 12) + "/" + random_text(ALNUM, 12) + "/" + random_text(ALNUM, 14)
    raw = json.dumps({"aws_secret_access_key": value}).replace("/", "\\/")
    assert_found_only_by_decoding(raw[:-1], "aws_secret_access_key")  # cut: not valid JSON


def test_base64_in_a_form_value():
    body = "name=x&data=" + urllib.parse.quote_plus(b64("token " + fake_aws_key())) + "&more=1"
    assert_found_only_by_decoding(body)


def test_the_span_of_a_decoded_match_is_the_encoded_run():
    key = fake_aws_key()
    encoded = b64(key)
    text = f"before {encoded} after %41{key[1:]} end"
    spans = [match.span for match in dlp.scan_text(text.replace(key[1:], "x" * 19), "body")]
    assert [text[slice(*span)] for span in spans] == [encoded]
    runs = {text[slice(*span)] for _, span in dlp._hits(text, first_only=False)}
    assert runs == {encoded, f"%41{key[1:]}"}  # the whole run, the escape with the rest of the key


def test_decoded_views_lists_what_the_rules_read():
    key = fake_aws_key()
    views = dlp.decoded_views(f"x {b64(key)} y")
    assert views[0] == f"x {b64(key)} y" and any(key in view for view in views[1:])
