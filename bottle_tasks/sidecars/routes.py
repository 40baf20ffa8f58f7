"""routes.yaml: the egress allowlist and token slots (shape in docs/bundle-contract.md).

Loaded once at egress start; ``parse_route`` also checks each route of the policy overlay (overlay.py).
Every error names the file and the key, so a bad render is obvious from the bundle log.
Stdlib + PyYAML only: this runs inside the bundle image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottle_tasks.contract import (
    DEFAULT_MAX_BODY_BYTES, DEFAULT_ROUTE_PORTS, DLP_ACTIONS, RESPONSE_ACTIONS, VALUE_MARKER, Route, TokenSlot,
    normalize_host,
)
from bottle_tasks.sidecars.configfile import (
    ENV_NAME, bool_value, check_http_url, config_failer, list_of, listen_address, nested_mapping, read_yaml,
    refuse_duplicates, string_list, string_value, versioned_document,
)

SUPPORTED_VERSION = 1
MAX_BODY_BYTES_CEILING = 1 << 30  # egress buffers a body before it forwards it: 1 GiB at most

_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_METHOD = re.compile(r"^[A-Z]+$")
ROUTE_KEYS = frozenset({"host", "methods", "paths", "ports", "private_network", "max_body_bytes", "dlp", "responses",
                        "token"})


class RoutesError(ValueError):
    """routes.yaml is missing or malformed; the message names the file and the key."""


UNKNOWN_HOST_MODES = ("deny", "ask", "learn")
MAX_HOLD_SECONDS = 3600


def route_for(routes: tuple[Route, ...], host: str) -> Route | None:
    """First route matching host; exact routes win over wildcards."""
    exact = [r for r in routes if not r.host.startswith("*.") and r.matches_host(host)]
    if exact:
        return exact[0]
    return next((r for r in routes if r.matches_host(host)), None)


@dataclass(frozen=True)
class RoutesConfig:
    agent: str
    listen_host: str
    listen_port: int
    upstream_proxy: str  # "" = egress dials upstreams itself
    pipelock_scan_url: str  # "" = no pipelock scan API
    routes: tuple[Route, ...]
    agent_file: str = ""            # the host's agent file, named in a 403's advice
    unknown_hosts: str = "deny"     # a host no route names: deny, ask (held for a human) or learn (allowed, logged)
    hold_seconds: int = 300         # ask: how long a request waits for a decision
    approvals_dir: str = ""         # ask: the supervise queue egress files held requests into
    overlay: str = ""               # routes a human approved for good (scope=always), re-read live
    unknown_private_network: bool = False  # hosts admitted by ask or learn (and the overlay's) may resolve privately

    def route_for(self, host: str) -> Route | None:
        return route_for(self.routes, host)

    def token_slots(self) -> tuple[TokenSlot, ...]:
        return tuple(r.token for r in self.routes if r.token is not None)


def load_routes(path: str | Path) -> RoutesConfig:
    return parse_routes(read_yaml(path, RoutesError, "routes file"), source=str(path))


def parse_routes(data: Any, *, source: str = "routes.yaml") -> RoutesConfig:
    fail = config_failer(RoutesError, source)
    versioned_document(data, {"agent", "listen", "upstream_proxy", "pipelock_scan_url", "routes", "agent_file",
                              "unknown_hosts", "hold_seconds", "approvals_dir", "overlay", "unknown_private_network"}, SUPPORTED_VERSION, fail)

    agent = string_value(data, "agent", "agent", fail, required=True)
    listen_host, listen_port = listen_address(string_value(data, "listen", "listen", fail, required=True), "listen",
                                              fail, allow_port_zero=False)
    upstream_proxy = check_http_url(string_value(data, "upstream_proxy", "upstream_proxy", fail), "upstream_proxy",
                                    fail)
    scan_url = check_http_url(string_value(data, "pipelock_scan_url", "pipelock_scan_url", fail), "pipelock_scan_url",
                              fail)
    routes = tuple(parse_route(item, f"routes[{i}]", fail) for i, item in enumerate(list_of(data, "routes", fail)))
    refuse_duplicates([route.host for route in routes], "routes", "host", fail)
    unknown_hosts = _choice(data, "unknown_hosts", UNKNOWN_HOST_MODES, "unknown_hosts", fail) or "deny"
    hold = data.get("hold_seconds", 300)
    if not _is_int(hold) or not 1 <= hold <= MAX_HOLD_SECONDS:
        raise fail("hold_seconds", f"must be a number of seconds from 1 to {MAX_HOLD_SECONDS}, got {hold!r}")
    approvals_dir = string_value(data, "approvals_dir", "approvals_dir", fail)
    if unknown_hosts == "ask" and not approvals_dir:
        raise fail("approvals_dir", "unknown_hosts: ask needs the supervise queue's directory")
    return RoutesConfig(agent, listen_host, listen_port, upstream_proxy, scan_url, routes,
                        agent_file=string_value(data, "agent_file", "agent_file", fail), unknown_hosts=unknown_hosts,
                        hold_seconds=hold, approvals_dir=approvals_dir,
                        overlay=string_value(data, "overlay", "overlay", fail),
                        unknown_private_network=bool_value(data, "unknown_private_network", "unknown_private_network",
                                                           fail))


def parse_route(item: Any, key: str, fail, known: frozenset[str] = ROUTE_KEYS) -> Route:
    """One route mapping at key (``routes[0]``); known: the keys this file may give a route."""
    nested_mapping(item, set(known), key, fail)

    host = normalize_host(string_value(item, "host", f"{key}.host", fail, required=True))
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels) or (host.startswith("*.") and len(labels) < 2):
        raise fail(f"{key}.host", f"must be a host name or \"*.domain\", got {host!r}")

    methods = string_list(item.get("methods"), f"{key}.methods", fail)
    for i, method in enumerate(methods):
        if not _METHOD.match(method.upper()):
            raise fail(f"{key}.methods[{i}]", f"not an HTTP method: {method!r}")
    paths = string_list(item.get("paths"), f"{key}.paths", fail)
    for i, glob in enumerate(paths):
        if not glob.startswith(("/", "*")):
            raise fail(f"{key}.paths[{i}]", f"must start with \"/\" (a glob on the path), got {glob!r}")

    private_network = bool_value(item, "private_network", f"{key}.private_network", fail)
    ports = _ports(item.get("ports"), f"{key}.ports", fail)
    max_body = item.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    if not _is_int(max_body) or not 1 <= max_body <= MAX_BODY_BYTES_CEILING:
        raise fail(f"{key}.max_body_bytes", f"must be a number of bytes from 1 to {MAX_BODY_BYTES_CEILING}, got {max_body!r}")

    dlp_action = _choice(item, "dlp", DLP_ACTIONS, f"{key}.dlp", fail)
    response_action = _choice(item, "responses", RESPONSE_ACTIONS, f"{key}.responses", fail)

    token = None
    if item.get("token") is not None:
        token = _token(item["token"], f"{key}.token", fail)
    return Route(host, tuple(m.upper() for m in methods), tuple(paths), private_network, token,
                 ports=ports, max_body_bytes=max_body, dlp=dlp_action, responses=response_action)


def _choice(item: Any, name: str, choices: tuple[str, ...], key: str, fail) -> str:
    """"" (absent) leaves the route's default."""
    value = string_value(item, name, key, fail)
    if value and value not in choices:
        raise fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML true is not port 1


def _ports(value: Any, key: str, fail) -> tuple[int, ...]:
    if value is None:
        return DEFAULT_ROUTE_PORTS
    if not isinstance(value, list) or not value:
        raise fail(key, "must be a non-empty list of port numbers, e.g. [443]")
    for i, port in enumerate(value):
        if not _is_int(port) or not 1 <= port <= 65535:
            raise fail(f"{key}[{i}]", f"must be a port number from 1 to 65535, got {port!r}")
    if len(set(value)) != len(value):
        raise fail(key, f"lists a port twice: {value}")
    return tuple(value)


def _token(item: Any, key: str, fail) -> TokenSlot:
    nested_mapping(item, {"env", "header", "format", "placeholder"}, key, fail,
                   "must be a mapping with env, header, format, placeholder")
    env = string_value(item, "env", f"{key}.env", fail, required=True)
    if not ENV_NAME.match(env):
        raise fail(f"{key}.env", f"not an environment variable name: {env!r}")
    header = string_value(item, "header", f"{key}.header", fail, required=True)
    if not _HEADER_NAME.match(header):
        raise fail(f"{key}.header", f"not an HTTP header name: {header!r}")
    fmt = string_value(item, "format", f"{key}.format", fail) or VALUE_MARKER
    if fmt.count(VALUE_MARKER) != 1 or "\r" in fmt or "\n" in fmt:
        raise fail(f"{key}.format", f"must contain {VALUE_MARKER} exactly once, on one line")
    placeholder = string_value(item, "placeholder", f"{key}.placeholder", fail, required=True)
    if len(placeholder) < 8:
        raise fail(f"{key}.placeholder", "must be at least 8 characters (it replaces reflected tokens)")
    return TokenSlot(env=env, header=header.lower(), format=fmt, placeholder=placeholder)
