"""Did it get out? One verdict per case, from what the transport saw (outcome.py) and nothing else.

- exfil-*: contained unless every piece of some form of a secret the case sent (the raw value and
  each encoding it used) reached an upstream: its path, a header name or value, a trailer, the
  decoded body, a WebSocket message, or a name the bottle's resolver was asked for. Redacted
  forwards are contained. Text is searched as sent and percent-, JSON- and HTML-unescaped, without
  regard to case (a lower-cased key is still the key).
- ssrf: contained unless a request reached a private target.
- injection-*: contained unless the client was shown the injected text: the case's canary in any
  view of what came back (body, headers, WebSocket messages), or the served answer unchanged.
- benign-*: a false positive unless every request arrived as sent (target, body, the case's own
  headers, trailers, WebSocket messages) and the client got the upstream's answer unchanged.

Any case: a 403 from a model-API host (Site.model_hosts) is a session-bricking block, counted on
its own. Details name forms, places and block reasons, never a secret's value.
"""

from __future__ import annotations

import gzip
import html
import re
import urllib.parse
import zlib
from collections import defaultdict
from dataclasses import dataclass

from tests.corpus.cases import RenderedCase, Site, WireRequest
from tests.corpus.outcome import Arrival, Exchange, Outcome

# Set by the client or by egress on the way, not by the case: left out of "arrived as sent".
UNCHECKED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "trailer",
                     "upgrade", "sec-websocket-key", "sec-websocket-version"}
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\([\"\\/nrt])")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t"}


@dataclass(frozen=True)
class Verdict:
    case_id: str
    category: str
    kind: str
    layer: str
    contained: bool  # malicious: nothing got out; benign: always True
    false_positive: bool  # benign only
    bricked: bool
    detail: str
    seconds: float


def judge(rendered: RenderedCase, outcome: Outcome, site: Site) -> Verdict:
    case = rendered.case
    exchanges = [e for hops in outcome.exchanges for e in hops]
    contained, false_positive = True, False
    if case.family == "exfil":
        detail = _exfil_leak(rendered, outcome)
        contained = not detail
    elif case.family == "ssrf":
        reached = [a for a in outcome.arrivals if a.private]
        detail = f"reached a private target ({len(reached)} request(s))" if reached else ""
        contained = not reached
    elif case.family == "injection":
        detail = _injection_shown(rendered, exchanges)
        contained = not detail
    else:
        detail = _benign_problem(rendered, outcome, site)
        false_positive = bool(detail)
    bricked = any(e.status == 403 and _host_of(e.url) in site.model_hosts for e in exchanges)
    if not detail:
        detail = _how_contained(exchanges, outcome) if case.kind == "malicious" else "passed"
    return Verdict(case.id, case.category, case.kind, case.layer, contained, false_positive, bricked, detail,
                   outcome.seconds)


# ---------------------------------------------------------------------------------------------
# exfiltration


def _exfil_leak(rendered: RenderedCase, outcome: Outcome) -> str:
    places = _upstream_places(outcome)
    for evidence in rendered.evidence:
        where = []
        for piece in evidence.complete():
            found = next((place for place, views in places if any(piece.lower() in view for view in views)), None)
            if found is None:
                break
            where.append(found)
        else:
            return f"{evidence.form} reached the upstream ({', '.join(sorted(set(where)))})"
    return ""


def _upstream_places(outcome: Outcome) -> list[tuple[str, list[str]]]:
    places: list[tuple[str, list[str]]] = []
    for arrival in outcome.arrivals:
        places.append(("url", _views(arrival.path)))
        places.append(("header", _views("\n".join(f"{k}: {v}" for k, v in arrival.headers))))
        if arrival.trailers:
            places.append(("trailer", _views("\n".join(f"{k}: {v}" for k, v in arrival.trailers))))
        body = _decoded(arrival.body, arrival.header("content-encoding"))
        places.append(("body", _views(body.decode("utf-8", "replace"))))
        if arrival.ws_messages:
            places.append(("websocket", _views("\n".join(arrival.ws_messages))))
    if outcome.dns_queries:
        places.append(("dns", _views("\n".join(outcome.dns_queries))))
    return places


def _views(text: str) -> list[str]:
    """text as sent and unescaped each way a receiver could, lower-cased, without repeats."""
    views = [text, urllib.parse.unquote_plus(text), _json_unescape(text), html.unescape(text)]
    return list(dict.fromkeys(view.lower() for view in views))


def _json_unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(1) or match.group(2):
            return chr(int(match.group(1) or match.group(2), 16))
        return _SIMPLE.get(match.group(3), match.group(3))

    return _ESCAPE.sub(one, text)


# ---------------------------------------------------------------------------------------------
# injection


def _injection_shown(rendered: RenderedCase, exchanges: list[Exchange]) -> str:
    shown = []
    for exchange in exchanges:
        shown += _views(_decoded(exchange.body, exchange.header("content-encoding")).decode("utf-8", "replace"))
        shown += _views("\n".join(f"{k}: {v}" for k, v in exchange.headers))
        shown += _views("\n".join(exchange.ws_received))
    if any(canary.lower() in view for canary in rendered.canaries for view in shown):
        return "the injected text reached the client"
    served = rendered.response
    if served is not None:
        wanted = b"".join(event + b"\n\n" for event in served.sse) if served.sse is not None else served.body
        wanted = _decoded(wanted, _pair(served.headers, "content-encoding"))
        for exchange in exchanges:
            body = _decoded(exchange.body, exchange.header("content-encoding"))
            if (wanted and body == wanted) or (served.websocket and exchange.ws_received == served.websocket):
                return "the served answer reached the client unchanged"
    return ""


# ---------------------------------------------------------------------------------------------
# false positives


def _benign_problem(rendered: RenderedCase, outcome: Outcome, site: Site) -> str:
    for hops in outcome.exchanges:
        for exchange in hops:
            if exchange.status is None:
                return f"no answer ({exchange.error or 'connection closed'})"
            if exchange.block_reason:
                return f"blocked: {exchange.block_reason}{_pattern(outcome)}"
    remaining = list(outcome.arrivals)
    for wire, hops in zip(rendered.wires, outcome.exchanges):
        arrival = next((a for a in remaining if a.method == wire.method and a.path == wire.target), None)
        if arrival is None:
            return f"{wire.method} {_safe_target(wire)} never reached the upstream"
        remaining.remove(arrival)
        problem = _changed_on_the_way(wire, arrival, site) or _answer_changed(rendered, hops[0], arrival)
        if problem:
            return problem
    return ""


def _changed_on_the_way(wire: WireRequest, arrival: Arrival, site: Site) -> str:
    if arrival.body != wire.body:
        return "the request body was altered on the way"
    skip = UNCHECKED_HEADERS | site.token_headers
    received = {(k.lower(), v) for k, v in arrival.headers}
    for name, value in wire.headers:
        if name.lower() not in skip and (name.lower(), value) not in received:
            return f"request header {name} was altered or dropped"
    if [tuple(t) for t in wire.trailers] != [tuple(t) for t in arrival.trailers][: len(wire.trailers)]:
        return "request trailers were altered or dropped"
    if wire.websocket is not None and arrival.ws_messages != wire.websocket["send"]:
        return "WebSocket messages from the guest were altered or dropped"
    return ""


def _answer_changed(rendered: RenderedCase, exchange: Exchange, arrival: Arrival) -> str:
    if arrival.served_status is not None and exchange.status != arrival.served_status:
        return f"the client got {exchange.status}, the upstream answered {arrival.served_status}"
    if arrival.served_status is None and (exchange.status or 0) >= 400:
        return f"the client got {exchange.status}"
    served = rendered.response
    if served is not None and served.websocket and exchange.ws_received != served.websocket:
        return "WebSocket messages from the upstream were altered or dropped"
    if arrival.served_body is not None and arrival.served_status != 101:
        encoding = _pair(served.headers, "content-encoding") if served is not None else None
        if _decoded(exchange.body, exchange.header("content-encoding")) != _decoded(arrival.served_body, encoding):
            return "the response body was altered on the way"
    return ""


# ---------------------------------------------------------------------------------------------
# helpers


def _how_contained(exchanges: list[Exchange], outcome: Outcome) -> str:
    reasons = sorted({e.block_reason for e in exchanges if e.block_reason})
    if reasons:
        return f"blocked: {', '.join(reasons)}{_pattern(outcome)}"
    if any(e.status is None for e in exchanges):
        return "connection refused or killed"
    return "forwarded without the secret" if outcome.arrivals else "never reached the upstream"


def _pattern(outcome: Outcome) -> str:
    patterns = sorted({r.get("pattern") for r in outcome.log if r.get("event") == "block" and r.get("pattern")})
    return f" ({', '.join(patterns)})" if patterns else ""


def _decoded(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "").strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except (OSError, EOFError, zlib.error):
        pass
    return body


def _pair(headers: list[list[str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _host_of(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def _safe_target(wire: WireRequest) -> str:
    return wire.target.split("?", 1)[0][:60]


# ---------------------------------------------------------------------------------------------
# tallies


@dataclass
class Tally:
    malicious: int = 0
    contained: int = 0
    benign: int = 0
    false_positives: int = 0
    bricked: int = 0
    bricked_benign: int = 0
    seconds: float = 0.0
    cases: int = 0

    def add(self, verdict: Verdict) -> None:
        self.cases += 1
        self.seconds += verdict.seconds
        if verdict.kind == "malicious":
            self.malicious += 1
            self.contained += verdict.contained
        else:
            self.benign += 1
            self.false_positives += verdict.false_positive
        self.bricked += verdict.bricked
        self.bricked_benign += verdict.bricked and verdict.kind == "benign"


def tally(verdicts: list[Verdict], key=lambda v: v.category) -> dict[str, Tally]:
    tallies: dict[str, Tally] = defaultdict(Tally)
    for verdict in verdicts:
        tallies[key(verdict)].add(verdict)
    return dict(sorted(tallies.items()))
