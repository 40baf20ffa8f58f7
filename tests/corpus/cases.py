"""The corpus: cases from cases/*.yaml, the bottle they run in (site.yaml), rendered for a transport.

A case is declarative (shape in cases/README.md): what the guest sends (``request`` or ``requests``),
what the fake upstream answers (``response``), what it is (``category``, ``kind``) and which layer
should contain it (``layer``: ``floor`` = egress's own checks, ``pipelock`` = the scanner,
``none`` = beyond what either can fairly be asked, templating.py says why). Rendering draws fresh
secrets and turns each request into a WireRequest, the JSON-able form the client sends as is.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import random
import socket
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.corpus.templating import Evidence, Renderer

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
SITE_FILE = HERE / "site.yaml"

KINDS = ("malicious", "benign")
LAYERS = ("floor", "pipelock", "none")
# The judge a category gets, by its prefix.
FAMILIES = ("exfil", "ssrf", "injection", "benign")
CASE_KEYS = {"id", "category", "kind", "layer", "why", "request", "requests", "response", "transports"}
REQUEST_KEYS = {"method", "url", "headers", "body", "json", "form", "multipart", "content_type", "encoding",
                "trailers", "http2", "connect", "sni", "websocket", "follow_redirects"}
RESPONSE_KEYS = {"status", "headers", "body", "json", "sse", "encoding", "websocket"}
TRANSPORTS = ("local", "live")


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    kind: str
    layer: str
    why: str
    requests: tuple[dict, ...]
    response: dict | None
    transports: tuple[str, ...]
    source: str

    @property
    def family(self) -> str:
        return self.category.split("-", 1)[0]


@dataclass(frozen=True)
class Site:
    """The bottle the corpus runs in: its agent file's routes and what each host name resolves to."""

    agent: dict
    dns: dict[str, list[str]]  # name or "*.domain" -> addresses; "public" = a harness-chosen global address
    model_hosts: frozenset[str] = frozenset()  # carry the model conversation: a 403 there bricks the session

    @property
    def token_headers(self) -> set[str]:
        return {r["token"]["header"].lower() for r in self.agent["routes"] if r.get("token")}

    def addresses(self, host: str) -> list[str] | None:
        """What host resolves to in the site, None when it is not a site name."""
        host = host.rstrip(".").lower()
        if host in self.dns:
            return self.dns[host]
        suffixes = [name for name in self.dns if name.startswith("*.") and host.endswith(name[1:])]
        return self.dns[max(suffixes, key=len)] if suffixes else None

    def is_private_target(self, host: str) -> bool:
        """A name that resolves to a non-public address of the site, or an IP literal: SSRF ground."""
        addresses = self.addresses(host)
        if addresses is None:
            return literal_address(host) is not None
        return any(address != "public" for address in addresses)


def literal_address(host: str) -> str | None:
    """host as an address when getaddrinfo would take it as one (dotted, decimal, octal, hex, IPv6)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


@dataclass
class WireRequest:
    """One request exactly as the client sends it (JSON-able: it crosses into the guest)."""

    method: str
    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent
    headers: list[list[str]]
    body: bytes = b""
    trailers: list[list[str]] = field(default_factory=list)  # needs http2 (mitmproxy refuses HTTP/1 trailers)
    http2: bool = False
    connect: str = ""  # CONNECT authority when it differs from host:port
    sni: str | None = None  # None: the host; "": no SNI
    websocket: dict | None = None  # {"send": [str], "binary": bool, "receive": int}
    follow_redirects: bool = False

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "body"}
        data["body_b64"] = base64.b64encode(self.body).decode()
        return data


@dataclass
class ServedResponse:
    """What the fake upstream answers for the case (None fields: its default answer)."""

    status: int = 200
    headers: list[list[str]] = field(default_factory=list)
    body: bytes = b""
    sse: list[bytes] | None = None  # streamed events, no Content-Length
    websocket: list[str] = field(default_factory=list)  # messages sent after the handshake


@dataclass
class RenderedCase:
    case: Case
    wires: list[WireRequest]
    response: ServedResponse | None
    evidence: list[Evidence]  # secret forms the case sends
    canaries: list[str]  # marker text inside injected instructions


# ---------------------------------------------------------------------------------------------
# loading


def load_site(path: Path = SITE_FILE) -> Site:
    data = yaml.safe_load(path.read_text())
    dns = {name.lower(): value if isinstance(value, list) else [value] for name, value in data["dns"].items()}
    return Site(agent=data["agent"], dns=dns, model_hosts=frozenset(data.get("model_hosts", ())))


def load_cases(directory: Path = CASES_DIR) -> list[Case]:
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.yaml")):
        for index, raw in enumerate(yaml.safe_load(path.read_text()) or []):
            case = _case(raw, f"{path.name}[{index}]")
            if case.id in seen:
                raise CorpusError(f"{case.source}: id {case.id!r} already used in {seen[case.id]}")
            seen[case.id] = case.source
            cases.append(case)
    return cases


def _case(raw: Any, source: str) -> Case:
    if not isinstance(raw, dict):
        raise CorpusError(f"{source}: a case is a mapping")
    unknown = set(raw) - CASE_KEYS
    if unknown:
        raise CorpusError(f"{source}: unknown keys {sorted(unknown)}")
    for key in ("id", "category", "kind"):
        if not isinstance(raw.get(key), str):
            raise CorpusError(f"{source}: {key} is required")
    kind, category = raw["kind"], raw["category"]
    if kind not in KINDS:
        raise CorpusError(f"{source}: kind must be one of {KINDS}")
    family = category.split("-", 1)[0]
    if family not in FAMILIES or (family == "benign") != (kind == "benign"):
        raise CorpusError(f"{source}: category {category!r} does not fit kind {kind!r} (families {FAMILIES})")
    layer = raw.get("layer", "floor" if kind == "malicious" else "none")
    if layer not in LAYERS:
        raise CorpusError(f"{source}: layer must be one of {LAYERS}")
    if ("request" in raw) == ("requests" in raw):
        raise CorpusError(f"{source}: give request or requests, not both")
    requests = tuple(raw["requests"]) if "requests" in raw else (raw["request"],)
    for request in requests:
        unknown = set(request) - REQUEST_KEYS
        if unknown or "url" not in request:
            raise CorpusError(f"{source}: a request needs url and knows {sorted(REQUEST_KEYS)}, got {sorted(request)}")
        if request.get("trailers") and not request.get("http2"):
            raise CorpusError(f"{source}: trailers need http2 (mitmproxy cannot read HTTP/1 trailers)")
    response = raw.get("response")
    if response is not None and set(response) - RESPONSE_KEYS:
        raise CorpusError(f"{source}: response keys are {sorted(RESPONSE_KEYS)}")
    transports = tuple(raw.get("transports", TRANSPORTS))
    if not set(transports) <= set(TRANSPORTS):
        raise CorpusError(f"{source}: transports are {TRANSPORTS}")
    return Case(raw["id"], category, kind, layer, raw.get("why", ""), requests, response, transports, source)


# ---------------------------------------------------------------------------------------------
# rendering


def render_case(case: Case, rng: random.Random | None = None) -> RenderedCase:
    renderer = Renderer(rng or random.Random())
    wires = [_wire(request, renderer) for request in case.requests]
    response = _served(case.response, renderer) if case.response is not None else None
    canaries = [value for key, value in renderer.values.items() if key.startswith("canary:")]
    return RenderedCase(case, wires, response, renderer.evidence_list(), canaries)


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, target) without normalising anything: the target is sent as written."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https", "ws", "wss"):
        raise CorpusError(f"not an http(s) URL: {url[:40]!r}")
    authority, slash, target = rest.partition("/")
    target = slash + target if slash else "/"
    if "@" in authority:  # userinfo: a real client sends it as a Basic header, the host is what follows
        authority = authority.rsplit("@", 1)[1]
    if authority.startswith("["):
        host, _, port_text = authority[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = authority.partition(":")
    secure = scheme in ("https", "wss")
    port = int(port_text) if port_text else (443 if secure else 80)
    return ("https" if secure else "http"), host, port, target


def _wire(spec: dict, renderer: Renderer) -> WireRequest:
    scheme, host, port, target = split_url(renderer.render(spec["url"]))
    headers = _pairs(spec.get("headers"), renderer)
    body, content_type = _body(spec, renderer)
    if content_type and not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(["Content-Type", content_type])
    encoding = spec.get("encoding")
    if encoding:
        body = gzip.compress(body, mtime=0) if encoding == "gzip" else zlib.compress(body)
        headers.append(["Content-Encoding", encoding])
    websocket = spec.get("websocket")
    if websocket is not None:
        websocket = {"send": [renderer.render(m) for m in websocket.get("send", [])],
                     "binary": bool(websocket.get("binary")), "receive": int(websocket.get("receive", 0))}
    method = spec.get("method") or ("POST" if body else "GET")
    return WireRequest(method=method, scheme=scheme, host=host, port=port, target=target, headers=headers,
                       body=body, trailers=_pairs(spec.get("trailers"), renderer), http2=bool(spec.get("http2")),
                       connect=renderer.render(spec.get("connect", "")),
                       sni=renderer.render(spec["sni"]) if "sni" in spec else None, websocket=websocket,
                       follow_redirects=bool(spec.get("follow_redirects")))


def _pairs(value, renderer: Renderer) -> list[list[str]]:
    if not value:
        return []
    items = value.items() if isinstance(value, dict) else value
    return [[renderer.render(str(k)), renderer.render(str(v))] for k, v in items]


def _body(spec: dict, renderer: Renderer) -> tuple[bytes, str]:
    if "json" in spec:
        text = json.dumps(spec["json"])  # placeholders survive json.dumps; values are escaped as filled
        return renderer.render(text, json_string=True).encode(), spec.get("content_type", "application/json")
    if "form" in spec:
        pairs = _pairs(spec["form"], renderer)
        return (urllib.parse.urlencode([tuple(pair) for pair in pairs]).encode(),
                spec.get("content_type", "application/x-www-form-urlencoded"))
    if "multipart" in spec:
        boundary = "corpus-" + renderer.value("session_id")
        chunks = []
        for part in spec["multipart"]:
            disposition = f'form-data; name="{part["name"]}"'
            if part.get("filename"):
                disposition += f'; filename="{renderer.render(part["filename"])}"'
            head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            head += f"Content-Type: {part.get('content_type', 'text/plain')}\r\n\r\n"
            chunks.append(head.encode() + renderer.render(part["content"]).encode() + b"\r\n")
        return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
    if "body" in spec:
        return renderer.render(spec["body"]).encode(), spec.get("content_type", "text/plain; charset=utf-8")
    return b"", spec.get("content_type", "")


def _served(spec: dict, renderer: Renderer) -> ServedResponse:
    headers = _pairs(spec.get("headers"), renderer)
    served = ServedResponse(status=int(spec.get("status", 200)), headers=headers)
    if "sse" in spec:
        # A string is a whole event as written; a mapping is one "data:" line of JSON.
        served.sse = [(_text_or_json(event, renderer) if isinstance(event, str)
                       else "data: " + _text_or_json(event, renderer)).encode() for event in spec["sse"]]
        _default_header(headers, "Content-Type", "text/event-stream")
    elif "json" in spec:
        served.body = renderer.render(json.dumps(spec["json"]), json_string=True).encode()
        _default_header(headers, "Content-Type", "application/json")
    else:
        served.body = renderer.render(spec.get("body", "")).encode()
        _default_header(headers, "Content-Type", "text/html; charset=utf-8")
    if spec.get("encoding") == "gzip" and served.sse is None:
        served.body = gzip.compress(served.body, mtime=0)
        headers.append(["Content-Encoding", "gzip"])
    served.websocket = [_text_or_json(message, renderer) for message in spec.get("websocket", [])]
    return served


def _text_or_json(item, renderer: Renderer) -> str:
    """A string as written, or a mapping as one JSON text (an SSE event's data, a WebSocket message)."""
    if isinstance(item, str):
        return renderer.render(item)
    return renderer.render(json.dumps(item), json_string=True)


def _default_header(headers: list[list[str]], name: str, value: str) -> None:
    if not any(k.lower() == name.lower() for k, _ in headers):
        headers.append([name, value])
