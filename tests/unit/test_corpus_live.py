"""The corpus's live transport (tests/corpus/live.py) against a scripted bottle, and the client as the
guest runs it (``python3 -c``, wires on stdin, HTTPS_PROXY and SSL_CERT_FILE from the environment)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from tests.corpus import cases as corpus
from tests.corpus.cases import literal_address, load_site, render_case
from tests.corpus.live import CLIENT_SOURCE, LiveTransport, live_agent, live_aliases, response_document
from tests.unit.test_corpus_local import case, site, transport  # noqa: F401  (module fixtures)


class ScriptedBottle:
    """Answers like a live bottle: the guest's client output, then the logs grown by the case."""

    def __init__(self, exchanges: list, upstream_after: list[dict], egress_after: list[dict]):
        self.exchanges, self.upstream_after, self.egress_after = exchanges, upstream_after, egress_after
        self.ran = False
        self.jobs: list[dict] = []

    def exec(self, *cmd, input=None):
        assert cmd[:2] == ("python3", "-c") and cmd[2] == CLIENT_SOURCE
        self.jobs.append(json.loads(input))
        self.ran = True
        return subprocess.CompletedProcess(cmd, 0, json.dumps(self.exchanges), "")

    def upstream_log(self):
        return [{"event": "ready"}] + (self.upstream_after if self.ran else [])

    def bundle_log(self):
        lines = ["[init] started egress", '[egress] {"event": "start"}']
        return "\n".join(lines + ([f"[egress] {json.dumps(r)}" for r in self.egress_after] if self.ran else []))


def exchange(status, body=b"", headers=()):
    return {"status": status, "headers": [list(h) for h in headers], "body_b64": base64.b64encode(body).decode(),
            "error": "", "ws_received": [], "url": "https://docs.corpus.test"}


def test_the_live_transport_attributes_only_what_the_case_added():
    rendered = case("exfil-body", {"url": "https://docs.corpus.test/n", "body": "{{stolen_data}}"},
                    response={"body": "fine"})
    body = rendered.wires[0].body
    arrival = {"event": "request", "method": "POST", "path": "/n", "headers": {"Host": "docs.corpus.test"},
               "body_b64": base64.b64encode(body).decode(), "served_status": 200,
               "served_b64": base64.b64encode(b"fine").decode()}
    bottle = ScriptedBottle([[exchange(200, b"fine")]], [arrival, {"event": "ws", "message": "m"}],
                            [{"event": "allow", "host": "docs.corpus.test"}])
    served: list[str] = []
    outcome = LiveTransport(bottle, load_site(), served.append, mode="floor").run(rendered)
    assert json.loads(served[0])["body_b64"] == base64.b64encode(b"fine").decode()
    assert bottle.jobs[0]["wires"][0]["body_b64"] == base64.b64encode(body).decode()
    (got,) = outcome.arrivals
    assert got.body == body and got.served_body == b"fine" and got.ws_messages == ["m"] and not got.private
    assert outcome.log == [{"event": "allow", "host": "docs.corpus.test"}]
    assert outcome.dns_queries == ["docs.corpus.test"]  # an allow comes after resolution


def test_a_refusal_before_resolution_means_no_lookup_and_a_private_host_is_a_hit():
    rendered = case("ssrf", {"url": "http://metadata.corpus.test/latest/"})
    hit = {"event": "request", "method": "GET", "path": "/latest/", "headers": {"Host": "metadata.corpus.test"},
           "body": ""}
    refused = ScriptedBottle([[exchange(403)]], [], [{"event": "block", "reason": "route_not_allowed"}])
    assert LiveTransport(refused, load_site(), lambda d: None, mode="floor").run(rendered).dns_queries == []
    reached = ScriptedBottle([[exchange(200)]], [hit], [{"event": "allow"}])
    assert LiveTransport(reached, load_site(), lambda d: None, mode="floor").run(rendered).arrivals[0].private


def test_the_live_agent_keeps_ssrf_routes_public_and_aliases_only_fixed_names():
    site = load_site()
    routes = {r["host"]: r for r in live_agent(site)["routes"]}
    assert routes["docs.corpus.test"]["private_network"] and routes["*.wild.test"]["private_network"]
    assert not routes["metadata.corpus.test"].get("private_network")
    assert not routes["*.nopriv.test"].get("private_network")
    aliases = live_aliases(site, corpus.load_cases())
    assert "cdn.wild.test" in aliases and "docs.corpus.test" in aliases
    assert all("{{" not in a and literal_address(a) is None for a in aliases)
    assert response_document(None) == ""


def test_the_client_runs_as_the_guest_runs_it(transport):  # noqa: F811
    rendered = render_case(corpus._case({"id": "g", "category": "benign-web", "kind": "benign",
                                         "request": {"url": "https://docs.corpus.test/g", "json": {"a": 1}}}, "unit"))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HTTPS_PROXY=f"http://{transport.proxy[0]}:{transport.proxy[1]}",
               SSL_CERT_FILE=str(transport.tmp / "bottle-ca" / "ca.pem"))
    transport.upstream.begin(None)
    job = json.dumps({"wires": [w.to_json() for w in rendered.wires]})
    proc = subprocess.run([sys.executable, "-I", "-c", CLIENT_SOURCE], input=job, capture_output=True, text=True,
                          env=env, timeout=60)
    ((got,),) = json.loads(proc.stdout)
    assert got["status"] == 200, proc.stderr
    assert transport.upstream.settle()[0].body == rendered.wires[0].body
