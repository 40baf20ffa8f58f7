"""The egress addon (bottle_tasks.sidecars.egress): every decision in docs/bundle-contract.md.

Unit tests drive the addon hooks with mitmproxy's test flows and a fake resolver (nothing is
dialled). The integration tests at the end start the real egress main() in a subprocess on
127.0.0.1, in front of an HTTPS echo server on 127.0.0.1; no other address is ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import io
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import certs, http
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from bottle_tasks.sidecars import bodies, dlp, egress, pipelock_scan
from bottle_tasks.sidecars.addresses import is_public_address
from bottle_tasks.sidecars.scrub import SecretScrubber
from bottle_tasks.sidecars.routes import parse_routes
from tests.unit.fakes import FakePipelock

REPO = Path(__file__).resolve().parents[2]

# A real-looking Anthropic key: it matches the built-in "anthropic_api_key" pattern, which is the
# point: egress injects it *after* DLP, so it must never trip DLP itself.
REAL_TOKEN = "sk-ant-api03-" + "R" * 40
PLACEHOLDER = "bottle-placeholder-ANTHROPIC_API_KEY"
OAUTH_TOKEN = "oauth-" + "T" * 30
OAUTH_PLACEHOLDER = "bottle-placeholder-CLAUDE_CODE_OAUTH_TOKEN"
FAKE_AWS_KEY = "AKIA" + "Z" * 16
SECRETS = {"ANTHROPIC_API_KEY": REAL_TOKEN, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH_TOKEN}

ROUTES = [
    {
        "host": "api.anthropic.com",
        "methods": ["POST"],
        "paths": ["/v1/*"],
        "token": {"env": "ANTHROPIC_API_KEY", "header": "x-api-key", "format": "{value}", "placeholder": PLACEHOLDER},
        "dlp": "block",  # the model API defaults to redact; these tests are about blocking
    },
    {
        "host": "oauth.example.net",
        "token": {"env": "CLAUDE_CODE_OAUTH_TOKEN", "header": "Authorization", "format": "Bearer {value}",
                  "placeholder": OAUTH_PLACEHOLDER},
    },
    {"host": "*.example.com"},
    {"host": "internal.example.org", "private_network": True},
]

# Fake DNS: none of these addresses is ever contacted.
FAKE_DNS = {
    "api.anthropic.com": ["160.79.104.10"],
    "oauth.example.net": ["93.184.215.20"],
    "www.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "rebind.example.com": ["93.184.215.14", "127.0.0.1"],
    "cgnat.example.com": ["100.64.1.1"],
    "linklocal.example.com": ["169.254.169.254"],
    "mapped.example.com": ["::ffff:10.0.0.1"],
    "internal.example.org": ["10.1.2.3"],
    "nx.example.com": [],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    return FAKE_DNS[host]


def make_config(**overrides):
    data = {"version": 1, "agent": "t", "listen": "127.0.0.1:8080", "upstream_proxy": "",
            "pipelock_scan_url": "", "routes": ROUTES}
    data.update(overrides)
    return parse_routes(data)


def make_addon(records: list | None = None, **kwargs) -> egress.Egress:
    config = kwargs.pop("config", None) or make_config()
    emit = records.append if records is not None else (lambda record: None)
    return egress.Egress(config, SECRETS, emit=emit, resolve=fake_resolve, **kwargs)


def run(coro):
    return asyncio.run(coro)


def plain_flow(method: str, url: str, content: bytes = b"", headers: dict | None = None) -> http.HTTPFlow:
    """An absolute-form request sent to the proxy port, with the Host header a client sends."""
    request = http.Request.make(method, url, content, headers or {})
    request.headers.setdefault("Host", url.split("/")[2])
    return tflow.tflow(req=request)


def connect_flow(client, host: str, port: int = 443) -> http.HTTPFlow:
    request = http.Request(host, port, b"CONNECT", b"", f"{host}:{port}".encode(), b"", b"HTTP/1.1",
                           http.Headers(), b"", None, time.time(), time.time())
    return tflow.tflow(client_conn=client, req=request)


def tunnel_flow(addon, method: str, host: str, path: str, *, host_header: str | None = None,
                port: int = 443, content: bytes = b"", headers: dict | None = None) -> http.HTTPFlow:
    """An inner request of a CONNECT tunnel that the addon has already accepted."""
    client = tflow.tclient_conn()
    connect = connect_flow(client, host, port)
    addon.http_connect(connect)
    assert connect.response is None, "the CONNECT itself was refused"
    url = f"https://{host}{'' if port == 443 else f':{port}'}{path}"
    request = http.Request.make(method, url, content, headers or {})
    # Set after make(): make() rewrites Host from the URL, a guest need not.
    if host_header == "":
        request.headers.pop("Host", None)
    else:
        request.headers["Host"] = host_header if host_header is not None else host
    return tflow.tflow(client_conn=client, req=request)


def assert_blocked(flow: http.HTTPFlow, reason: str, status: int = 403) -> str:
    assert flow.response is not None, f"expected a {reason} block, the request was allowed"
    assert flow.response.status_code == status
    assert flow.response.headers[egress.BLOCK_HEADER] == reason
    body = flow.response.get_text()
    assert body.startswith(f"claude-bottle egress blocked this request: {reason} (")
    return body


def assert_allowed(flow: http.HTTPFlow) -> None:
    assert flow.response is None, flow.response and flow.response.get_text()


# -- 1. routes ------------------------------------------------------------------------------


def test_connect_to_unrouted_host_is_refused():
    records: list = []
    addon = make_addon(records)
    flow = connect_flow(tflow.tclient_conn(), "evil.test")
    addon.http_connect(flow)
    assert "no route for evil.test" in assert_blocked(flow, "route_not_allowed")
    request_id = flow.response.headers[egress.REQUEST_ID_HEADER]
    assert records[-1] == {"event": "block", "reason": "route_not_allowed", "method": "CONNECT",
                           "host": "evil.test", "path": "", "pattern": "", "where": "", "request_id": request_id}


def test_plain_request_to_unrouted_host_is_refused():
    addon = make_addon()
    flow = plain_flow("GET", "http://evil.test/x")
    run(addon.request(flow))
    assert_blocked(flow, "route_not_allowed")


def test_wildcard_route_covers_subdomains_not_apex():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/")
    run(addon.request(flow))
    assert_allowed(flow)
    apex = connect_flow(tflow.tclient_conn(), "example.com")
    addon.http_connect(apex)
    assert_blocked(apex, "route_not_allowed")


# -- 2. SNI ---------------------------------------------------------------------------------


def clienthello(client, sni):
    return SimpleNamespace(context=SimpleNamespace(client=client), client_hello=SimpleNamespace(sni=sni))


@pytest.mark.parametrize("sni, reason", [(None, "sni_missing"), ("", "sni_missing"), ("other.example.com", "sni_mismatch")])
def test_bad_sni_kills_the_connection(sni, reason):
    records: list = []
    addon = make_addon(records)
    client = tflow.tclient_conn()
    addon.http_connect(connect_flow(client, "www.example.com"))
    addon.tls_clienthello(clienthello(client, sni))
    tls_start = SimpleNamespace(context=SimpleNamespace(client=client), ssl_conn=object())
    addon.tls_start_client(tls_start)
    assert tls_start.ssl_conn is None  # mitmproxy closes a connection it has no TLS context for
    assert records[-1]["event"] == "block" and records[-1]["reason"] == reason


def test_matching_sni_keeps_the_connection():
    addon = make_addon()
    client = tflow.tclient_conn()
    addon.http_connect(connect_flow(client, "www.example.com"))
    addon.tls_clienthello(clienthello(client, "WWW.Example.com"))
    sentinel = object()
    tls_start = SimpleNamespace(context=SimpleNamespace(client=client), ssl_conn=sentinel)
    addon.tls_start_client(tls_start)
    assert tls_start.ssl_conn is sentinel


def test_internationalised_name_matches_its_punycode_sni():
    """mitmproxy decodes a CONNECT host to Unicode; the SNI stays ASCII. Both name one host."""
    addon = make_addon()
    client = tflow.tclient_conn()
    connect = connect_flow(client, "bücher.example.com")
    addon.http_connect(connect)
    assert connect.response is None
    addon.tls_clienthello(clienthello(client, "xn--bcher-kva.example.com"))
    sentinel = object()
    tls_start = SimpleNamespace(context=SimpleNamespace(client=client), ssl_conn=sentinel)
    addon.tls_start_client(tls_start)
    assert tls_start.ssl_conn is sentinel


def test_tls_without_connect_is_refused():
    addon = make_addon()
    client = tflow.tclient_conn()
    addon.tls_clienthello(clienthello(client, "www.example.com"))
    tls_start = SimpleNamespace(context=SimpleNamespace(client=client), ssl_conn=object())
    addon.tls_start_client(tls_start)
    assert tls_start.ssl_conn is None


# -- 3. authority ---------------------------------------------------------------------------


@pytest.mark.parametrize("host_header", ["evil.example.com", "www.example.com:8443", ""])
def test_inner_host_must_match_connect_authority(host_header):
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/", host_header=host_header)
    run(addon.request(flow))
    assert_blocked(flow, "authority_mismatch")


def test_inner_host_with_explicit_default_port_is_fine():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/", host_header="WWW.example.com:443")
    run(addon.request(flow))
    assert_allowed(flow)


def http2_tunnel_flow(addon, host: str, path: str, *, authority: str, host_headers: list[str] = ()) -> http.HTTPFlow:
    """An HTTP/2 request inside a CONNECT tunnel: :authority, and any host headers the guest adds."""
    flow = tunnel_flow(addon, "GET", host, path, host_header="")
    flow.request.http_version = "HTTP/2.0"
    flow.request.authority = authority
    for value in host_headers:
        flow.request.headers.add("host", value)
    return flow


@pytest.mark.parametrize("host_headers", [["other.example"], ["www.example.com:8080"], ["www.example.com:+80"],
                                          ["www.example.com", "other.example"], []],
                         ids=["other-host", "other-port", "signed-port", "duplicate", "none"])
def test_domain_fronting_through_an_absolute_form_request_is_refused(host_headers):
    # GET http://www.example.com/ HTTP/1.1 with a Host naming someone else: no tunnel, so before
    # the fix no authority check ran and the spoofed Host reached the routed upstream.
    addon = make_addon()
    flow = plain_flow("GET", "http://www.example.com/", headers={"Host": "placeholder"})
    flow.request.headers.pop("Host")
    for value in host_headers:
        flow.request.headers.add("Host", value)
    run(addon.request(flow))
    assert_blocked(flow, "authority_mismatch")


def test_absolute_form_request_with_its_own_host_is_allowed():
    addon = make_addon()
    flow = plain_flow("GET", "http://www.example.com/", headers={"Host": "WWW.example.com:80"})
    run(addon.request(flow))
    assert_allowed(flow)


def test_https_absolute_form_sent_in_the_clear_never_gets_the_token():
    # GET https://api.anthropic.com/... to the proxy port in the clear: egress would dial TLS itself
    # and fill the token with the guest's Host. Refused before any check that could let it through.
    records: list = []
    addon = make_addon(records)
    flow = plain_flow("POST", "https://api.anthropic.com/v1/messages", headers={"x-api-key": PLACEHOLDER})
    run(addon.request(flow))
    assert "CONNECT" in assert_blocked(flow, "https_requires_connect")
    assert flow.request.headers["x-api-key"] == PLACEHOLDER
    assert records[-1]["reason"] == "https_requires_connect"


def test_token_is_never_filled_for_a_spoofed_host():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages", host_header="evil.example",
                       headers={"x-api-key": PLACEHOLDER})
    run(addon.request(flow))
    assert_blocked(flow, "authority_mismatch")
    assert flow.request.headers["x-api-key"] == PLACEHOLDER


@pytest.mark.parametrize("authority, host_headers", [
    ("evil.example.com", []),                                   # :authority names another host
    ("www.example.com", ["evil.example.com"]),                  # host header disagrees with :authority
    ("www.example.com", ["www.example.com", "www.example.com"]),  # duplicate host headers
    ("www.example.com:8443", []),                               # another port
], ids=["authority", "host-vs-authority", "duplicate-host", "port"])
def test_http2_authority_and_host_must_both_name_the_tunnel(authority, host_headers):
    addon = make_addon()
    flow = http2_tunnel_flow(addon, "www.example.com", "/", authority=authority, host_headers=host_headers)
    run(addon.request(flow))
    assert_blocked(flow, "authority_mismatch")


def test_http2_authority_naming_the_tunnel_is_allowed():
    addon = make_addon()
    flow = http2_tunnel_flow(addon, "www.example.com", "/", authority="www.example.com",
                             host_headers=["www.example.com:443"])
    run(addon.request(flow))
    assert_allowed(flow)


def test_duplicate_host_headers_in_a_tunnel_are_refused():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/")
    flow.request.headers.add("Host", "evil.example.com")
    run(addon.request(flow))
    assert_blocked(flow, "authority_mismatch")



# -- 4. method and path ---------------------------------------------------------------------


def test_method_outside_route_is_refused():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    assert_blocked(flow, "method_not_allowed")


def test_path_outside_route_is_refused():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/admin/keys")
    run(addon.request(flow))
    assert_blocked(flow, "path_not_allowed")


@pytest.mark.parametrize("path", [
    "/v1/../admin/delete",          # curl --path-as-is
    "/v1/./../admin",
    "/v1/%2e%2e/admin",             # encoded dot segment
    "/v1/%2E%2e/admin",
    "/v1/%252e%252e/admin",         # double-encoded
    "/v1/..;/admin",                # Tomcat-style path parameter on a dot segment
    "/v1/x%2F..%2Fadmin",           # encoded slash
    "/v1/x%5C..%5Cadmin",           # encoded backslash
    "/v1\\..\\admin",               # backslash
    "/v1/x%00.json",                # NUL
    "/v1//../admin",                # empty segment, then a dot segment
    "/v1/%6dessages",               # encoded unreserved character: not the normal form
    "/v1/x#/../../admin",           # fragment
    "/v1/%zz",                      # malformed escape
])
def test_path_traversal_past_a_glob_is_refused(path):
    records: list = []
    addon = make_addon(records)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    flow.request.path = path  # as sent on the wire: nothing normalises it before egress
    run(addon.request(flow))
    assert_blocked(flow, "path_ambiguous")
    assert "x-api-key" not in flow.request.headers
    assert records[-1]["reason"] == "path_ambiguous"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages?beta=true&x=%2F..", "/v1/files/a%20b.txt",
                                  "/v1/models/", "/v1/caf%C3%A9"])
def test_paths_in_normal_form_still_match_the_glob(path):
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    flow.request.path = path
    run(addon.request(flow))
    assert_allowed(flow)
    assert flow.request.path == path  # forwarded exactly as checked


def test_a_route_without_path_globs_keeps_encoded_slashes():
    addon = make_addon()  # *.example.com has no paths: nothing to get around, npm's @scope%2fname works
    flow = tunnel_flow(addon, "GET", "www.example.com", "/@types%2fnode")
    run(addon.request(flow))
    assert_allowed(flow)


@pytest.mark.parametrize("host, port", [("internal.example.org", 6379), ("www.example.com", 22),
                                        ("api.anthropic.com", 8443)])
def test_connect_to_a_port_the_route_does_not_list_is_refused(host, port):
    records: list = []
    addon = make_addon(records)
    flow = connect_flow(tflow.tclient_conn(), host, port)
    addon.http_connect(flow)
    body = assert_blocked(flow, "port_not_allowed")
    assert f"port {port}" in body and "443, 80" in body
    assert records[-1]["reason"] == "port_not_allowed"


def test_plain_request_to_a_port_the_route_does_not_list_is_refused():
    addon = make_addon()
    flow = plain_flow("GET", "http://www.example.com:22/")
    run(addon.request(flow))
    assert_blocked(flow, "port_not_allowed")


def test_route_ports_replace_the_default_ones():
    routes = [{"host": "internal.example.org", "private_network": True, "ports": [6379]}]
    addon = make_addon(config=make_config(routes=routes))
    flow = tunnel_flow(addon, "GET", "internal.example.org", "/", port=6379, host_header="internal.example.org:6379")
    run(addon.request(flow))
    assert_allowed(flow)
    https = connect_flow(tflow.tclient_conn(), "internal.example.org", 443)
    addon.http_connect(https)
    assert_blocked(https, "port_not_allowed")



# -- 5. private addresses -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["rebind.example.com", "cgnat.example.com", "linklocal.example.com",
                                  "mapped.example.com"])
def test_non_global_destination_is_refused(host):
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", host, "/")
    run(addon.request(flow))
    assert_blocked(flow, "private_address")


def test_private_network_route_may_resolve_privately():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "internal.example.org", "/")
    run(addon.request(flow))
    assert_allowed(flow)


def test_unresolvable_host_is_refused():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "nx.example.com", "/")
    run(addon.request(flow))
    assert_blocked(flow, "dns_unresolvable", status=502)


@pytest.mark.parametrize(
    "ip, public",
    [
        ("93.184.215.14", True), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("100.127.255.254", False), ("0.0.0.0", False),
        ("224.0.0.251", False), ("255.255.255.255", False), ("::1", False), ("fe80::1", False),
        ("fc00::1", False), ("fd12::1", False), ("::ffff:127.0.0.1", False), ("::ffff:93.184.215.14", True),
        ("64:ff9b::a00:1", False), ("2002:a00:1::1", False), ("ff02::1", False), ("not-an-ip", False),
    ],
)
def test_is_public_address(ip, public):
    assert is_public_address(ip) is public


# -- 6. DLP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, headers, content, where",
    [
        (f"/v1/upload?key={FAKE_AWS_KEY}", {}, b"", "url"),
        ("/v1/upload?key=%41KIA" + "Z" * 16, {}, b"", "url"),
        ("/v1/upload", {"X-Debug": f"creds {FAKE_AWS_KEY}"}, b"", "header:x-debug"),
        ("/v1/upload", {"Content-Type": "application/json"}, json.dumps({"k": FAKE_AWS_KEY}).encode(), "body"),
    ],
)
def test_secret_in_request_to_credentialed_host_is_blocked(path, headers, content, where):
    records: list = []
    addon = make_addon(records)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", path, headers=headers, content=content)
    run(addon.request(flow))
    body = assert_blocked(flow, "dlp_match")
    assert FAKE_AWS_KEY not in body and "aws_access_key_id" in body
    assert records[-1]["pattern"] == "aws_access_key_id" and records[-1]["where"] == where
    assert FAKE_AWS_KEY not in json.dumps(records)
    assert flow.request.headers.get("x-api-key") != REAL_TOKEN  # nothing was injected


def test_gzip_request_body_is_decoded_for_dlp():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "www.example.com", "/", headers={"Content-Encoding": "gzip"})
    flow.request.raw_content = gzip.compress(FAKE_AWS_KEY.encode())  # as the guest sent it
    run(addon.request(flow))
    assert_blocked(flow, "dlp_match")


def test_undecodable_request_body_fails_closed():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "www.example.com", "/", headers={"Content-Encoding": "gzip"})
    flow.request.raw_content = b"not gzip"
    run(addon.request(flow))
    assert_blocked(flow, "dlp_unavailable")


def test_dlp_runs_before_injection_so_the_real_token_passes():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages",
                       headers={"x-api-key": PLACEHOLDER}, content=b'{"model": "x"}')
    run(addon.request(flow))
    assert_allowed(flow)
    assert flow.request.headers["x-api-key"] == REAL_TOKEN
    assert dlp.scan_text(REAL_TOKEN, "header")  # it does look like a secret to DLP


def test_a_key_smuggled_in_the_token_header_is_still_blocked():
    addon = make_addon()
    smuggled = "sk-ant-api03-" + "S" * 40
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages", headers={"x-api-key": smuggled})
    run(addon.request(flow))
    assert_blocked(flow, "dlp_match")


# -- request bodies: size, decompression, scanning off the event loop -------------------------


def gzip_bomb(decoded_mib: int) -> bytes:
    """gzip of decoded_mib MiB of zeros, compressed piece by piece (never held whole)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(decoded_mib)) + compressor.flush()


def body_flow(addon, content: bytes, *, encoding: str = "", host: str = "www.example.com") -> http.HTTPFlow:
    flow = tunnel_flow(addon, "POST", host, "/upload")
    if encoding:
        flow.request.headers["Content-Encoding"] = encoding
    flow.request.raw_content = content  # as the guest sent it, not re-encoded
    return flow


def test_request_body_over_max_body_bytes_gets_413_naming_the_limit():
    addon = make_addon(config=make_config(routes=[{"host": "*.example.com", "max_body_bytes": 1000}]))
    flow = body_flow(addon, b"x" * 1001)
    run(addon.request(flow))
    body = assert_blocked(flow, "body_too_large", status=413)
    assert "1001 bytes" in body and "max_body_bytes (1000 bytes)" in body


def test_declared_content_length_over_the_limit_is_answered_before_the_body():
    records: list = []
    addon = make_addon(records, config=make_config(routes=[{"host": "*.example.com", "max_body_bytes": 1000}]))
    flow = tunnel_flow(addon, "POST", "www.example.com", "/upload")
    flow.request.headers["Content-Length"] = "5000000000"
    response = addon.body_limit_response(flow, None)  # what install_body_limit asks, headers only
    assert response.status_code == 413 and response.headers[egress.BLOCK_HEADER] == "body_too_large"
    assert b"5000000000 bytes" in response.content
    assert addon.body_limit_response(flow, 1001).status_code == 413  # a chunked body, as it grows
    assert addon.body_limit_response(flow, 1000) is None
    assert records[-1]["reason"] == "body_too_large" and records[-1]["where"] == "body"


def test_gzip_bomb_is_refused_without_being_decoded_whole():
    # 600 KB of gzip that decodes to 600 MB stalled every client for 115 s at 1.3 GB RSS. This one is
    # 64 MiB decoded; the decoder stops at the ratio limit, and memory stays far below it.
    import tracemalloc

    addon = make_addon()
    bomb = gzip_bomb(64)
    flow = body_flow(addon, bomb, encoding="gzip")
    tracemalloc.start()
    try:
        run(addon.request(flow))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "200 times" in assert_blocked(flow, "compression_ratio", status=413)
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing a {len(bomb) >> 10} KiB bomb"


def test_decoded_body_over_max_body_bytes_gets_413(monkeypatch):
    monkeypatch.setattr(bodies, "MAX_RATIO", 10_000)  # the size limit, not the ratio, must stop this one
    addon = make_addon(config=make_config(routes=[{"host": "*.example.com", "max_body_bytes": 2 << 20}]))
    flow = body_flow(addon, gzip_bomb(8), encoding="gzip")
    run(addon.request(flow))
    assert "decoded request body exceeds max_body_bytes" in assert_blocked(flow, "body_too_large", status=413)


@pytest.mark.parametrize("encoding, compress", [
    ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some clients send it
    ("zstd", lambda data: __import__("zstandard").ZstdCompressor().compress(data)),
    ("gzip", lambda data: gzip.compress(b"harmless " * 10) + gzip.compress(data)),  # the secret in member 2
])
def test_compressed_request_bodies_are_decoded_for_dlp(encoding, compress):
    addon = make_addon()
    flow = body_flow(addon, compress(f"key={FAKE_AWS_KEY}".encode()), encoding=encoding)
    run(addon.request(flow))
    assert_blocked(flow, "dlp_match")


@pytest.mark.parametrize("encoding, content", [
    ("br", __import__("brotli").compress(b"hello")),          # no bounded decoder exists for br
    ("gzip, gzip", gzip.compress(gzip.compress(b"hello"))),  # stacked encodings
    ("gzip", gzip.compress(b"hello") + b"trailing bytes"),   # data an upstream might read, DLP would not
    ("gzip", gzip.compress(b"hello" * 1000)[:-20]),           # truncated
])
def test_request_bodies_egress_cannot_decode_with_a_bound_fail_closed(encoding, content):
    addon = make_addon()
    flow = body_flow(addon, content, encoding=encoding)
    run(addon.request(flow))
    assert_blocked(flow, "dlp_unavailable")


def test_secret_deep_in_a_large_body_is_still_blocked():
    addon = make_addon()
    filler = os.urandom(bodies.SCAN_WINDOW // 2).hex()[:bodies.SCAN_WINDOW - 10]  # the key straddles a window's end
    after = os.urandom(bodies.SCAN_WINDOW * 2).hex()
    flow = body_flow(addon, gzip.compress(f"{filler} {FAKE_AWS_KEY} {after}".encode()), encoding="gzip")
    run(addon.request(flow))
    assert_blocked(flow, "dlp_match")


def test_another_client_is_served_while_a_big_scan_runs(monkeypatch):
    # The scan of one body must not hold the event loop: while it is stuck (on an event, not a
    # clock), a second request goes through the whole request hook.
    scanning, release = threading.Event(), threading.Event()
    real_scan_text = dlp.scan_text

    def scan_text(text, where):
        if "BIG-BODY" in text:
            scanning.set()
            assert release.wait(timeout=60), "never released"
        return real_scan_text(text, where)

    monkeypatch.setattr(dlp, "scan_text", scan_text)
    addon = make_addon()

    async def scenario():
        big = asyncio.ensure_future(addon.request(body_flow(addon, b"BIG-BODY " * 1000)))
        try:
            assert await asyncio.to_thread(scanning.wait, 60), "the big scan never started"
            small = tunnel_flow(addon, "GET", "www.example.com", "/small")
            await addon.request(small)  # served while the big scan is still stuck
            assert_allowed(small)
            assert not big.done()
        finally:
            release.set()
        await big

    run(scenario())


def test_a_flood_of_bombs_is_refused_and_a_normal_request_is_served_after():
    addon = make_addon()
    bomb = gzip_bomb(64)

    async def scenario():
        flood = [body_flow(addon, bomb, encoding="gzip") for _ in range(8)]
        await asyncio.gather(*(addon.request(flow) for flow in flood))
        for flow in flood:
            assert_blocked(flow, "compression_ratio", status=413)
        normal = body_flow(addon, b'{"ok": true}')
        await addon.request(normal)
        assert_allowed(normal)

    run(scenario())


def test_accept_encoding_is_cut_to_what_egress_can_decode_with_a_bound():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages",
                       headers={"Accept-Encoding": "gzip, deflate, br;q=1.0, zstd"})
    run(addon.request(flow))
    assert flow.request.headers["accept-encoding"] == "gzip, deflate, zstd"


def test_compressed_response_bomb_is_not_decoded_whole():
    import tracemalloc

    records: list = []
    addon = make_addon(records)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    bomb = gzip_bomb(64)  # within BUFFER_LIMIT: buffered for redaction
    flow.response = http.Response.make(200, b"", {"Content-Encoding": "gzip"})
    flow.response.raw_content = bomb
    addon.responseheaders(flow)
    assert not flow.response.stream
    tracemalloc.start()
    try:
        run(addon.response(flow))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB decoding a {len(bomb) >> 10} KiB response"
    assert flow.response.raw_content == bomb  # passed on as is, like a large compressed response
    assert records[-1]["event"] == "response_not_redacted"



# -- 7. token over plain HTTP ---------------------------------------------------------------


def test_credentialed_route_over_plain_http_is_refused():
    addon = make_addon()
    flow = plain_flow("POST", "http://api.anthropic.com/v1/messages", headers={"x-api-key": PLACEHOLDER})
    run(addon.request(flow))
    assert_blocked(flow, "token_requires_tls")
    assert flow.request.headers["x-api-key"] == PLACEHOLDER


def test_uncredentialed_plain_http_is_allowed():
    addon = make_addon()
    flow = plain_flow("GET", "http://www.example.com/index.html")
    run(addon.request(flow))
    assert_allowed(flow)


# -- 8. token injection and reflection ------------------------------------------------------


def test_token_slot_with_bearer_format_replaces_the_placeholder():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "oauth.example.net", "/api",
                       headers={"Authorization": f"Bearer {OAUTH_PLACEHOLDER}"})
    run(addon.request(flow))
    assert_allowed(flow)
    assert flow.request.headers.get_all("authorization") == [f"Bearer {OAUTH_TOKEN}"]


def test_token_is_set_even_when_the_guest_sent_none():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    assert flow.request.headers["x-api-key"] == REAL_TOKEN


def test_token_is_not_sent_to_other_routes():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/", headers={"x-api-key": PLACEHOLDER})
    run(addon.request(flow))
    assert flow.request.headers["x-api-key"] == PLACEHOLDER


def test_reflected_token_is_redacted_in_headers_and_streamed_body():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    flow.response = http.Response.make(401, b"", {"X-Echo": f"key {REAL_TOKEN}", "Content-Type": "text/event-stream"})
    del flow.response.headers["content-length"]  # server-sent events: no length, streamed
    addon.responseheaders(flow)
    assert flow.response.headers["X-Echo"] == f"key {PLACEHOLDER}"
    assert callable(flow.response.stream)
    body = f"data: invalid key {REAL_TOKEN}\n\ndata: again {REAL_TOKEN}".encode()
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]  # split the token across chunks
    out = b"".join(flow.response.stream(chunk) for chunk in chunks) + flow.response.stream(b"")
    assert out == body.replace(REAL_TOKEN.encode(), PLACEHOLDER.encode())


def test_small_response_is_buffered_and_its_length_fixed():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    flow.response = http.Response.make(200, f"echo {REAL_TOKEN}".encode(), {"Content-Type": "text/plain"})
    addon.responseheaders(flow)
    assert not flow.response.stream
    run(addon.response(flow))
    assert flow.response.content == f"echo {PLACEHOLDER}".encode()
    assert flow.response.headers["content-length"] == str(len(f"echo {PLACEHOLDER}"))


def test_large_response_with_length_is_streamed_with_same_length_redaction(monkeypatch):
    monkeypatch.setattr(egress, "BUFFER_LIMIT", 10)
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    body = f"a long echo {REAL_TOKEN} end".encode()
    flow.response = http.Response.make(200, body, {"Content-Type": "text/plain"})
    addon.responseheaders(flow)
    assert callable(flow.response.stream)
    out = flow.response.stream(body) + flow.response.stream(b"")
    assert len(out) == len(body) and REAL_TOKEN.encode() not in out
    assert out.startswith(b"a long echo " + PLACEHOLDER.encode())


def test_stream_redactor_holds_back_only_a_possible_token_start():
    redactor = SecretScrubber({REAL_TOKEN: PLACEHOLDER}).stream()
    assert redactor(b"hello world") == b"hello world"
    assert redactor(b"prefix sk-ant-a") == b"prefix "
    assert redactor(b"pi03-" + b"R" * 40 + b" tail") == PLACEHOLDER.encode() + b" tail"
    assert redactor(b"ends with sk") == b"ends with "
    assert redactor(b"") == b"sk"


def test_reflected_token_is_redacted_in_compressed_body():
    addon = make_addon()
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    flow.response = http.Response.make(200, b"", {"Content-Encoding": "gzip"})
    flow.response.content = f'{{"echo": "{REAL_TOKEN}"}}'.encode()  # encoded as gzip by mitmproxy
    addon.responseheaders(flow)
    assert not flow.response.stream
    run(addon.response(flow))
    assert flow.response.headers["content-encoding"] == "gzip"
    assert REAL_TOKEN.encode() not in flow.response.content
    assert PLACEHOLDER.encode() in flow.response.content


def test_token_never_reaches_the_log():
    out = io.StringIO()
    config = make_config()
    addon = egress.Egress(config, SECRETS, resolve=fake_resolve,
                          emit=egress.json_line_emitter(out, SecretScrubber({REAL_TOKEN: PLACEHOLDER})))
    flows = [
        tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages", headers={"x-api-key": PLACEHOLDER}),
        tunnel_flow(addon, "POST", "api.anthropic.com", f"/v1/x?leak={REAL_TOKEN}"),
        tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages", content=REAL_TOKEN.encode()),
        plain_flow("POST", "http://api.anthropic.com/v1/messages"),
    ]
    for flow in flows:
        run(addon.request(flow))
    addon.emit({"event": "test", "host": REAL_TOKEN})  # even a careless caller is scrubbed
    log = out.getvalue()
    assert len(log.splitlines()) >= len(flows) + 1
    assert REAL_TOKEN not in log and "R" * 40 not in log
    for line in log.splitlines():
        record = json.loads(line)
        assert {"event", "reason", "method", "host", "path", "pattern", "where"} <= set(record) or record["event"] == "test"


def test_logs_drop_query_strings_and_redact_secrets_in_paths():
    records: list = []
    addon = make_addon(records)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", f"/v1/{FAKE_AWS_KEY}/x?q=secret-ish")
    run(addon.request(flow))
    assert records[-1]["path"] == "/v1/[REDACTED:aws_access_key_id]/x"


# -- pipelock's scan API --------------------------------------------------------------------


class FakePipelockScanner:
    def __init__(self, result=None, error: Exception | None = None):
        self.result, self.error, self.seen = result or [], error, []

    def scan(self, parts, locate=True):
        self.seen.append(parts)
        if self.error:
            raise self.error
        return self.result


def test_pipelock_sees_the_request_before_the_token():
    scanner = FakePipelockScanner()
    addon = make_addon(pipelock=scanner)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages", headers={"x-api-key": PLACEHOLDER},
                       content=b"hello")
    run(addon.request(flow))
    assert_allowed(flow)
    (parts,) = scanner.seen
    assert ("x-api-key", PLACEHOLDER) in parts.headers and parts.body == "hello"
    assert REAL_TOKEN not in parts.as_text()


def test_pipelock_match_blocks():
    scanner = FakePipelockScanner(result=[dlp.DlpMatch("pipelock:DLP-Stripe Key", "request")])
    addon = make_addon(pipelock=scanner)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    assert "pipelock:DLP-Stripe Key" in assert_blocked(flow, "dlp_match")


def test_pipelock_failure_fails_closed():
    addon = make_addon(pipelock=FakePipelockScanner(error=pipelock_scan.DlpUnavailable("pipelock scan API unreachable")))
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages")
    run(addon.request(flow))
    assert_blocked(flow, "dlp_unavailable")
    assert "x-api-key" not in flow.request.headers


def test_builtin_match_skips_pipelock():
    scanner = FakePipelockScanner()
    addon = make_addon(pipelock=scanner)
    flow = tunnel_flow(addon, "POST", "www.example.com", "/", content=FAKE_AWS_KEY.encode())
    run(addon.request(flow))
    assert_blocked(flow, "dlp_match")
    assert scanner.seen == []


# -- pinning (anti DNS rebinding) -----------------------------------------------------------


def server_hook_data(host: str, port: int):
    server = tflow.tserver_conn()
    server.address = (host, port)
    server.sni = host
    return server_hooks.ServerConnectionHookData(client=tflow.tclient_conn(), server=server)


def test_direct_mode_dials_the_checked_address_and_keeps_sni():
    addon = make_addon()
    flow = tunnel_flow(addon, "GET", "www.example.com", "/")
    run(addon.request(flow))
    data = server_hook_data("www.example.com", 443)
    addon.server_connect(data)
    assert data.server.address == ("93.184.215.14", 443)
    assert data.server.sni == "www.example.com"
    assert not data.server.error
    addon.server_connected(data)
    assert data.server.address == ("www.example.com", 443)  # so mitmproxy can reuse the connection


def test_direct_mode_refuses_an_unchecked_destination():
    addon = make_addon()
    data = server_hook_data("www.example.com", 443)
    addon.server_connect(data)
    assert data.server.error == "destination_unchecked"


def test_upstream_mode_does_not_pin():
    addon = make_addon(config=make_config(upstream_proxy="http://127.0.0.1:8888"))
    data = server_hook_data("127.0.0.1", 8888)
    addon.server_connect(data)
    assert data.server.address == ("127.0.0.1", 8888) and not data.server.error


# -- other protocols ------------------------------------------------------------------------


def test_raw_tcp_is_refused():
    records: list = []
    addon = make_addon(records)
    flow = tflow.ttcpflow()
    addon.tcp_start(flow)
    assert flow.server_conn.error == "tcp_not_allowed"
    assert records[-1]["reason"] == "tcp_not_allowed"


def test_websocket_secret_from_guest_is_dropped():
    addon = make_addon()
    flow = tflow.twebsocketflow()
    flow.websocket.messages[-1].from_client = True
    flow.websocket.messages[-1].content = f"key {FAKE_AWS_KEY}".encode()
    run(addon.websocket_message(flow))
    assert flow.websocket.messages[-1].dropped


def test_websocket_reflected_token_is_redacted():
    addon = make_addon()
    flow = tflow.twebsocketflow()
    flow.websocket.messages[-1].from_client = False
    flow.websocket.messages[-1].content = f"echo {REAL_TOKEN}".encode()
    run(addon.websocket_message(flow))
    assert flow.websocket.messages[-1].content == f"echo {PLACEHOLDER}".encode()


# -- the addon inside a mitmproxy master ----------------------------------------------------


def test_addon_loads_in_a_mitmproxy_context():
    async def scenario():
        addon = make_addon()
        with taddons.context(addon):
            flow = tunnel_flow(addon, "GET", "www.example.com", "/")
            await addon.request(flow)
            assert_allowed(flow)

    run(scenario())


# -- launcher -------------------------------------------------------------------------------


def test_missing_token_env_names_the_variable(capsys, tmp_path, monkeypatch):
    routes = write_routes(tmp_path, 18080, 18443, private=False)
    monkeypatch.delenv("BOTTLE_TEST_TOKEN", raising=False)
    assert egress.main(["--routes", str(routes), "--ca-dir", str(tmp_path)]) == 2
    assert "BOTTLE_TEST_TOKEN" in capsys.readouterr().err


def test_missing_token_never_prints_other_values(capsys, tmp_path, monkeypatch):
    routes = write_routes(tmp_path, 18080, 18443, private=False)
    monkeypatch.setenv("BOTTLE_TEST_TOKEN", "")
    monkeypatch.setenv("UNRELATED_SECRET", "do-not-print-me")
    assert egress.main(["--routes", str(routes), "--ca-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "BOTTLE_TEST_TOKEN" in captured.err and "do-not-print-me" not in captured.err + captured.out


def test_malformed_routes_exit_with_the_key(capsys, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\nagent: a\nlisten: nope\n")
    assert egress.main(["--routes", str(routes), "--ca-dir", str(tmp_path)]) == 2
    assert "listen" in capsys.readouterr().err


def test_options_for_direct_and_upstream_modes(tmp_path):
    direct = egress.mitmproxy_options(make_config(), tmp_path, None)
    assert direct["mode"] == ["regular"] and direct["connection_strategy"] == "lazy"
    assert direct["listen_host"] == "127.0.0.1" and direct["listen_port"] == 8080
    assert "ssl_verify_upstream_trusted_ca" not in direct
    upstream = egress.mitmproxy_options(make_config(upstream_proxy="http://127.0.0.1:8888"), tmp_path,
                                        tmp_path / "upstream-ca.pem")
    assert upstream["mode"] == ["upstream:http://127.0.0.1:8888"]
    assert upstream["ssl_verify_upstream_trusted_ca"] == str(tmp_path / "upstream-ca.pem")


def test_pipelock_scan_token_from_env_or_pipelock_yaml(tmp_path):
    config = tmp_path / "pipelock.yaml"
    config.write_text("scan_api:\n  listen: 127.0.0.1:8889\n  auth:\n    bearer_tokens: [from-file]\n")
    assert egress.pipelock_scan_token({}, config) == "from-file"
    assert egress.pipelock_scan_token({egress.PIPELOCK_TOKEN_ENV: "from-env"}, config) == "from-env"
    assert egress.pipelock_scan_token({}, tmp_path / "missing.yaml") == ""
    config.write_text("scan_api: [")
    assert egress.pipelock_scan_token({}, config) == ""


def test_ecdsa_bottle_ca_mints_leaf_certs_that_verify(tmp_path):
    ca_dir = tmp_path / "ca"
    ca_key, ca_cert = make_ca(ca_dir, "bottle test CA")
    assert (ca_dir / "ca-key.pem").read_text().startswith("-----BEGIN EC PRIVATE KEY-----")
    confdir = tmp_path / "conf"
    egress.write_confdir(ca_dir, confdir)
    assert oct((confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    entry = store.get_cert("api.anthropic.com", [x509.DNSName("api.anthropic.com")])
    leaf = x509.load_pem_x509_certificate(entry.cert.to_pem())
    leaf.verify_directly_issued_by(ca_cert)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    if shutil.which("openssl"):
        leaf_path = tmp_path / "leaf.pem"
        leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.pem"), str(leaf_path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ===========================================================================================
# integration: the real egress main() in a subprocess, all traffic on 127.0.0.1


def make_ca(directory: Path, name: str):
    """An ECDSA P-256 CA written as ca.pem + ca-key.pem (SEC1), like the `ca` task does."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "ca-key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return key, cert


def make_leaf(directory: Path, ca_key, ca_cert, hostname: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "leaf.pem", directory / "leaf-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def write_routes(tmp_path: Path, listen_port: int, upstream_port: int, *, private: bool = True,
                 upstream_proxy: str = "", scan_url: str = "", max_body_bytes: int = 1 << 20) -> Path:
    routes = {
        "version": 1, "agent": "integration", "listen": f"127.0.0.1:{listen_port}",
        "upstream_proxy": upstream_proxy, "pipelock_scan_url": scan_url,
        "routes": [{
            "host": "localhost", "methods": ["GET", "POST"], "paths": ["/v1/*"], "private_network": private,
            "ports": [upstream_port], "max_body_bytes": max_body_bytes,
            "token": {"env": "BOTTLE_TEST_TOKEN", "header": "x-api-key", "format": "{value}",
                      "placeholder": "bottle-placeholder-BOTTLE_TEST_TOKEN"},
        }],
    }
    path = tmp_path / "routes.yaml"
    path.write_text(json.dumps(routes))  # JSON is YAML
    return path


class EchoServer:
    """HTTPS on 127.0.0.1 with its own CA; records what it receives and reflects x-api-key back."""

    def __init__(self, cert: Path, key: Path):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                received.append({"path": self.path, "headers": dict(self.headers), "body": body.decode()})
                reply = json.dumps({"path": self.path, "x-api-key": self.headers.get("x-api-key")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Echo-Key", self.headers.get("x-api-key") or "")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = handle_one

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


INTEGRATION_TOKEN = "sk-ant-api03-" + "I" * 40
INTEGRATION_PLACEHOLDER = "bottle-placeholder-BOTTLE_TEST_TOKEN"


@contextlib.contextmanager
def running_bottle(tmp_path: Path, *, upstream_proxy: str = "", scan_url: str = "", env_extra: dict | None = None):
    """egress (subprocess) + echo upstream, both on 127.0.0.1."""
    bottle_ca_dir = tmp_path / "bottle-ca"
    make_ca(bottle_ca_dir, "bottle CA")
    upstream_ca_key, upstream_ca_cert = make_ca(tmp_path / "upstream-ca", "test upstream CA")
    leaf_cert, leaf_key = make_leaf(tmp_path, upstream_ca_key, upstream_ca_cert, "localhost")
    echo = EchoServer(leaf_cert, leaf_key)
    port = free_port()
    routes = write_routes(tmp_path, port, echo.port, upstream_proxy=upstream_proxy, scan_url=scan_url)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(BOTTLE_TEST_TOKEN=INTEGRATION_TOKEN, PYTHONPATH=str(REPO), **(env_extra or {}))
    stdout, stderr = tmp_path / "egress.out", tmp_path / "egress.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bottle_tasks.sidecars.egress", "--routes", str(routes),
             "--ca-dir", str(bottle_ca_dir), "--upstream-ca", str(tmp_path / "upstream-ca" / "ca.pem"),
             "--confdir", str(tmp_path / "mitmproxy")],
            cwd=REPO, env=env, stdout=out, stderr=err,
        )
    try:
        deadline = time.time() + 20
        while True:
            assert proc.poll() is None, f"egress exited: {stderr.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline, f"egress did not listen: {stderr.read_text()}"
                time.sleep(0.1)
        yield SimpleNamespace(port=port, echo=echo, ca=bottle_ca_dir / "ca.pem", stdout=stdout, stderr=stderr,
                              tmp=tmp_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        echo.close()


@pytest.fixture
def bottle(tmp_path):
    with running_bottle(tmp_path) as running:
        yield running


def client_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))  # trusts only the bottle CA
    return context


def connect_tunnel(port: int, authority: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def https_through_proxy(bottle, method: str, path: str, *, headers: dict, body: bytes = b"", requests: int = 1):
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", bottle.port, context=client_context(bottle.ca), timeout=15)
    conn.set_tunnel("localhost", bottle.echo.port)
    responses = []
    for _ in range(requests):  # several requests on one connection: keep-alive through the pin
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        responses.append((response.status, dict(response.getheaders()), response.read()))
    conn.close()
    return responses


def log_records(bottle) -> list[dict]:
    time.sleep(0.2)
    return [json.loads(line) for line in bottle.stdout.read_text().splitlines() if line.strip()]


def test_integration_routed_https_gets_the_real_token(bottle):
    responses = https_through_proxy(bottle, "POST", "/v1/messages", requests=2,
                                    headers={"x-api-key": INTEGRATION_PLACEHOLDER, "Content-Type": "application/json"},
                                    body=b'{"hello": "world"}')
    for status, headers, body in responses:
        assert status == 200
        # the upstream reflected the key; egress turned it back into the placeholder
        assert headers["X-Echo-Key"] == INTEGRATION_PLACEHOLDER
        assert json.loads(body)["x-api-key"] == INTEGRATION_PLACEHOLDER
    assert [r["headers"]["x-api-key"] for r in bottle.echo.received] == [INTEGRATION_TOKEN] * 2
    assert bottle.echo.received[0]["body"] == '{"hello": "world"}'
    records = log_records(bottle)
    assert [r["event"] for r in records if r["event"] == "allow"] == ["allow", "allow"]
    output = bottle.stdout.read_text() + bottle.stderr.read_text()
    assert INTEGRATION_TOKEN not in output


def test_integration_dlp_blocks_and_nothing_reaches_upstream(bottle):
    ((status, headers, body),) = https_through_proxy(
        bottle, "POST", "/v1/messages", headers={"x-api-key": INTEGRATION_PLACEHOLDER},
        body=json.dumps({"k": FAKE_AWS_KEY}).encode())
    assert status == 403 and headers[egress.BLOCK_HEADER] == "dlp_match"
    assert bottle.echo.received == []
    assert FAKE_AWS_KEY not in bottle.stdout.read_text() + bottle.stderr.read_text()


def test_integration_unrouted_host_gets_403_with_reason(bottle):
    sock, head = connect_tunnel(bottle.port, "unrouted.invalid:443")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert b"X-Bottle-Block-Reason: route_not_allowed" in head
    # and a plain-HTTP request through the proxy
    with socket.create_connection(("127.0.0.1", bottle.port), timeout=10) as plain:
        plain.sendall(b"GET http://unrouted.invalid/ HTTP/1.1\r\nHost: unrouted.invalid\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := plain.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403") and b"route_not_allowed" in reply
    assert b"claude-bottle egress blocked this request: route_not_allowed (" in reply


@pytest.mark.parametrize("server_hostname, reason", [(None, "sni_missing"), ("other.localhost", "sni_mismatch")])
def test_integration_bad_sni_is_refused(bottle, server_hostname, reason):
    sock, head = connect_tunnel(bottle.port, f"localhost:{bottle.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(bottle.ca))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        with context.wrap_socket(sock, server_hostname=server_hostname) as tls_sock:
            tls_sock.sendall(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{bottle.echo.port}\r\n\r\n".encode())
            if not tls_sock.recv(1):
                raise ConnectionError("closed")
    sock.close()
    assert bottle.echo.received == []
    assert any(r["reason"] == reason for r in log_records(bottle))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_integration_http2_client(bottle):
    version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    if "HTTP2" not in version:
        pytest.skip("curl without HTTP/2")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--proxy", f"http://127.0.0.1:{bottle.port}", "--cacert", str(bottle.ca),
         "-H", f"x-api-key: {INTEGRATION_PLACEHOLDER}", "-w", "\n%{http_version} %{http_code}",
         f"https://localhost:{bottle.echo.port}/v1/models"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    body, _, status_line = result.stdout.rpartition("\n")
    assert status_line == "2 200"
    assert json.loads(body)["x-api-key"] == INTEGRATION_PLACEHOLDER
    assert bottle.echo.received[-1]["headers"]["x-api-key"] == INTEGRATION_TOKEN


# -- upstream mode: egress -> CONNECT proxy (stands in for pipelock) -> echo; plus the scan API --


class ConnectProxy:
    """A minimal CONNECT-only proxy on 127.0.0.1 that relays only to 127.0.0.1/localhost."""

    def __init__(self):
        self.targets: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, _, port = target.rpartition(":")
        self.targets.append(target)
        if method != "CONNECT" or host not in ("localhost", "127.0.0.1"):
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def fake_scan_api() -> FakePipelock:
    """pipelock's POST /api/v1/scan on 127.0.0.1: denies text containing the marker."""
    def reply(payload):
        deny = "EXFIL-MARKER" in (payload["input"].get("text") or payload["input"].get("content") or "")
        return 200, {"status": "completed", "decision": "deny" if deny else "allow", "kind": "dlp",
                     "scan_id": "scan-1", "engine_version": "fake",
                     "findings": [{"scanner": "dlp", "rule_id": "DLP-Custom Marker", "severity": "high",
                                   "message": "m"}] if deny else []}
    return FakePipelock(reply)


def test_integration_upstream_mode_with_scan_api(tmp_path):
    proxy, scan_api = ConnectProxy(), fake_scan_api()
    try:
        with running_bottle(tmp_path, upstream_proxy=f"http://127.0.0.1:{proxy.port}", scan_url=scan_api.url,
                            env_extra={egress.PIPELOCK_TOKEN_ENV: "scan-api-bearer"}) as bottle:
            ((status, headers, body),) = https_through_proxy(
                bottle, "POST", "/v1/messages", headers={"x-api-key": INTEGRATION_PLACEHOLDER}, body=b"fine")
            assert status == 200, body
            assert bottle.echo.received[-1]["headers"]["x-api-key"] == INTEGRATION_TOKEN
            assert proxy.targets == [f"localhost:{bottle.echo.port}"]  # egress went through the upstream proxy
            payload, auth = [(p, a) for p, a in scan_api.requests if p["kind"] == "dlp"][-1]
            text = payload["input"]["text"]
            assert auth == "Bearer scan-api-bearer"
            assert INTEGRATION_PLACEHOLDER in text and INTEGRATION_TOKEN not in text  # scanned before injection

            ((status, headers, body),) = https_through_proxy(
                bottle, "POST", "/v1/messages", headers={"x-api-key": INTEGRATION_PLACEHOLDER},
                body=b"EXFIL-MARKER")
            assert status == 403 and headers[egress.BLOCK_HEADER] == "dlp_match"
            assert b"pipelock:DLP-Custom Marker" in body
            assert len(bottle.echo.received) == 1
    finally:
        proxy.close()
        scan_api.close()


# -- request bodies, request targets and ports against the real egress ---------------------------


def tls_tunnel(bottle) -> ssl.SSLSocket:
    """A TLS connection to the echo upstream through a CONNECT tunnel, bottle CA trusted."""
    sock, head = connect_tunnel(bottle.port, f"localhost:{bottle.echo.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    return client_context(bottle.ca).wrap_socket(sock, server_hostname="localhost")


def read_response_head(sock: socket.socket) -> bytes:
    """Up to the end of the response head, or what came before the peer closed (a bounded read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_integration_oversized_content_length_gets_413_before_the_body_is_sent(bottle):
    # Only the headers are sent: a proxy that waits for the body never answers (the read times out).
    with tls_tunnel(bottle) as tls_sock:
        tls_sock.settimeout(15)
        tls_sock.sendall(f"POST /v1/upload HTTP/1.1\r\nHost: localhost:{bottle.echo.port}\r\n"
                         f"Content-Length: {50 << 30}\r\n\r\n".encode())
        head = read_response_head(tls_sock)
        rest = tls_sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"X-Bottle-Block-Reason: body_too_large" in head
    assert b"max_body_bytes (1048576 bytes)" in head + rest
    assert bottle.echo.received == []
    assert any(r["reason"] == "body_too_large" for r in log_records(bottle))


def test_integration_chunked_flood_is_cut_off_and_a_normal_request_is_served(bottle):
    with tls_tunnel(bottle) as tls_sock:
        tls_sock.settimeout(15)
        tls_sock.sendall(f"POST /v1/upload HTTP/1.1\r\nHost: localhost:{bottle.echo.port}\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"f" * (64 << 10))
        head = b""
        for _ in range(64):  # 4 MiB at most, four times the route's limit; stops at the answer
            if select.select([tls_sock], [], [], 0)[0] or tls_sock.pending():
                tls_sock.settimeout(0.2)  # readable may be only a TLS session ticket: look, then go on
                try:
                    head += tls_sock.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    pass
                tls_sock.settimeout(15)
                if head:
                    break
            try:
                tls_sock.sendall(chunk)
            except OSError:
                break
        head += read_response_head(tls_sock) if b"\r\n\r\n" not in head else b""
    assert head.startswith(b"HTTP/1.1 413") and b"body_too_large" in head, head
    assert bottle.echo.received == []
    ((status, _, body),) = https_through_proxy(bottle, "POST", "/v1/messages", headers={}, body=b'{"after": "flood"}')
    assert status == 200 and json.loads(body)["path"] == "/v1/messages"


def test_integration_gzip_bomb_is_refused_and_others_are_served(bottle):
    bomb = gzip_bomb(600)  # about 600 KiB that decode to 600 MiB
    ((status, headers, body),) = https_through_proxy(bottle, "POST", "/v1/upload", body=bomb,
                                                     headers={"Content-Encoding": "gzip"})
    assert status == 413 and headers[egress.BLOCK_HEADER] in ("compression_ratio", "body_too_large"), body
    ((status, _, _),) = https_through_proxy(bottle, "GET", "/v1/models", headers={})
    assert status == 200 and [r["path"] for r in bottle.echo.received] == ["/v1/models"]


def test_integration_absolute_form_with_a_spoofed_host_or_https_in_the_clear_is_refused(bottle):
    for request, reason in (
        (f"GET http://localhost:{bottle.echo.port}/v1/x HTTP/1.1\r\nHost: other.example\r\n", "authority_mismatch"),
        (f"GET https://localhost:{bottle.echo.port}/v1/x HTTP/1.1\r\nHost: localhost:{bottle.echo.port}\r\n",
         "https_requires_connect"),
    ):
        with socket.create_connection(("127.0.0.1", bottle.port), timeout=15) as plain:
            plain.sendall((request + "Connection: close\r\n\r\n").encode())
            reply = read_response_head(plain)
        assert reply.startswith(b"HTTP/1.1 403") and f"X-Bottle-Block-Reason: {reason}".encode() in reply, reply
    assert bottle.echo.received == []


def test_integration_path_as_is_traversal_is_refused(bottle):
    for path in ("/v1/../admin/delete", "/v1/%2e%2e/admin/delete"):
        ((status, headers, _),) = https_through_proxy(bottle, "POST", path, headers={})
        assert status == 403 and headers[egress.BLOCK_HEADER] == "path_ambiguous"
    assert bottle.echo.received == []


def test_integration_connect_to_an_unlisted_port_is_refused(bottle):
    sock, head = connect_tunnel(bottle.port, "localhost:22")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403") and b"X-Bottle-Block-Reason: port_not_allowed" in head


def test_body_limit_refuses_to_install_on_a_mitmproxy_it_does_not_know(monkeypatch):
    from mitmproxy.proxy.layers import http as layers

    monkeypatch.setattr(layers.HttpStream, "check_body_size", lambda self, request, extra=None: None)
    with pytest.raises(RuntimeError, match="cannot limit request bodies"):
        egress.install_body_limit(lambda flow, buffered: None)
