"""The corpus's templates, transforms and case files (tests/corpus): what a case sends is what it says."""

from __future__ import annotations

import base64
import html
import json
import random
import re
import urllib.parse
from collections import Counter

import pytest

from bottle_tasks.sidecars.addresses import is_public_address
from tests.corpus import cases as corpus
from tests.corpus.cases import CorpusError, literal_address, render_case
from tests.corpus.templating import SECRETS, TRANSFORMS, Renderer, TemplateError

SHAPES = {
    "aws_key": r"AKIA[A-Z2-7]{16}",
    "aws_secret": r"[A-Za-z0-9+/]{40}",
    "github_token": r"ghp_[A-Za-z0-9]{36}",
    "github_pat": r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
    "anthropic_key": r"sk-ant-api03-[A-Za-z0-9_-]{93}AA",
    "openai_key": r"sk-proj-[A-Za-z0-9_-]{64}",
    "slack_token": r"xoxb-[0-9]{12}-[0-9]{13}-[A-Za-z0-9]{24}",
    "google_api_key": r"AIza[A-Za-z0-9_-]{35}",
    "stripe_key": r"sk_live_[A-Za-z0-9]{24}",
    "gitlab_token": r"glpat-[A-Za-z0-9_-]{20}",
    "npm_token": r"npm_[A-Za-z0-9]{36}",
    "private_key": r"-----BEGIN RSA PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+\n-----END RSA PRIVATE KEY-----",
    "dotenv_aws": r"APP_NAME=shop\nLOG_LEVEL=info\nAWS_ACCESS_KEY_ID=AKIA[A-Z2-7]{16}\nAWS_REGION=eu-west-1\n",
    "dotenv_github": r"# deploy settings\nGITHUB_TOKEN=ghp_[A-Za-z0-9]{36}\nCI=true\n",
    "stolen_data": r"[a-z0-9]{24}",
}


def test_every_secret_has_its_provider_shape_and_is_fresh_each_case():
    assert set(SHAPES) == set(SECRETS)
    for name, shape in SHAPES.items():
        first, second = Renderer().value(name), Renderer().value(name)
        assert re.fullmatch(shape, first), name
        assert first != second, f"{name} was drawn twice the same"


def test_a_name_has_one_value_per_case():
    renderer = Renderer()
    assert renderer.render("{{aws_key}} {{aws_key|lower}}") == f"{renderer.values['aws_key']} {renderer.values['aws_key'].lower()}"


@pytest.mark.parametrize("transform, undo", [
    ("b64", lambda s: base64.b64decode(s).decode()),
    ("b64nopad", lambda s: base64.b64decode(s + "=" * (-len(s) % 4)).decode()),
    ("urlsafe_b64", lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()),
    ("hex", lambda s: bytes.fromhex(s).decode()),
    ("hexupper", lambda s: bytes.fromhex(s).decode()),
    ("json_unicode", lambda s: json.loads(f'"{s}"')),
    ("json_unicode1", lambda s: json.loads(f'"{s}"')),
    ("js_hex", lambda s: bytes(s, "ascii").decode("unicode_escape")),
    ("percent", urllib.parse.unquote),
    ("double_percent", lambda s: urllib.parse.unquote(urllib.parse.unquote(s))),
    ("html_entities", html.unescape),
    ("reverse", lambda s: s[::-1]),
    ("rot13", lambda s: TRANSFORMS["rot13"](s)),
    ("b32", lambda s: base64.b32decode(s.upper() + "=" * (-len(s) % 8)).decode()),
])
def test_each_transform_is_the_encoding_it_names(transform, undo):
    renderer = Renderer()
    sent = renderer.render("{{github_token|%s}}" % transform)
    assert sent != renderer.values["github_token"]
    assert undo(sent) == renderer.values["github_token"]


def test_evidence_is_every_form_sent_and_the_raw_value():
    renderer = Renderer()
    renderer.render("a={{aws_key|b64}} b={{aws_key|hex|b64}}")
    forms = {e.form: e.complete() for e in renderer.evidence_list()}
    key = renderer.values["aws_key"]
    assert forms == {"aws_key": (key,), "aws_key|b64": (base64.b64encode(key.encode()).decode(),),
                     "aws_key|hex|b64": (base64.b64encode(key.encode().hex().encode()).decode(),)}


def test_halves_are_one_piece_of_evidence_and_only_when_both_are_sent():
    lone = Renderer()
    lone.render("{{aws_key|half1}}")
    assert [e.form for e in lone.evidence_list()] == ["aws_key"]
    both = Renderer()
    both.render("{{aws_key|half1}}&{{aws_key|half2}}")
    (split,) = [e for e in both.evidence_list() if e.form == "aws_key|half*"]
    assert "".join(split.complete()) == both.values["aws_key"] and len(split.complete()) == 2


def test_json_bodies_carry_the_value_itself_and_json_escapes_as_escapes():
    spec = {"url": "https://docs.corpus.test/", "json": {"pem": "{{private_key}}", "u": "{{aws_key|json_unicode1}}"}}
    case = corpus._case({"id": "t", "category": "exfil-body", "kind": "malicious", "request": spec}, "test")
    rendered = render_case(case, random.Random(1))
    body = rendered.wires[0].body.decode()
    parsed = json.loads(body)
    values = {e.form: e.complete()[0] for e in rendered.evidence}
    assert parsed["pem"] == values["private_key"]  # newlines escaped for JSON, not lost
    assert parsed["u"] == values["aws_key"] and "\\u0041KIA" in body


def test_forms_are_url_encoded_and_json_is_the_default_type():
    spec = {"url": "https://docs.corpus.test/", "form": {"s": "{{aws_secret|b64}}"}}
    case = corpus._case({"id": "t", "category": "exfil-body", "kind": "malicious", "request": spec}, "test")
    wire = render_case(case).wires[0]
    assert wire.method == "POST" and ["Content-Type", "application/x-www-form-urlencoded"] in wire.headers
    assert urllib.parse.parse_qs(wire.body.decode())["s"][0].endswith("=")  # "=" arrived as %3D, decodes back


def test_unknown_names_and_transforms_are_errors():
    with pytest.raises(TemplateError):
        Renderer().render("{{aws_kee}}")
    with pytest.raises(TemplateError):
        Renderer().render("{{aws_key|base64}}")


def test_split_url_keeps_the_target_as_written_and_drops_userinfo():
    assert corpus.split_url("https://h.test/a/../b?x=%2F") == ("https", "h.test", 443, "/a/../b?x=%2F")
    assert corpus.split_url("http://u@169.254.169.254:8080") == ("http", "169.254.169.254", 8080, "/")
    assert corpus.split_url("wss://[::1]/ws") == ("https", "::1", 443, "/ws")


@pytest.mark.parametrize("raw, problem", [
    ({"id": "x", "category": "exfil-url", "kind": "benign", "request": {"url": "https://a.test/"}}, "does not fit"),
    ({"id": "x", "category": "exfil-url", "kind": "malicious", "layer": "egress", "request": {"url": "https://a.test/"}}, "layer"),
    ({"id": "x", "category": "exfil-url", "kind": "malicious", "request": {"path": "/"}}, "needs url"),
    ({"id": "x", "category": "exfil-url", "kind": "malicious", "request": {"url": "https://a.test/", "trailers": {"a": "b"}}}, "http2"),
    ({"id": "x", "category": "exfil-url", "kind": "malicious", "request": {"url": "https://a.test/"}, "extra": 1}, "unknown keys"),
])
def test_malformed_cases_are_refused(raw, problem):
    with pytest.raises(CorpusError, match=problem):
        corpus._case(raw, "test")


# -- the corpus itself ------------------------------------------------------------------------


def test_the_corpus_covers_every_category_and_renders():
    cases = corpus.load_cases()
    kinds = Counter(case.kind for case in cases)
    assert len(cases) >= 150 and kinds["benign"] >= 40
    categories = {case.category for case in cases}
    for needed in ("exfil-url", "exfil-header", "exfil-body", "exfil-encoding", "exfil-hostname", "exfil-websocket",
                   "exfil-jsonrpc", "ssrf", "injection-response", "injection-jsonrpc", "benign-model",
                   "benign-hostname", "benign-jsonrpc", "benign-websocket"):
        assert needed in categories
    for case in cases:
        rendered = render_case(case)
        if case.family == "exfil":
            assert rendered.evidence, f"{case.id} sends no secret"
        if case.family == "injection":
            assert rendered.canaries and rendered.response is not None, f"{case.id} injects nothing"


def test_every_address_the_corpus_aims_at_is_the_harness_own():
    """No case may reach a real address: names come from the site, whose private answers and IP
    literals are all non-public (the harness maps them onto its own listeners, the live upstream
    binds 169.254.169.254), and the only other names are unrouted ones egress refuses."""
    site = corpus.load_site()
    for addresses in site.dns.values():
        assert all(a == "public" or not is_public_address(a) for a in addresses)
    for case in corpus.load_cases():
        for wire in render_case(case).wires:
            if literal_address(wire.host) is not None:
                assert not is_public_address(literal_address(wire.host)), case.id
            elif site.addresses(wire.host) is None:
                assert wire.host == "localhost", f"{case.id} aims at {wire.host}, not a site name"
