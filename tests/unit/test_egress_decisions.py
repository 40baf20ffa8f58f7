"""egress and the audit stream: request ids, the advice in a 403, and unknown hosts (deny, ask, learn).

Driven like test_egress.py: mitmproxy test flows and a fake resolver; nothing is dialled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import jsonschema
import pytest

from bottle_tasks.settings import PACKAGE_DIR
from bottle_tasks.sidecars import audit, egress
from bottle_tasks.sidecars.supervise_store import Store
from tests.unit.test_egress import (
    FAKE_AWS_KEY, FAKE_DNS, REAL_TOKEN, SECRETS, assert_allowed, assert_blocked, fake_resolve, make_config,
    plain_flow, tunnel_flow,
)

SCHEMA = json.loads((PACKAGE_DIR / "schema" / "audit-v1.schema.json").read_text())
FAKE_DNS.setdefault("new.example.net", ["93.184.215.30"])
FAKE_DNS.setdefault("lan.example.net", ["192.168.1.20"])
FAKE_DNS.setdefault("loop.example.net", ["127.0.0.1"])
FAKE_DNS.setdefault("meta.example.net", ["169.254.169.254"])


def addon_with_audit(tmp_path, **config):
    overrides = {"agent_file": "/home/u/agents/demo.yaml", **config}
    if config.get("unknown_hosts") == "ask":
        overrides.setdefault("approvals_dir", str(tmp_path / "supervise"))
        overrides.setdefault("hold_seconds", 30)
    writer = audit.AuditWriter("egress", directory=tmp_path / "audit")
    addon = egress.Egress(make_config(**overrides), SECRETS, emit=lambda record: None, resolve=fake_resolve,
                          audit=writer)
    return addon


def records(tmp_path) -> list[dict]:
    found = list(audit.read_records(tmp_path / "audit"))
    for record in found:
        jsonschema.validate(record, SCHEMA)
    return found


def test_a_block_is_one_audit_line_with_the_id_the_403_names(tmp_path):
    addon = addon_with_audit(tmp_path)
    flow = plain_flow("GET", "http://evil.test/x?secret=1")
    asyncio.run(addon.request(flow))
    body = assert_blocked(flow, "route_not_allowed")
    request_id = flow.response.headers[egress.REQUEST_ID_HEADER]
    assert f"request id: {request_id}" in body
    [line] = records(tmp_path)
    assert line["request_id"] == request_id and line["decision"] == "block"
    assert line["reason_code"] == "route_not_allowed" and line["path"] == "/x"
    assert line["fix"] in body   # the same advice, in the 403 and in the audit line
    assert '- {"host": "evil.test"}' in line["fix"] and "/home/u/agents/demo.yaml" in line["fix"]
    assert "unknown_hosts: ask" in line["fix"]


def test_the_advice_names_the_route_key_and_the_exact_change(tmp_path):
    addon = addon_with_audit(tmp_path)
    flow = tunnel_flow(addon, "DELETE", "api.anthropic.com", "/v1/messages")
    asyncio.run(addon.request(flow))
    body = assert_blocked(flow, "method_not_allowed")
    assert 'routes[0].methods: ["POST", "DELETE"]' in body
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v2/other")
    asyncio.run(addon.request(flow))
    assert 'routes[0].paths: ["/v1/*", "/v2/other"]' in assert_blocked(flow, "path_not_allowed")


def test_a_spoofed_host_gets_no_advice_to_loosen_anything(tmp_path):
    addon = addon_with_audit(tmp_path)
    flow = tunnel_flow(addon, "GET", "www.example.com", "/", host_header="api.anthropic.com")
    asyncio.run(addon.request(flow))
    body = assert_blocked(flow, "authority_mismatch")
    assert "no agent-file setting allows this" in body and "routes:" not in body


def test_an_allowed_request_is_audited_without_its_query_or_token(tmp_path):
    addon = addon_with_audit(tmp_path)
    flow = tunnel_flow(addon, "POST", "api.anthropic.com", "/v1/messages?key=abc", content=b"{}")
    asyncio.run(addon.request(flow))
    assert_allowed(flow)
    assert flow.request.headers["x-api-key"] == REAL_TOKEN
    [line] = records(tmp_path)
    assert line["decision"] == "allow" and line["path"] == "/v1/messages" and line["port"] == 443
    assert REAL_TOKEN not in (tmp_path / "audit" / audit.AUDIT_FILE).read_text()


def test_a_dlp_block_names_the_pattern_but_never_the_secret(tmp_path):
    addon = addon_with_audit(tmp_path)
    flow = tunnel_flow(addon, "POST", "www.example.com", "/upload", content=f"key={FAKE_AWS_KEY}".encode())
    asyncio.run(addon.request(flow))
    assert_blocked(flow, "dlp_match")
    [line] = records(tmp_path)
    assert line["dlp"]["pattern"] and line["dlp"]["where"] == "body"
    assert FAKE_AWS_KEY not in (tmp_path / "audit" / audit.AUDIT_FILE).read_text()


# -- learn ----------------------------------------------------------------------------------------


def test_learn_allows_an_unknown_public_host_and_records_it(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="learn")
    flow = tunnel_flow(addon, "GET", "new.example.net", "/pkg/left-pad?v=1")
    asyncio.run(addon.request(flow))
    assert_allowed(flow)
    [line] = records(tmp_path)
    assert (line["decision"], line["host"], line["method"], line["path"]) == ("learn", "new.example.net", "GET",
                                                                               "/pkg/left-pad")


def test_learn_keeps_the_private_address_floor_and_dlp(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="learn")
    flow = tunnel_flow(addon, "GET", "lan.example.net", "/")
    asyncio.run(addon.request(flow))
    assert_blocked(flow, "private_address")
    flow = tunnel_flow(addon, "POST", "new.example.net", "/", content=f"k={FAKE_AWS_KEY}".encode())
    asyncio.run(addon.request(flow))
    assert_blocked(flow, "dlp_match")


def test_learn_refuses_a_name_that_carries_encoded_data(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="learn")
    encoded = "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43UOV3HO6DZPI.net"
    flow = plain_flow("GET", f"http://{encoded}/")
    asyncio.run(addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers[egress.BLOCK_HEADER].startswith("hostname_")
    assert encoded.lower() not in (tmp_path / "audit" / audit.AUDIT_FILE).read_text().lower()


# -- ask ------------------------------------------------------------------------------------------


def decide_when_held(tmp_path, decision: str, reason: str = "", count: int = 1, scope: str | None = None
                     ) -> threading.Thread:
    """A human on the host: waits for the held request(s) to appear, then decides them."""
    store = Store(tmp_path / "supervise")

    def human():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = store.list_pending()
            if len(pending) >= count:
                for request in pending:
                    store.decide(request.id, decision, "alice", reason, scope)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=human, daemon=True)
    thread.start()
    return thread


def held_and_decided(tmp_path, host: str, path: str, decision: str, reason: str = ""):
    """One request to host in ask mode, which a human on the host then decides."""
    addon = addon_with_audit(tmp_path, unknown_hosts="ask")
    Store(tmp_path / "supervise").ensure_layout()
    human = decide_when_held(tmp_path, decision, reason)
    flow = tunnel_flow(addon, "GET", host, path)
    asyncio.run(addon.request(flow))
    human.join(5)
    return flow


def test_ask_holds_the_request_until_a_human_approves_it(tmp_path):
    flow = held_and_decided(tmp_path, "new.example.net", "/docs?page=2", "approve")
    assert_allowed(flow)
    [held] = Store(tmp_path / "supervise").history()[:1]
    request_id = flow.metadata["bottle_request_id"]
    assert held["id"] == request_id and held["source"] == "egress"
    decisions = [(r["decision"], r.get("request_id")) for r in records(tmp_path)]
    assert decisions == [("hold", request_id), ("approve", request_id), ("allow", request_id)]


def test_a_denial_reaches_the_agent_with_its_reason(tmp_path):
    flow = held_and_decided(tmp_path, "new.example.net", "/", "deny", "not for this task")
    body = assert_blocked(flow, "denied_by_human")
    assert "denied by alice: not for this task" in body


def test_requests_to_a_held_host_wait_for_the_same_decision_for_good(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="ask")
    Store(tmp_path / "supervise").ensure_layout()
    human = decide_when_held(tmp_path, "approve", scope="always")
    flows = [tunnel_flow(addon, "GET", "new.example.net", f"/{n}") for n in range(5)]

    async def all_at_once():
        await asyncio.gather(*(addon.request(flow) for flow in flows))

    asyncio.run(all_at_once())
    human.join(5)
    for flow in flows:
        assert_allowed(flow)
    assert len(Store(tmp_path / "supervise").history()) == 2   # one request, one decision


def test_ask_never_offers_a_request_that_carries_a_secret(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="ask")
    Store(tmp_path / "supervise").ensure_layout()
    flow = tunnel_flow(addon, "POST", "new.example.net", "/", content=f"k={FAKE_AWS_KEY}".encode())
    asyncio.run(addon.request(flow))
    assert_blocked(flow, "dlp_match")
    assert Store(tmp_path / "supervise").list_pending() == []


def test_an_approved_host_on_a_private_address_is_still_refused(tmp_path):
    flow = held_and_decided(tmp_path, "lan.example.net", "/", "approve")
    assert_blocked(flow, "private_address")


def test_an_unanswered_hold_expires_as_a_refusal(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="ask", hold_seconds=1)
    Store(tmp_path / "supervise").ensure_layout()
    flow = tunnel_flow(addon, "GET", "new.example.net", "/")
    asyncio.run(addon.request(flow))
    assert "no decision within 1 s" in assert_blocked(flow, "approval_expired")


def test_ask_without_a_queue_is_a_config_error():
    with pytest.raises(ValueError, match="approvals_dir"):
        make_config(unknown_hosts="ask")


@pytest.mark.parametrize("host, allowed", [("lan.example.net", True), ("loop.example.net", False),
                                           ("meta.example.net", False)])
def test_unknown_private_network_opens_a_lan_never_loopback_or_metadata(tmp_path, host, allowed):
    addon = addon_with_audit(tmp_path, unknown_hosts="learn", unknown_private_network=True)
    flow = tunnel_flow(addon, "GET", host, "/")
    asyncio.run(addon.request(flow))
    if allowed:
        assert_allowed(flow)
    else:
        assert_blocked(flow, "private_address")
