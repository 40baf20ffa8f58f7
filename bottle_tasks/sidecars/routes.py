"""routes.yaml: the egress allowlist and token slots (shape in docs/bundle-contract.md).

Loaded once at egress start. Every error names the file and the key, so a bad render is
obvious from the bundle log. Stdlib + PyYAML only: this runs inside the bundle image.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from bottle_tasks.sidecars.configfile import (
    check_http_url, config_failer, list_of, read_yaml, refuse_duplicates, refuse_unknown_keys, top_level_mapping,
)

SUPPORTED_VERSION = 1
VALUE_MARKER = "{value}"

_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METHOD = re.compile(r"^[A-Z]+$")


class RoutesError(ValueError):
    """routes.yaml is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class TokenSlot:
    env: str  # bundle env var holding the real value
    header: str  # header the value is written into
    format: str  # e.g. "Bearer {value}"
    placeholder: str  # what the guest holds instead of the real value

    def header_value(self, secret: str) -> str:
        # str.replace, not str.format: a "{" in a format string must not be interpreted.
        return self.format.replace(VALUE_MARKER, secret)


@dataclass(frozen=True)
class Route:
    host: str  # lower-case; exact name or "*.example.com"
    methods: tuple[str, ...] = ()  # upper-case; () = any method
    paths: tuple[str, ...] = ()  # fnmatch globs; () = any path
    private_network: bool = False
    token: TokenSlot | None = None

    def matches_host(self, host: str) -> bool:
        host = normalize_host(host)
        if self.host.startswith("*."):
            suffix = self.host[1:]  # ".example.com": subdomains only, not the apex
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def allows_method(self, method: str) -> bool:
        return not self.methods or method.upper() in self.methods

    def allows_path(self, path: str) -> bool:
        path_only = path.split("?", 1)[0].split("#", 1)[0] or "/"
        # fnmatchcase: paths are case-sensitive on the wire, the glob must be too.
        return not self.paths or any(fnmatch.fnmatchcase(path_only, glob) for glob in self.paths)


@dataclass(frozen=True)
class RoutesConfig:
    agent: str
    listen_host: str
    listen_port: int
    upstream_proxy: str  # "" = egress dials upstreams itself
    pipelock_scan_url: str  # "" = no pipelock scan API
    routes: tuple[Route, ...]

    def route_for(self, host: str) -> Route | None:
        """First route matching host; exact routes win over wildcards."""
        exact = [r for r in self.routes if not r.host.startswith("*.") and r.matches_host(host)]
        if exact:
            return exact[0]
        return next((r for r in self.routes if r.matches_host(host)), None)

    def token_slots(self) -> tuple[TokenSlot, ...]:
        return tuple(r.token for r in self.routes if r.token is not None)


def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def load_routes(path: str | Path) -> RoutesConfig:
    return parse_routes(read_yaml(path, RoutesError, "routes file"), source=str(path))


def parse_routes(data: Any, *, source: str = "routes.yaml") -> RoutesConfig:
    fail = config_failer(RoutesError, source)
    top_level_mapping(data, fail)
    refuse_unknown_keys(data, {"version", "agent", "listen", "upstream_proxy", "pipelock_scan_url", "routes"}, "", fail)
    if data.get("version") != SUPPORTED_VERSION:
        raise fail("version", f"must be {SUPPORTED_VERSION}, got {data.get('version')!r}")

    agent = _string(data, "agent", fail, required=True)
    listen_host, listen_port = _listen(_string(data, "listen", fail, required=True), fail)
    upstream_proxy = check_http_url(_string(data, "upstream_proxy", fail), "upstream_proxy", fail)
    scan_url = check_http_url(_string(data, "pipelock_scan_url", fail), "pipelock_scan_url", fail)
    routes = tuple(_route(item, f"routes[{i}]", fail) for i, item in enumerate(list_of(data, "routes", fail)))
    refuse_duplicates([route.host for route in routes], "routes", "host", fail)
    return RoutesConfig(agent, listen_host, listen_port, upstream_proxy, scan_url, routes)


def _string(mapping: dict, key: str, fail, *, required: bool = False, prefix: str = "") -> str:
    value = mapping.get(key)
    if value is None:
        if required:
            raise fail(prefix + key, "is required")
        return ""
    if not isinstance(value, str):
        raise fail(prefix + key, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise fail(prefix + key, "must not be empty")
    return value


def _listen(value: str, fail) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")  # allow "[::]:8080"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail("listen", f"must be \"ip:port\", got {value!r}")
    return host, int(port)


def _route(item: Any, key: str, fail) -> Route:
    if not isinstance(item, dict):
        raise fail(key, "must be a mapping")
    refuse_unknown_keys(item, {"host", "methods", "paths", "private_network", "token"}, key + ".", fail)

    host = normalize_host(_string(item, "host", fail, required=True, prefix=key + "."))
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels) or (host.startswith("*.") and len(labels) < 2):
        raise fail(f"{key}.host", f"must be a host name or \"*.domain\", got {host!r}")

    methods = _string_list(item, "methods", key, fail)
    for i, method in enumerate(methods):
        if not _METHOD.match(method.upper()):
            raise fail(f"{key}.methods[{i}]", f"not an HTTP method: {method!r}")
    paths = _string_list(item, "paths", key, fail)
    for i, glob in enumerate(paths):
        if not glob.startswith(("/", "*")):
            raise fail(f"{key}.paths[{i}]", f"must start with \"/\" (a glob on the path), got {glob!r}")

    private_network = item.get("private_network", False)
    if not isinstance(private_network, bool):
        raise fail(f"{key}.private_network", "must be true or false")

    token = None
    if item.get("token") is not None:
        token = _token(item["token"], f"{key}.token", fail)
    return Route(host, tuple(m.upper() for m in methods), tuple(paths), private_network, token)


def _string_list(item: dict, name: str, key: str, fail) -> list[str]:
    value = item.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(f"{key}.{name}", "must be a list of non-empty strings")
    return value


def _token(item: Any, key: str, fail) -> TokenSlot:
    if not isinstance(item, dict):
        raise fail(key, "must be a mapping with env, header, format, placeholder")
    refuse_unknown_keys(item, {"env", "header", "format", "placeholder"}, key + ".", fail)
    env = _string(item, "env", fail, required=True, prefix=key + ".")
    if not _ENV_NAME.match(env):
        raise fail(f"{key}.env", f"not an environment variable name: {env!r}")
    header = _string(item, "header", fail, required=True, prefix=key + ".")
    if not _HEADER_NAME.match(header):
        raise fail(f"{key}.header", f"not an HTTP header name: {header!r}")
    fmt = _string(item, "format", fail, prefix=key + ".") or VALUE_MARKER
    if fmt.count(VALUE_MARKER) != 1 or "\r" in fmt or "\n" in fmt:
        raise fail(f"{key}.format", f"must contain {VALUE_MARKER} exactly once, on one line")
    placeholder = _string(item, "placeholder", fail, required=True, prefix=key + ".")
    if len(placeholder) < 8:
        raise fail(f"{key}.placeholder", "must be at least 8 characters (it replaces reflected tokens)")
    return TokenSlot(env=env, header=header.lower(), format=fmt, placeholder=placeholder)
