"""The corpus's local transport end to end: the real egress (subprocess) between the corpus client and
the fake upstreams, all on 127.0.0.1, with the harness resolver and dialler (tests/corpus/local.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from tests.corpus import cases as corpus
from tests.corpus.cases import load_site, render_case
from tests.corpus.cases import literal_address
from tests.corpus.egress_harness import REFUSED, harness_egress, lookup
from tests.corpus.judge import judge
from tests.corpus.local import LocalTransport
from tests.unit.test_egress import make_config, SECRETS


def case(category: str, request: dict, *, kind: str = "malicious", response: dict | None = None):
    raw = {"id": f"unit-{category}", "category": category, "kind": kind, "request": request}
    if response is not None:
        raw["response"] = response
    return render_case(corpus._case(raw, "unit"))


@pytest.fixture(scope="module")
def site():
    return load_site()


@pytest.fixture(scope="module")
def transport(site, tmp_path_factory):
    with LocalTransport(site, workdir=tmp_path_factory.mktemp("corpus")) as running:
        yield running


def test_a_benign_fetch_arrives_and_comes_back_intact(transport, site):
    rendered = case("benign-web", {"url": "https://docs.corpus.test/guide?v={{uuid}}", "headers": {"X-Trace": "{{sha1}}"}},
                    kind="benign", response={"body": "<p>{{lorem:3000}}</p>"})
    outcome = transport.run(rendered)
    (arrival,) = outcome.arrivals
    assert not arrival.private and arrival.path == rendered.wires[0].target
    assert outcome.exchanges[0][0].body == rendered.response.body
    assert [r["event"] for r in outcome.log] == ["connect", "allow"]
    assert judge(rendered, outcome, site).detail == "passed"


def test_what_egress_forwards_is_judged_out_and_what_it_blocks_contained(transport, site):
    # Data no pattern can know: egress forwards it, and the judge must see that it got out.
    leaked = case("exfil-body", {"url": "https://docs.corpus.test/notes", "body": "{{stolen_data}}"})
    verdict = judge(leaked, transport.run(leaked), site)
    assert not verdict.contained and "stolen_data reached the upstream (body)" in verdict.detail
    stopped = case("exfil-url", {"url": "https://docs.corpus.test/q?k={{aws_key}}"})
    outcome = transport.run(stopped)
    assert outcome.arrivals == [] and outcome.exchanges[0][0].block_reason == "dlp_match"
    assert judge(stopped, outcome, site).contained


def test_names_egress_resolves_are_recorded_and_private_addresses_reach_only_the_private_upstream(transport, site):
    named = case("exfil-hostname", {"url": "https://{{stolen_data}}.wild.test/"})
    outcome = transport.run(named)
    assert outcome.dns_queries == []  # refused before anything resolved it
    assert judge(named, outcome, site).contained
    ordinary = case("benign-hostname", {"url": "https://www.wild.test/"}, kind="benign")
    outcome = transport.run(ordinary)
    assert outcome.dns_queries == ["www.wild.test"]
    ssrf = case("ssrf", {"url": "http://metadata.corpus.test/latest/meta-data/"})
    outcome = transport.run(ssrf)
    assert outcome.arrivals == [] and outcome.exchanges[0][0].block_reason == "private_address"
    routed = case("benign-web", {"url": "https://intranet.corpus.test/login"}, kind="benign")
    (arrival,) = transport.run(routed).arrivals  # private_network route: egress lets it through
    assert arrival.private


def test_websocket_messages_cross_both_ways(transport, site):
    rendered = case("benign-websocket", {"url": "wss://mcp.corpus.test/ws", "websocket": {"send": ["a {{uuid}}", "b"],
                                                                                           "receive": 1}},
                    kind="benign", response={"websocket": ["hello {{sha1}}"]})
    outcome = transport.run(rendered)
    assert outcome.arrivals[0].ws_messages == rendered.wires[0].websocket["send"]
    assert outcome.exchanges[0][0].ws_received == rendered.response.websocket
    assert judge(rendered, outcome, site).detail == "passed"


# -- the harness's resolver and dialler, without a proxy ---------------------------------------


def test_the_harness_dialler_refuses_every_address_outside_its_table():
    addon_class = harness_egress({"dns": {"*.example.com": ["93.184.215.14"]},
                                  "dial": {"93.184.215.14|443": ["127.0.0.1", 1]}})
    addon = addon_class(make_config(), SECRETS, emit=lambda record: None)
    addon._pins[("www.example.com", 443)] = "93.184.215.14"
    addon._pins[("other.example.com", 443)] = "93.184.215.99"
    mapped = SimpleNamespace(server=SimpleNamespace(address=("www.example.com", 443), error=None, id="s1"))
    addon.server_connect(mapped)
    assert mapped.server.address == ("127.0.0.1", 1) and mapped.server.error is None
    unmapped = SimpleNamespace(server=SimpleNamespace(address=("other.example.com", 443), error=None, id="s2"))
    addon.server_connect(unmapped)
    assert unmapped.server.error == REFUSED
    assert asyncio.run(addon.resolve("www.example.com", 443)) == ["93.184.215.14"]
    assert asyncio.run(addon.resolve("nx.other.test", 443)) == []


def test_the_harness_resolver_reads_literals_as_getaddrinfo_does():
    assert literal_address("2852039166") == literal_address("0251.0376.0251.0376") == "169.254.169.254"
    assert literal_address("0xa9fea9fe") == "169.254.169.254" and literal_address("::ffff:a9fe:a9fe") == "::ffff:a9fe:a9fe"
    assert literal_address("docs.corpus.test") is None
    table = {"*.wild.test": ["1"], "*.deep.wild.test": ["2"], "exact.wild.test": ["3"]}
    assert [lookup(table, h) for h in ("a.wild.test", "a.deep.wild.test", "exact.wild.test.", "wild.test")] == \
        [["1"], ["2"], ["3"], []]


PIPELOCK = os.environ.get("BOTTLE_PIPELOCK_BIN") or shutil.which("pipelock")


@pytest.mark.skipif(not PIPELOCK, reason="no pipelock binary (BOTTLE_PIPELOCK_BIN)")
def test_pipelock_mode_puts_the_real_scan_api_behind_egress(site, tmp_path):
    with LocalTransport(site, pipelock_bin=PIPELOCK, workdir=tmp_path) as running:
        routes = json.loads((running.tmp / "routes.yaml").read_text())
        assert routes["pipelock_scan_url"].startswith("http://127.0.0.1:") and routes["upstream_proxy"] == ""
        rendered = case("benign-web", {"url": "https://docs.corpus.test/api", "json": {"id": "{{uuid}}"}}, kind="benign")
        outcome = running.run(rendered)
        # egress fails closed (403 dlp_unavailable) when it cannot get pipelock's verdict
        assert outcome.exchanges[0][0].status == 200 and len(outcome.arrivals) == 1
