"""The live transport: each case sent from inside a running bottle, judged from the stand-in upstream.

The guest runs client.py (``python3 -c``, wire requests on stdin) through its own HTTPS_PROXY and
trust store; the stand-in upstream (tests/integration/upstream/server.py) logs what arrives; the
bundle log gives egress's decisions. What the upstream answers is set per case through ``serve``.

What this transport cannot see as the local one does, and how it makes do:

- DNS: the bundle resolves through the container engine's resolver, which logs nothing. A name
  counts as looked up when egress logged a decision that comes after resolution for the case
  (POST_RESOLUTION_REASONS, or an allow); a refusal before resolution must carry another reason.
- Private targets: every name of the site reaches the same upstream container on a private
  network, so an arrival whose Host the site marks private (Site.is_private_target) is a hit.
- The upstream's answer: known only when the upstream logs it (``served_status``, ``served_b64``).

What the stand-in upstream must do for this (not there yet; tests/integration/upstream/server.py):

- answer from RESPONSE_FILE when it holds a document (written by the test through ``docker exec -i``
  before each case; empty = the ordinary echo; the local upstream gives it to a case's first request
  only, every request works too): ``{"status", "headers": [[k, v]], "body_b64",
  "sse_b64": [event, ...] | null, "websocket": [message, ...]}``; SSE events are written one by one,
  each followed by a blank line, with no Content-Length, and the connection closed;
- on ``Upgrade: websocket`` (any path): answer 101, send the document's ``websocket`` messages as
  text frames, log each frame from the client as ``{"event": "ws", "path", "message"}``, answer close;
- read chunked request bodies too, and log ``body_b64`` (the raw body), ``served_status`` and
  ``served_b64`` (what it answered) with each request.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Callable, Protocol

from tests.corpus import client
from tests.corpus.cases import Case, RenderedCase, ServedResponse, Site, literal_address, split_url
from tests.corpus.outcome import Arrival, Exchange, Outcome

CLIENT_SOURCE = Path(client.__file__).read_text()
# egress decisions made after the host was resolved (docs/bundle-contract.md, decisions 5 to 8).
POST_RESOLUTION_REASONS = {"private_address", "dns_unresolvable", "dlp_match", "dlp_unavailable",
                           "token_requires_tls", "body_too_large", "compression_ratio"}
EGRESS_PREFIX = "[egress] "
RESPONSE_FILE = "/tmp/corpus-response.json"  # in the stand-in upstream's container


class LiveBottle(Protocol):
    """What the transport needs of a running bottle (tests/integration/conftest.py's Bottle has the
    first three)."""

    def exec(self, *cmd: str, input: str | None = None): ...

    def upstream_log(self) -> list[dict]: ...

    def bundle_log(self) -> str: ...


def response_document(served: ServedResponse | None) -> str:
    """The JSON the stand-in upstream serves for a case ("" = its ordinary echo)."""
    if served is None:
        return ""
    return json.dumps({"status": served.status, "headers": served.headers,
                       "body_b64": base64.b64encode(served.body).decode(),
                       "sse_b64": None if served.sse is None else [base64.b64encode(e).decode() for e in served.sse],
                       "websocket": served.websocket})


class LiveTransport:
    def __init__(self, bottle: LiveBottle, site: Site, serve: Callable[[str], None], *, mode: str):
        self.bottle, self.site, self.serve = bottle, site, serve
        self.mode = mode
        self.name = f"live-{mode}"

    def run(self, rendered: RenderedCase) -> Outcome:
        start = time.perf_counter()
        self.serve(response_document(rendered.response))
        upstream_seen = len(self.bottle.upstream_log())
        bundle_seen = len(self.bottle.bundle_log().splitlines())
        job = json.dumps({"wires": [wire.to_json() for wire in rendered.wires], "timeout": 15})
        proc = self.bottle.exec("python3", "-c", CLIENT_SOURCE, input=job)
        try:
            results = json.loads(proc.stdout)
        except ValueError:
            results = [[{"status": None, "headers": [], "body_b64": "", "error": "ClientFailed", "ws_received": [],
                         "url": f"{w.scheme}://{w.host}"}] for w in rendered.wires]
        exchanges = [[Exchange.from_client(x) for x in hops] for hops in results]
        seconds = time.perf_counter() - start
        time.sleep(0.2)  # the upstream's log line follows its answer
        arrivals = self._arrivals(self.bottle.upstream_log()[upstream_seen:])
        log = _egress_records(self.bottle.bundle_log().splitlines()[bundle_seen:])
        resolved = any(r.get("event") == "allow" or r.get("reason") in POST_RESOLUTION_REASONS for r in log)
        dns = [wire.host for wire in rendered.wires] if resolved else []
        return Outcome(exchanges, arrivals, dns, log, seconds)

    def _arrivals(self, records: list[dict]) -> list[Arrival]:
        arrivals: list[Arrival] = []
        for record in records:
            if record.get("event") == "request":
                headers = list((record.get("headers") or {}).items())
                host = next((v for k, v in headers if k.lower() == "host"), "")
                body = (base64.b64decode(record["body_b64"]) if "body_b64" in record
                        else record.get("body", "").encode())
                served = record.get("served_b64")
                arrivals.append(Arrival(
                    private=self.site.is_private_target(_hostname(host)),
                    method=record.get("method", ""), path=record.get("path", ""), host=host, headers=headers,
                    body=body, trailers=[tuple(t) for t in record.get("trailers", [])],
                    served_status=record.get("served_status"),
                    served_body=base64.b64decode(served) if served is not None else None))
            elif record.get("event") == "ws" and arrivals:
                arrivals[-1].ws_messages.append(record.get("message", ""))
        return arrivals


def live_agent(site: Site) -> dict:
    """The site's agent file for a live bottle: a route whose names are all public in the site is
    marked private_network, since the stand-in upstream answering for it sits on a private network.
    Routes aimed at private targets keep their setting, so egress still refuses them."""
    routes = []
    for route in site.agent["routes"]:
        public = all(address == "public" for address in site.addresses(route["host"]) or ["private"])
        routes.append({**route, "private_network": True} if public else dict(route))
    return {**site.agent, "routes": routes}


def live_aliases(site: Site, cases: list[Case]) -> list[str]:
    """Every name the stand-in upstream must answer to: the site's exact names and each fixed
    host a case uses. A templated host (a secret label, drawn per case) cannot be aliased and stays
    unresolvable, which egress reports as dns_unresolvable, after the lookup that leaks it."""
    names = {name for name in site.dns if not name.startswith("*.")}
    for case in cases:
        for request in case.requests:
            host = split_url(request["url"])[1].rstrip(".").lower()
            if "{{" not in host and site.addresses(host) is not None and literal_address(host) is None:
                names.add(host)
    return sorted(names)


def _hostname(authority: str) -> str:
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _egress_records(lines: list[str]) -> list[dict]:
    records = []
    for line in lines:
        if line.startswith(EGRESS_PREFIX + "{"):
            try:
                records.append(json.loads(line[len(EGRESS_PREFIX):]))
            except ValueError:
                continue
    return records
