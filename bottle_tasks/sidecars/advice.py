"""What would allow a request egress refused: the exact change to the agent file, or the
unknown_hosts setting. The same text goes into the 403's body and the audit line's ``fix``.

Routes are shown as JSON flow mappings (``{"host": "example.com"}``): JSON is YAML, so the line
pastes into the agent file's ``routes:`` as it is, and a host or path the agent chose is quoted,
never YAML. A refusal no agent-file setting can lift (a spoofed Host, a missing SNI) says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bottle_tasks.contract import DEFAULT_ROUTE_PORTS, Route

# Refusals of how the request was made, not of where it went: no setting lifts them.
NOT_A_POLICY_MATTER = {
    "authority_mismatch": "send the Host (or :authority) the connection was opened for",
    "sni_missing": "send TLS with the SNI of the CONNECT host",
    "sni_mismatch": "send TLS with the SNI of the CONNECT host",
    "https_requires_connect": "send https through a CONNECT tunnel (set HTTPS_PROXY)",
    "path_ambiguous": "send the path in its normal form (no ./, //, %2f or the like)",
    "tcp_not_allowed": "only HTTP(S) passes egress",
    "destination_unchecked": "a connection egress did not check; retry the request",
    "hostname_secret": "the host name carries what looks like a secret; names are not a way out",
    "hostname_encoded": "the host name looks like encoded data; names are not a way out",
    "token_requires_tls": "use https://: a credentialed route never sends its token in the clear",
    "dns_unresolvable": "the host does not resolve; check its name",
    "dlp_unavailable": "the DLP scanner could not read this request; retry it, or send it decoded",
}


@dataclass(frozen=True)
class Where:
    """The request being refused and the policy it met."""
    agent_file: str
    unknown_hosts: str             # deny, ask or learn
    host: str
    port: int
    method: str
    path: str                      # without the query
    route: Route | None = None
    route_key: str = ""            # routes[3] in the agent file, or "the policy overlay"


def route_line(route: dict) -> str:
    return "- " + json.dumps(route, ensure_ascii=True)


def fix_for(reason: str, where: Where, *, size: int | None = None, pattern: str = "") -> str:
    """The change that would allow it, in words, or "" when there is nothing to say."""
    if reason in NOT_A_POLICY_MATTER:
        return f"no agent-file setting allows this: {NOT_A_POLICY_MATTER[reason]}"
    file = where.agent_file or "the agent file"
    key = where.route_key or "the route"
    route = where.route
    if reason in ("route_not_allowed", "denied_by_human", "approval_expired", "approvals_full"):
        new: dict = {"host": where.host}
        if where.port not in DEFAULT_ROUTE_PORTS:
            new["ports"] = [where.port]
        text = f"add this route under routes: in {file}:\n  {route_line(new)}"
        if where.unknown_hosts == "deny":
            text += ("\nor set network: {unknown_hosts: ask} there to have a human approve new hosts as they come "
                     "(doit supervise), or learn to allow and record them (doit policy suggest)")
        elif where.unknown_hosts == "ask":
            text += "\nor approve it when it is held again: doit approve id=<id> scope=always"
        return text
    if route is None:
        return ""
    if reason == "port_not_allowed":
        return f"in {file}, set {key}.ports: {json.dumps([*route.ports, where.port])}"
    if reason == "method_not_allowed":
        return f"in {file}, set {key}.methods: {json.dumps([*route.methods, where.method.upper()])}"
    if reason == "path_not_allowed":
        return f"in {file}, set {key}.paths: {json.dumps([*route.paths, where.path or '/'])}"
    if reason in ("body_too_large", "compression_ratio") and size:
        return f"in {file}, set {key}.max_body_bytes: {max(size, route.max_body_bytes + 1)} (or send less)"
    if reason == "private_address":
        return (f"in {file}, set {key}.private_network: true, only if {where.host} is meant to be on a "
                "private network (it turns off the floor that keeps the agent off your LAN)")
    if reason == "dlp_match":
        return (f"remove the secret from the request; if {pattern or 'the match'} is a false positive, "
                f"{key}.dlp: log in {file} lets such requests through, logged")
    if reason == "response_injection":
        return f"if the response is trusted, {key}.responses: warn in {file} passes it with a log line"
    return ""
