"""Request targets egress accepts: the authority (Host) and the path, checked before any route rule.

Two questions, both about ambiguity: could the upstream read this request as addressed to a host
the route does not name, or as a path the route's globs did not allow?

- The authority: every Host header and the HTTP/2 ``:authority`` must name the host and port the
  request goes to (the CONNECT authority inside a tunnel, the URL's authority for an
  absolute-form request). A missing Host, two Host headers, a port that differs, or a port that
  is not plain digits is refused.
- The path: the path a route's globs are matched against must be the path the upstream
  receives. Egress does not rewrite paths; it refuses any path that is not already in normal
  form (RFC 3986 section 6: no dot segments, no percent-encoded unreserved characters), so the raw
  path, the checked path and the forwarded path are one string. It also refuses what servers
  disagree about: encoded slashes and backslashes (%2F, %5C), backslashes, NUL and other control
  characters, encoded dot segments (%2e%2e, also double-encoded), "..;" path parameters, empty
  segments (//), a fragment, and raw non-ASCII. Decoding is repeated (as DLP does), so
  %252e%252e is caught too.

Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import re
import string
import urllib.parse
from typing import Iterable

from bottle_tasks.contract import normalize_host

DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT = re.compile(r"[0-9]{1,5}")
_DECODE_ROUNDS = 3  # as dlp.decoded_views: %2e, %252e and %25252e


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """(host, port) of "host", "host:port" or "[v6]:port"; ValueError when it is none of them."""
    authority = authority.strip()
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(authority)
        port_text = rest[1:] if rest else None
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    elif ":" in authority:
        raise ValueError(authority)
    else:
        host, port_text = authority, None
    if port_text is not None and not _PORT.fullmatch(port_text):
        raise ValueError(authority)  # "", "+443", "٤٤٣": int() would accept some of these
    if not host:
        raise ValueError(authority)
    return normalize_host(host), int(port_text) if port_text is not None else default_port


def authority_problem(host_headers: Iterable[str], authority: str, scheme: str, host: str, port: int) -> str | None:
    """Why the Host headers and :authority do not name exactly (host, port), or None."""
    hosts = list(host_headers)
    if len(hosts) > 1:
        return "more than one Host header"
    names = hosts + ([authority] if authority else [])
    if not names:
        return "no Host header"
    for name in names:
        try:
            name_host, name_port = split_authority(name, DEFAULT_PORTS.get(scheme, port))
        except ValueError:
            return "Host is not host[:port]"
        if name_host != host or name_port != port:
            return "Host differs from the request's authority"
    return None


def path_problem(target: str) -> str | None:
    """Why the path of a request target (path and query) is ambiguous or not in normal form, or None."""
    if "#" in target:
        return "a fragment (#) in the request target"
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        return "the path does not start with /"
    for char in path:
        if ord(char) < 0x21 or ord(char) >= 0x7F:
            return "a control, space or non-ASCII character in the path (percent-encode it)"
    if "\\" in path:
        return "a backslash in the path"
    if _BAD_ESCAPE.search(path):
        return "a malformed percent-escape in the path"
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment == "" and index < len(segments) - 1:
            return "an empty path segment (//)"
        if segment.split(";", 1)[0] in (".", ".."):
            return "a dot segment (. or ..) in the path"
        decoded = segment
        for _ in range(_DECODE_ROUNDS):
            if "%" not in decoded:
                break
            decoded = urllib.parse.unquote(decoded, errors="replace")
            if "/" in decoded or "\\" in decoded:
                return "an encoded slash or backslash (%2F, %5C) in the path"
            if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded):
                return "an encoded NUL or control character in the path"
            if decoded.split(";", 1)[0] in (".", ".."):
                return "an encoded dot segment (%2e) in the path"
        for escape in _ESCAPE.findall(segment):
            if chr(int(escape, 16)) in _UNRESERVED:
                return f"a percent-encoded unreserved character (%{escape}) in the path; send it as is"
    return None
