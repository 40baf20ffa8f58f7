"""routes.yaml loading and matching (bottle_tasks.sidecars.routes)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bottle_tasks.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_ROUTE_PORTS, Route, TokenSlot
from bottle_tasks.sidecars.routes import RoutesError, load_routes, parse_routes

EXAMPLE = textwrap.dedent(
    """\
    version: 1
    agent: "example"
    listen: "10.243.7.2:8080"
    upstream_proxy: "http://127.0.0.1:8888"
    pipelock_scan_url: "http://127.0.0.1:8889/api/v1/scan"
    routes:
      - host: "api.anthropic.com"
        methods: ["POST"]
        paths: ["/v1/*"]
        private_network: false
        token:
          env: "ANTHROPIC_API_KEY"
          header: "x-api-key"
          format: "{value}"
          placeholder: "bottle-placeholder-ANTHROPIC_API_KEY"
      - host: "*.githubusercontent.com"
      - host: "GitHub.com"
        methods: ["get", "POST"]
    """
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return path


def minimal(**overrides) -> dict:
    data = {"version": 1, "agent": "a", "listen": "127.0.0.1:8080", "routes": []}
    data.update(overrides)
    return data


def test_contract_example_loads(tmp_path):
    config = load_routes(write(tmp_path, EXAMPLE))
    assert config.agent == "example"
    assert (config.listen_host, config.listen_port) == ("10.243.7.2", 8080)
    assert config.upstream_proxy == "http://127.0.0.1:8888"
    assert config.pipelock_scan_url == "http://127.0.0.1:8889/api/v1/scan"
    anthropic, wildcard, github = config.routes
    assert anthropic == Route(
        host="api.anthropic.com",
        methods=("POST",),
        paths=("/v1/*",),
        private_network=False,
        token=TokenSlot("ANTHROPIC_API_KEY", "x-api-key", "{value}", "bottle-placeholder-ANTHROPIC_API_KEY"),
    )
    assert wildcard.token is None and wildcard.methods == () and wildcard.paths == ()
    assert github.host == "github.com" and github.methods == ("GET", "POST")
    assert config.token_slots() == (anthropic.token,)


def test_routes_are_frozen(tmp_path):
    config = load_routes(write(tmp_path, EXAMPLE))
    with pytest.raises(AttributeError):
        config.routes[0].host = "evil.com"  # type: ignore[misc]


@pytest.mark.parametrize(
    "host, expected",
    [
        ("api.anthropic.com", True),
        ("API.Anthropic.COM", True),
        ("api.anthropic.com.", True),
        ("anthropic.com", False),
        ("xapi.anthropic.com", False),
        ("api.anthropic.com.evil.com", False),
    ],
)
def test_exact_host_matching(host, expected):
    assert Route("api.anthropic.com").matches_host(host) is expected


@pytest.mark.parametrize(
    "host, expected",
    [
        ("raw.githubusercontent.com", True),
        ("a.b.githubusercontent.com", True),
        ("RAW.GitHubUserContent.com", True),
        ("githubusercontent.com", False),  # subdomains only, never the apex
        ("evilgithubusercontent.com", False),
        ("githubusercontent.com.evil.com", False),
    ],
)
def test_wildcard_host_matching(host, expected):
    assert Route("*.githubusercontent.com").matches_host(host) is expected


def test_exact_route_wins_over_wildcard():
    config = parse_routes(minimal(routes=[
        {"host": "*.example.com"},
        {"host": "api.example.com", "methods": ["GET"]},
    ]))
    assert config.route_for("api.example.com").methods == ("GET",)
    assert config.route_for("www.example.com").host == "*.example.com"
    assert config.route_for("example.org") is None


def test_methods_and_paths():
    route = Route("h.example", methods=("POST",), paths=("/v1/*", "/health"))
    assert route.allows_method("post") and not route.allows_method("GET")
    assert route.allows_path("/v1/messages") and route.allows_path("/v1/messages?beta=true")
    assert route.allows_path("/health") and not route.allows_path("/health/x")
    assert not route.allows_path("/V1/messages")  # paths are case-sensitive
    assert not route.allows_path("/v2/messages")
    any_route = Route("h.example")
    assert any_route.allows_method("DELETE") and any_route.allows_path("/anything")


def test_ports_and_body_limit_default_and_parse():
    default, custom = parse_routes(minimal(routes=[
        {"host": "a.example"},
        {"host": "internal.example", "private_network": True, "ports": [6379, 8443], "max_body_bytes": 1024},
    ])).routes
    assert default.ports == DEFAULT_ROUTE_PORTS == (443, 80) and default.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 32 << 20
    assert custom.ports == (6379, 8443) and custom.max_body_bytes == 1024
    assert custom.allows_port(6379) and not custom.allows_port(443) and default.allows_port(80)


def test_token_header_value_uses_format():
    slot = TokenSlot("T", "authorization", "Bearer {value}", "bottle-placeholder-T")
    assert slot.header_value("abc{0}") == "Bearer abc{0}"


def test_empty_routes_and_empty_strings_are_fine():
    config = parse_routes(minimal(routes=None, upstream_proxy="", pipelock_scan_url=""))
    assert config.routes == () and config.upstream_proxy == "" and config.pipelock_scan_url == ""


def test_ipv6_listen():
    config = parse_routes(minimal(listen="[::1]:8080"))
    assert (config.listen_host, config.listen_port) == ("::1", 8080)


@pytest.mark.parametrize(
    "data, key",
    [
        ([1, 2], "(top level)"),
        (minimal(version=2), "version"),
        (minimal(extra=1), "extra"),
        (minimal(agent=None), "agent"),
        (minimal(listen="8080"), "listen"),
        (minimal(listen="0.0.0.0:99999"), "listen"),
        (minimal(upstream_proxy="127.0.0.1:8888"), "upstream_proxy"),
        (minimal(pipelock_scan_url=5), "pipelock_scan_url"),
        (minimal(routes={"host": "a"}), "routes"),
        (minimal(routes=["a.com"]), "routes[0]"),
        (minimal(routes=[{"methods": ["GET"]}]), "routes[0].host"),
        (minimal(routes=[{"host": "bad host"}]), "routes[0].host"),
        (minimal(routes=[{"host": "*.com"}]), "routes[0].host"),
        (minimal(routes=[{"host": "a.com", "hosts": 1}]), "routes[0].hosts"),
        (minimal(routes=[{"host": "a.com", "methods": "GET"}]), "routes[0].methods"),
        (minimal(routes=[{"host": "a.com", "methods": ["G ET"]}]), "routes[0].methods[0]"),
        (minimal(routes=[{"host": "a.com", "paths": ["v1/*"]}]), "routes[0].paths[0]"),
        (minimal(routes=[{"host": "a.com", "private_network": "yes"}]), "routes[0].private_network"),
        (minimal(routes=[{"host": "a.com"}, {"host": "A.com"}]), "routes[1].host"),
        (minimal(routes=[{"host": "a.com", "token": "X"}]), "routes[0].token"),
        (minimal(routes=[{"host": "a.com", "token": {"header": "x", "placeholder": "p" * 8}}]), "routes[0].token.env"),
        (minimal(routes=[{"host": "a.com", "token": {"env": "1X", "header": "x", "placeholder": "p" * 8}}]),
         "routes[0].token.env"),
        (minimal(routes=[{"host": "a.com", "token": {"env": "X", "header": "x y", "placeholder": "p" * 8}}]),
         "routes[0].token.header"),
        (minimal(routes=[{"host": "a.com", "token": {"env": "X", "header": "x", "format": "Bearer",
                                                     "placeholder": "p" * 8}}]), "routes[0].token.format"),
        (minimal(routes=[{"host": "a.com", "token": {"env": "X", "header": "x", "placeholder": "p"}}]),
         "routes[0].token.placeholder"),
        (minimal(routes=[{"host": "a.com", "ports": 443}]), "routes[0].ports"),
        (minimal(routes=[{"host": "a.com", "ports": []}]), "routes[0].ports"),
        (minimal(routes=[{"host": "a.com", "ports": [443, 0]}]), "routes[0].ports[1]"),
        (minimal(routes=[{"host": "a.com", "ports": [65536]}]), "routes[0].ports[0]"),
        (minimal(routes=[{"host": "a.com", "ports": [True]}]), "routes[0].ports[0]"),
        (minimal(routes=[{"host": "a.com", "ports": ["443"]}]), "routes[0].ports[0]"),
        (minimal(routes=[{"host": "a.com", "ports": [443, 443]}]), "routes[0].ports"),
        (minimal(routes=[{"host": "a.com", "max_body_bytes": 0}]), "routes[0].max_body_bytes"),
        (minimal(routes=[{"host": "a.com", "max_body_bytes": "32m"}]), "routes[0].max_body_bytes"),
        (minimal(routes=[{"host": "a.com", "max_body_bytes": True}]), "routes[0].max_body_bytes"),
        (minimal(routes=[{"host": "a.com", "max_body_bytes": (1 << 30) + 1}]), "routes[0].max_body_bytes"),
    ],
)
def test_malformed_routes_name_the_key(data, key):
    with pytest.raises(RoutesError) as err:
        parse_routes(data, source="/etc/bottle/routes.yaml")
    assert str(err.value).startswith(f"/etc/bottle/routes.yaml: {key}:")


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "version: 1\nroutes: [\n")
    with pytest.raises(RoutesError) as err:
        load_routes(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(RoutesError) as err:
        load_routes(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)
