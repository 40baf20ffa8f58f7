"""The built-in floor's rules (bottle_tasks.sidecars.dlp): each pattern, case, documentation keys.

Every "secret" here is generated at random from a provider's prefix and alphabet, never a real
credential. The generators are shared by the other test_dlp_* files.
"""

from __future__ import annotations

import json
import secrets
import string

import pytest

from bottle_tasks.sidecars import dlp

BASE32 = string.ascii_uppercase + "234567"
ALNUM = string.ascii_letters + string.digits


def random_text(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def fake_aws_key() -> str:
    return "AKIA" + random_text(BASE32, 16)


def fake_secrets() -> dict[str, str]:
    """A fresh fake of every pattern, each to stand alone between spaces."""
    return {
        "aws_access_key_id": fake_aws_key(),
        "aws_secret_access_key": "aws_secret_access_key = " + random_text(ALNUM + "/+", 40),
        "github_token": "ghp_" + random_text(ALNUM, 36),
        "github_pat": "github_pat_" + random_text(ALNUM + "_", 82),
        "anthropic_api_key": "sk-ant-api03-" + random_text(ALNUM + "_-", 93),
        "openai_api_key": "sk-proj-" + random_text(ALNUM, 48),
        "slack_token": "xoxb-" + random_text(string.digits, 12) + "-" + random_text(ALNUM, 24),
        "slack_webhook": "https://hooks.slack.com/services/T" + random_text(BASE32, 8) + "/B" + random_text(BASE32, 10)
                         + "/" + random_text(ALNUM, 24),
        "private_key": "-----BEGIN RSA PRIVATE KEY-----",
        "google_api_key": "AIza" + random_text(ALNUM + "_-", 35),
        "stripe_key": "sk_live_" + random_text(ALNUM, 24),
        "gitlab_token": "glpat-" + random_text(ALNUM + "_-", 20),
        "npm_token": "npm_" + random_text(ALNUM, 36),
        "pypi_token": "pypi-AgEIcHlwaS5vcmc" + random_text(ALNUM + "_-", 60),
        "huggingface_token": "hf_" + random_text(string.ascii_letters, 34),
        "sendgrid_api_key": "SG." + random_text(ALNUM + "_-", 22) + "." + random_text(ALNUM + "_-", 43),
    }


def names(text: str) -> list[str]:
    return dlp.matching_pattern_names(text)


def test_every_pattern_has_a_fake():
    assert set(fake_secrets()) == set(dlp.PATTERN_NAMES) == {name for name, _ in dlp.BUILTIN_PATTERNS}


@pytest.mark.parametrize("name", dlp.PATTERN_NAMES)
def test_each_pattern_matches_its_fake_and_only_it(name):
    secret = fake_secrets()[name]
    assert dlp.scan_text(f"some text {secret} more", "body") == [dlp.DlpMatch(name, "body")]


@pytest.mark.parametrize("name", dlp.PATTERN_NAMES)
def test_builtin_patterns_say_what_the_scanner_matches_in_plain_text(name):
    # BUILTIN_PATTERNS is the documentation of each rule as one regex: it must agree.
    secret = fake_secrets()[name]
    assert any(pattern.search(f" {secret} ") for pattern_name, pattern in dlp.BUILTIN_PATTERNS if pattern_name == name)


def test_the_span_is_the_secret():
    key = fake_aws_key()
    text = f"id {key} and aws_secret_access_key = {random_text(ALNUM, 40)}."
    spans = {match.pattern: match.span for match in dlp.scan_text(text, "body")}
    assert text[slice(*spans["aws_access_key_id"])] == key
    start, end = spans["aws_secret_access_key"]
    assert end - start == 40 and text[end] == "."  # the value, not the name before it


def test_private_key_headers_of_every_kind_and_case():
    for header in ("-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----",
                   "-----BEGIN PRIVATE KEY-----", "-----BEGIN ENCRYPTED PRIVATE KEY-----",
                   "-----BEGIN PGP PRIVATE KEY BLOCK-----", "-----begin rsa private key-----",
                   "-----BEGIN+RSA+PRIVATE+KEY-----"):  # a form body writes spaces as "+"
        assert names(header) == ["private_key"], header


def test_anthropic_key_is_not_also_an_openai_key():
    assert names(fake_secrets()["anthropic_api_key"]) == ["anthropic_api_key"]


@pytest.mark.parametrize("spelling", ["AWS_SECRET_ACCESS_KEY=", "aws-secret-key: ", '"SecretAccessKey": "',
                                      'aws_secret_access_key\\": \\"', "secret_access_key = '"])
def test_aws_secret_key_spellings(spelling):
    # The last but one is JSON inside a JSON string (escaped quotes), as a tool result carries it.
    assert names(spelling + random_text(ALNUM + "/+", 40) + '"') == ["aws_secret_access_key"]


def test_an_aws_key_id_in_lower_case_still_matches():
    # IDs are upper-case base32: a receiver can upper-case a lower-cased one.
    key = fake_aws_key()
    assert names(key.lower()) == ["aws_access_key_id"]
    assert names(f"/upload/{key.lower()}/more") == ["aws_access_key_id"]  # next to slashes, in a path
    mixed = "".join(char.lower() if i % 2 else char for i, char in enumerate(key))
    assert names(f"id={mixed}&x=1") == ["aws_access_key_id"]


def test_an_aws_key_id_with_a_character_added_still_matches():
    # The receiver drops the extra character; the upper-case ID needs no boundary to be precise.
    key = fake_aws_key()
    assert names(f"X{key}Z") == ["aws_access_key_id"]


@pytest.mark.parametrize("text", [
    "bottle-placeholder-ANTHROPIC_API_KEY",
    "ANTHROPIC_API_KEY=bottle-placeholder-ANTHROPIC_API_KEY",
    "AKIA" + "Z" * 15,  # too short
    "task-ant-colony and sk-short",
    "the public key: -----BEGIN PUBLIC KEY-----",
    "aws_secret_access_key = <redacted>",
    "password = hunter2",
    "eastasiastorageaccount0",  # lower-case "asia", but not base32 after it
    "southeastasia2region7abcdefgh and asiaregions",
    '{"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hello"}]}',
])
def test_ordinary_text_is_clean(text):
    assert dlp.scan_text(text, "body") == []


@pytest.mark.parametrize("example", sorted(dlp.DOCUMENTATION_KEYS))
def test_documentation_keys_are_not_secrets(example):
    assert dlp.is_documentation_example(example)
    for text in (example, f"export KEY={example}", f"aws_secret_access_key = {example}",
                 json.dumps({"AccessKeyId": example, "SecretAccessKey": example})):
        assert names(text) == [], text


def test_documentation_keys_in_lower_case_and_next_to_live_ones():
    assert names("akiaiosfodnn7example") == []
    assert dlp.is_documentation_example("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    key = fake_aws_key()
    assert names(f"AKIAIOSFODNN7EXAMPLE {key}") == ["aws_access_key_id"]
    assert names(f"AKIAIOSFODNN7EXAMPLE{key}") == ["aws_access_key_id"]


def test_a_live_key_dressed_as_a_documentation_key_is_still_a_secret():
    # Only whole documented keys are exempt: a suffix such as EXAMPLE(KEY) proves nothing.
    live = random_text(ALNUM + "/+", 30) + "EXAMPLEKEY"
    assert not dlp.is_documentation_example(live)
    assert names(f"aws_secret_access_key = {live}") == ["aws_secret_access_key"]
    assert names("AKIA" + random_text(BASE32, 9) + "EXAMPLE") == ["aws_access_key_id"]


def test_matches_never_carry_the_secret():
    for secret in fake_secrets().values():
        for match in dlp.scan_text(secret, "header:x-foo"):
            assert secret not in repr(match)


def test_redact_for_log_lines_removes_every_match():
    text = " ".join(fake_secrets().values())
    redacted = dlp.redact(text)
    assert dlp.scan_text(redacted, "x") == []
    assert "[REDACTED:aws_access_key_id]" in redacted


def test_scan_request_reports_where():
    fakes = fake_secrets()
    key = fake_aws_key()
    parts = dlp.RequestParts(
        url=f"example.com/p?key={key}",
        headers=(("X-Leak", fakes["github_token"]), ("Accept", "*/*")),
        body=json.dumps({"k": fakes["slack_token"]}),
    )
    assert dlp.scan_request(parts) == [
        dlp.DlpMatch("aws_access_key_id", "url"),
        dlp.DlpMatch("github_token", "header:x-leak"),
        dlp.DlpMatch("slack_token", "body"),
    ]


@pytest.mark.parametrize("value", ["your-access-key-id", "ghp_your_token_here", "sk-...", "<your token>", "${GITHUB_TOKEN}",
                                   "xxxxxxxx", "********", "changeme", "'replace-me'", "{{ api_key }}"])
def test_templates_stand_ins_are_not_secrets(value):
    assert dlp.is_template_value(value)


@pytest.mark.parametrize("value", ["hunter22", "my-secret-dog", "correct-horse-battery", "your_AKIA2345ABCD", "$AKIAIOSFODNN",
                                   "<AbCdEf>", "your-token-1", "sk-proj-abc", "example1"])
def test_values_that_could_be_real_are_not_stand_ins(value):
    assert not dlp.is_template_value(value)


@pytest.mark.parametrize("name", ["github_token", "github_pat", "anthropic_api_key", "openai_api_key", "slack_token",
                                  "stripe_key", "gitlab_token", "npm_token", "sendgrid_api_key"])
def test_a_token_glued_to_a_word_by_a_dash_or_underscore_still_matches(name):
    token = fake_secrets()[name]
    for glued in (f"agent-{token}", f"client_{token}"):
        assert name in names(glued), glued
