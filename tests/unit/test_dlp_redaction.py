"""Redaction for the model API route (dlp.redact_body, redact_text): every match replaced by a typed
marker, the JSON still valid and of the same shape, nothing redactable left, documentation keys
kept, and what has no single place to cut reported as unredactable."""

from __future__ import annotations

import base64
import json
import random
import urllib.parse

import pytest

from bottle_tasks.sidecars import dlp
from tests.unit.test_dlp import fake_aws_key, fake_secrets

JSON = "application/json"


def shape(value):
    """The structure of a JSON value with every string replaced by its type."""
    if isinstance(value, dict):
        return {"keys": len(value), "values": [shape(item) for item in value.values()]}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def messages(*texts: str) -> str:
    return json.dumps({"model": "claude-sonnet-4", "max_tokens": 512, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "text", "text": text} for text in texts]}]})


def assert_clean(result: dlp.Redaction, content_type: str = JSON) -> None:
    assert result.unredactable == []
    assert dlp.scan_body_text(result.text, content_type) == []


def test_a_clean_body_is_left_byte_for_byte():
    body = messages("hello", "AKIAIOSFODNN7EXAMPLE is AWS's documentation key")
    result = dlp.redact_body(body, JSON)
    assert result.text == body and result.redacted == [] and result.unredactable == []


def test_every_kind_of_match_is_cut_and_the_json_keeps_its_shape():
    fakes = fake_secrets()
    key = fake_aws_key()
    texts = [
        f"my .env:\nAWS_ACCESS_KEY_ID={key}\nGITHUB_TOKEN={fakes['github_token']}\n",
        "encoded: " + base64.b64encode(f"token={fakes['slack_token']}".encode()).decode() + " (base64)",
        "a link https://x.example/?k=" + urllib.parse.quote(urllib.parse.quote(fakes["anthropic_api_key"], safe=""), safe=""),
        "js: const k = '" + "".join(f"\\x{ord(c):02x}" for c in fakes["stripe_key"]) + "';",
        "AKIAIOSFODNN7EXAMPLE stays, and so does wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ]
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}],
                       "metadata": {fakes["npm_token"]: "a key as a key", "aws_secret_access_key": fakes["aws_secret_access_key"].split(" = ")[1]}})
    result = dlp.redact_body(body, JSON)
    assert_clean(result)
    out = json.loads(result.text)
    assert shape(out) == shape(json.loads(body))
    assert {m.pattern for m in result.redacted} == {"aws_access_key_id", "github_token", "slack_token", "anthropic_api_key",
                                                   "stripe_key", "npm_token", "aws_secret_access_key"}
    rendered = json.dumps(out)
    for pattern in ("aws_access_key_id", "github_token", "slack_token", "anthropic_api_key", "stripe_key", "npm_token"):
        assert f"[REDACTED:{pattern}]" in rendered
    assert "AWS_ACCESS_KEY_ID=[REDACTED:aws_access_key_id]\n" in out["messages"][0]["content"][0]["text"]
    assert out["messages"][0]["content"][4]["text"] == texts[4]  # documentation keys kept
    assert out["metadata"]["aws_secret_access_key"] == "[REDACTED:aws_secret_access_key]"
    for match in result.redacted:  # each span is the string token that carried it
        start, end = match.span
        assert body[start] == '"' and body[end - 1] == '"'


def test_an_encoded_run_is_replaced_whole():
    key = fake_aws_key()
    encoded = base64.b64encode(f"id {key}".encode()).decode()
    result = dlp.redact_body(messages(f"before {encoded} after"), JSON)
    assert json.loads(result.text)["messages"][0]["content"][0]["text"] == "before [REDACTED:aws_access_key_id] after"


def test_a_key_split_across_content_blocks_is_unredactable():
    key = fake_aws_key().lower()
    result = dlp.redact_body(messages("part one " + key[:10], key[10:]), JSON)
    assert [m.pattern for m in result.unredactable] == ["aws_access_key_id"]
    json.loads(result.text)


def test_what_is_cut_is_cut_even_when_something_else_is_unredactable():
    key, other = fake_aws_key(), fake_aws_key().lower()
    result = dlp.redact_body(messages(f"whole {key}", other[:10], other[10:]), JSON)
    assert key not in result.text and [m.pattern for m in result.redacted] == ["aws_access_key_id"]
    assert [m.pattern for m in result.unredactable] == ["aws_access_key_id"]


def test_plain_text_and_form_bodies():
    key = fake_aws_key()
    form = f"a=1&k=%41{key[1:]}&b=" + base64.b64encode(key.encode()).decode()
    result = dlp.redact_body(form, "application/x-www-form-urlencoded")
    assert result.text == "a=1&k=[REDACTED:aws_access_key_id]&b=[REDACTED:aws_access_key_id]"
    assert_clean(result, "application/x-www-form-urlencoded")
    header = dlp.redact_text(f"Bearer {fake_secrets()['github_token']}", "header:authorization")
    assert header.text == "Bearer [REDACTED:github_token]" and header.redacted[0].where == "header:authorization"


@pytest.mark.parametrize("body", ['{"broken": "KEY', '{"a": 1} trailing KEY'])
def test_json_that_does_not_parse_is_redacted_as_text(body):
    result = dlp.redact_body(body.replace("KEY", fake_aws_key()), JSON)
    assert "[REDACTED:aws_access_key_id]" in result.text
    assert_clean(result)


def test_a_json_body_too_large_to_parse_is_redacted_as_text(monkeypatch):
    monkeypatch.setattr(dlp, "MAX_JSON_CHARS", 100)
    key = fake_aws_key()
    result = dlp.redact_body(messages("x" * 200 + key), JSON)
    assert key not in result.text and json.loads(result.text)
    assert_clean(result)


def test_past_the_decode_bound_nothing_can_be_promised(monkeypatch):
    monkeypatch.setattr(dlp, "WORK_FACTOR", 0)
    monkeypatch.setattr(dlp, "WORK_FLOOR", 10)
    dlp.analyse.cache_clear()
    try:
        result = dlp.redact_body(messages(base64.b64encode(b"x" * 3000).decode()), JSON)
    finally:
        dlp.analyse.cache_clear()
    assert [m.pattern for m in result.unredactable] == [dlp.DECODE_LIMIT]


def test_nothing_redactable_is_ever_left():
    # Random bodies: random fakes in random encodings at random places; whatever redaction does,
    # a scan of its output finds only what it reported as unredactable.
    rng = random.Random()
    encoders = [lambda s: s, lambda s: base64.b64encode(s.encode()).decode(), lambda s: s.encode().hex(),
                lambda s: urllib.parse.quote(s, safe=""), lambda s: "".join(f"\\u{ord(c):04x}" for c in s),
                lambda s: s.lower()]
    for _ in range(60):
        fakes = list(fake_secrets().values())
        texts = []
        for _ in range(rng.randint(1, 6)):
            words = ["lorem", "ipsum", "dolor", "\n", "AKIAIOSFODNN7EXAMPLE"]
            words += [rng.choice(encoders)(rng.choice(fakes)) for _ in range(rng.randint(0, 3))]
            rng.shuffle(words)
            texts.append(" ".join(words))
        body = messages(*texts)
        result = dlp.redact_body(body, JSON)
        assert shape(json.loads(result.text)) == shape(json.loads(body))
        left = {m.pattern for m in dlp.scan_body_text(result.text, JSON)}
        assert left == {m.pattern for m in result.unredactable}
        assert "AKIAIOSFODNN7EXAMPLE" in result.text
