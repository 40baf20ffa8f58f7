"""Reassembly (dlp.body_fields, reassembled, scan_fields, scan_request): a value split across fields
is seen whole, and a header's name is scanned as well as its value."""

from __future__ import annotations

import base64
import json
import random
import string
import urllib.parse

import pytest

from bottle_tasks.sidecars import dlp
from tests.unit.test_dlp import fake_aws_key, fake_secrets

FORM = "application/x-www-form-urlencoded"


def each_alone_is_clean(pieces: list[str]) -> None:
    for piece in pieces:
        assert dlp.scan_text(piece, "x") == [], "a piece matches on its own: this case proves nothing"


def split(secret: str, parts: int = 2) -> list[str]:
    step = -(-len(secret) // parts)
    return [secret[i:i + step] for i in range(0, len(secret), step)]


@pytest.mark.parametrize("case", ["upper", "lower"])
def test_a_key_split_across_form_fields(case):
    key = fake_aws_key() if case == "upper" else fake_aws_key().lower()
    pieces = split(key, 3)
    each_alone_is_clean(pieces)
    # The neighbours are letters, as in a real form: only the seams make the boundaries hold.
    body = f"user=Ann&a={pieces[0]}&b={pieces[1]}&c={pieces[2]}&next=More"
    assert dlp.scan_text(body, "body") == []
    for content_type in (FORM, ""):  # named, or sniffed
        assert [m.pattern for m in dlp.scan_body_text(body, content_type)] == ["aws_access_key_id"]


def test_a_form_name_repeated():
    pieces = split(fake_aws_key().lower())
    body = f"k={pieces[0]}&other=zz&k={pieces[1]}"
    assert dlp.scan_text(body, "body") == []
    assert [m.pattern for m in dlp.scan_body_text(body, FORM)] == ["aws_access_key_id"]


def test_a_key_split_across_messages_api_content_blocks():
    # In document order the pieces have "type": "text" between them; the values of "text" join.
    pieces = split(fake_aws_key().lower())
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "here it comes: " + pieces[0]}, {"type": "text", "text": pieces[1]},
        {"type": "text", "text": "Thanks"}]}]})
    assert dlp.scan_text(body, "body") == []
    assert [m.pattern for m in dlp.scan_body_text(body, "application/json")] == ["aws_access_key_id"]


@pytest.mark.parametrize("name", ["github_token", "anthropic_api_key", "slack_token", "google_api_key"])
def test_other_keys_split_across_json_strings_between_letters(name):
    secret = fake_secrets()[name]
    pieces = [secret[:9], secret[9:]]  # the prefix and a little: some tails have no upper bound
    each_alone_is_clean(pieces)
    body = json.dumps(["Hello", pieces[0], pieces[1], "World"])
    assert name in [m.pattern for m in dlp.scan_body_text(body, "application/json")]


def test_a_key_split_across_json_keys():
    pieces = split(fake_aws_key())
    body = json.dumps({pieces[0]: 1, pieces[1]: 2})
    assert dlp.scan_text(body, "body") == []
    assert [m.pattern for m in dlp.scan_body_text(body, "application/vnd.api+json")] == ["aws_access_key_id"]


def test_a_base64_key_split_across_fields_each_encoded_on_its_own():
    # Each piece is too short to be a base64 run; the fields decoded whole join up.
    pieces = [base64.b64encode(piece.encode()).decode() for piece in split(fake_aws_key())]
    body = json.dumps({"a": pieces[0], "b": pieces[1]})
    assert dlp.scan_text(body, "body") == []
    assert [m.pattern for m in dlp.scan_body_text(body, "application/json")] == ["aws_access_key_id"]


def test_a_json_key_and_its_value_read_together():
    value = fake_secrets()["aws_secret_access_key"].split(" = ")[1]
    body = json.dumps({"AWS_SECRET_ACCESS_KEY": value}, indent=4)
    assert [m.pattern for m in dlp.scan_body_text(body, "application/json")] == ["aws_secret_access_key"]


def test_json_escapes_are_decoded_in_each_string():
    key = fake_aws_key()
    body = '{"v": "' + "".join(f"\\u{ord(char):04x}" for char in key) + '"}'
    fields = list(dlp.body_fields(body, "application/json"))
    assert [field.text for field in fields] == ["v", key]
    assert [m.pattern for m in dlp.scan_body_text(body, "application/json")] == ["aws_access_key_id"]


def test_a_key_split_across_multipart_fields():
    pieces = split(fake_aws_key())
    body = "".join(f'--XyZ\r\nContent-Disposition: form-data; name="p{i}"\r\n\r\n{piece}\r\n'
                   for i, piece in enumerate(pieces)) + "--XyZ--\r\n"
    assert dlp.scan_text(body, "body") == []
    assert [m.pattern for m in dlp.scan_body_text(body, "multipart/form-data; boundary=XyZ")] == ["aws_access_key_id"]


@pytest.mark.parametrize("url", ["{host}/upload/{0}/{1}", "{host}/upload?a={0}&b={1}", "{host}/x?a={0}&a={1}"])
def test_a_key_split_across_url_segments_and_query_fields(url):
    pieces = split(fake_aws_key().lower())
    parts = dlp.RequestParts(url.format(*pieces, host="files.example.com"), (), "")
    assert dlp.scan_text(parts.url, "url") == []
    assert [(m.pattern, m.where) for m in dlp.scan_request(parts)] == [("aws_access_key_id", "url")]


def test_a_key_split_across_two_headers():
    pieces = split(fake_aws_key())
    parts = dlp.RequestParts("example.com/", (("X-A", pieces[0]), ("X-B", pieces[1]), ("Accept", "*/*")), "")
    assert [(m.pattern, m.where) for m in dlp.scan_request(parts)] == [("aws_access_key_id", "headers")]


def test_a_secret_in_a_header_name_is_found_and_never_named():
    key = fake_aws_key()
    parts = dlp.RequestParts("example.com/", (("Accept", "*/*"), (f"X-{key}", "1"), (base64.b64encode(key.encode()).decode(), "")), "")
    matches = dlp.scan_request(parts)
    assert [(m.pattern, m.where) for m in matches] == [("aws_access_key_id", "header-name:#1"),
                                                       ("aws_access_key_id", "header-name:#2")]
    assert not any(key in repr(match) or "X-" + key[:6] in repr(match) for match in matches)


def test_a_value_under_a_suspect_header_name_is_reported_by_index():
    key = fake_aws_key()
    other = fake_secrets()["github_token"]
    matches = dlp.scan_request(dlp.RequestParts("example.com/", ((key, other), ("X-Ok", other)), ""))
    assert ("github_token", "header:#0") in [(m.pattern, m.where) for m in matches]
    assert ("github_token", "header:x-ok") in [(m.pattern, m.where) for m in matches]
    assert all(key not in m.where for m in matches)


def test_the_body_is_read_by_its_content_type():
    pieces = split(fake_aws_key())
    body = urllib.parse.urlencode({"a": pieces[0], "b": pieces[1]})
    headers = (("Content-Type", FORM),)
    assert [m.pattern for m in dlp.scan_request(dlp.RequestParts("example.com/", headers, body))] == ["aws_access_key_id"]


def test_fields_keep_their_places_in_the_body():
    body = json.dumps({"key": "va\\lue", "n": [1, "two"]})
    for field in dlp.body_fields(body, "application/json"):
        assert json.loads(body[slice(*field.span)]) == field.text
    form = "a=1&b=x%20y"
    assert [(f.text, form[slice(*f.span)]) for f in dlp.body_fields(form, FORM)] == \
        [("a", "a"), ("1", "1"), ("b", "b"), ("x y", "x%20y")]


def test_long_fields_join_only_by_their_ends():
    long_value = "word " * 10_000
    joined = dlp.reassembled([dlp.Field(long_value, (0, 0)), dlp.Field("x", (0, 0))])
    assert len(joined) < 2 * dlp.FIELD_EDGE + 100
    assert dlp.reassembled([dlp.Field("only one", (0, 0))]) is None


def test_a_joined_text_decodes_only_across_seams_and_never_stands_in_for_plain_text():
    # Inside one field the run was decoded when the field was scanned alone; the same characters
    # as plain text must still be decoded in full (the analysis cache must not mix them up).
    plain = f"x {base64.b64encode(fake_aws_key().encode()).decode()} y"
    assert dlp.scan_text(dlp.JoinedText(plain, [0, len(plain)]), "body") == []
    assert [m.pattern for m in dlp.scan_text(plain, "body")] == ["aws_access_key_id"]


def _aws_secret() -> str:
    return "".join(random.choice(string.ascii_letters + string.digits + "/+") for _ in range(40))


@pytest.mark.parametrize("shape", ["form, name first", "form, value first", "form, value in base64", "env list", "env list, reversed"])
def test_a_secret_whose_name_rides_in_the_next_field_is_found(shape):
    secret = _aws_secret()
    b64 = base64.b64encode(secret.encode()).decode()
    body, content_type = {
        "form, name first": (urllib.parse.urlencode({"n": "aws_secret_access_key", "s": secret}), dlp.FORM_MEDIA),
        "form, value first": (urllib.parse.urlencode({"s": secret, "n": "AWS_SECRET_ACCESS_KEY"}), dlp.FORM_MEDIA),
        "form, value in base64": (urllib.parse.urlencode({"s": b64, "n": "aws_secret_access_key"}), dlp.FORM_MEDIA),
        "env list": (json.dumps({"environment": [{"name": "AWS_SECRET_ACCESS_KEY", "value": secret}]}), "application/json"),
        "env list, reversed": (json.dumps([{"value": secret, "name": "aws_secret_access_key"}]), "application/json"),
    }[shape]
    assert [m.pattern for m in dlp.scan_body_text(body, content_type)] == ["aws_secret_access_key"], body


def test_a_secrets_name_beside_ordinary_values_is_not_a_finding():
    body = json.dumps({"environment": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": "arn:aws:ssm:eu-west-1:123456789012:parameter/prod/aws-secret"},
                                       {"name": "LOG_LEVEL", "value": "info"}]})
    assert dlp.scan_body_text(body, "application/json") == []
