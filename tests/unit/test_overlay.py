"""The policy overlay (routes approved with scope=always) and `doit approve ... scope=always`: the overlay is
checked by routes.yaml's own route parser, written atomically and privately, merged per host, idempotent;
the route lands before the decision and goes again when the decision fails; only egress's requests qualify."""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import pytest
from doit.doit_cmd import reset_vars, set_var

from bottle_tasks import supervise_cli
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import make_plan
from bottle_tasks.settings import Settings
from bottle_tasks.sidecars import supervise_store
from bottle_tasks.sidecars.overlay import (
    OverlayError, approve_route, load_overlay, overlay_path, read_overlay, withdraw_approval,
)
from bottle_tasks.sidecars.supervise_store import AlreadyDecided, Store, SuperviseError
from bottle_tasks.spec import load_spec
from bottle_tasks.tasks import supervise as supervise_tasks

HELD = {"host": "docs.example.com", "port": 443, "method": "GET", "path": "/guide", "scheme": "https"}


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    return overlay_path(tmp_path / "state" / "policy")


def held_request(store: Store, request_id: str = "egress-request-1", **input_fields) -> supervise_store.Request:
    fields = {**HELD, **input_fields}
    return store.create_request(f"egress GET {fields['host']}", fields, f"GET https://{fields['host']}/guide", 120,
                                source="egress", request_id=request_id)


# --------------------------------------------------------------------------- the file


def test_a_missing_overlay_is_no_routes(overlay: Path) -> None:
    assert load_overlay(overlay) == ()
    assert not overlay.parent.exists()


def test_an_approval_routes_exactly_that_host_and_port_privately_and_says_who(overlay: Path) -> None:
    change = approve_route(overlay, "Docs.Example.com.", 443, request_id="egress-request-1", by="alice",
                           reason="the docs")
    assert (change.host, change.port, change.port_added, change.approval_added) == ("docs.example.com", 443, True, True)
    (route,) = load_overlay(overlay)
    assert (route.host, route.ports, route.methods, route.paths) == ("docs.example.com", (443,), (), ())
    assert route.private_network is False and route.token is None and route.dlp == "block"
    assert route.matches_host("docs.example.com") and not route.matches_host("sub.docs.example.com")
    (approval,) = read_overlay(overlay).approvals
    assert (approval.host, approval.port, approval.request_id, approval.by, approval.reason) == \
        ("docs.example.com", 443, "egress-request-1", "alice", "the docs")
    assert approval.at.endswith("Z")
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600
    assert stat.S_IMODE(overlay.parent.stat().st_mode) == 0o700
    assert json.loads(overlay.read_text())["version"] == 1
    assert [p.name for p in overlay.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_second_port_joins_the_hosts_route_and_the_same_approval_again_changes_nothing(overlay: Path) -> None:
    approve_route(overlay, "docs.example.com", 443, request_id="egress-request-1", by="alice")
    approve_route(overlay, "other.example.com", 443, request_id="egress-request-2", by="alice")
    change = approve_route(overlay, "docs.example.com", 8443, request_id="egress-request-3", by="bob")
    assert change.port_added and change.approval_added
    assert [(r.host, r.ports) for r in load_overlay(overlay)] == [("docs.example.com", (443, 8443)),
                                                                  ("other.example.com", (443,))]
    assert [a.request_id for a in read_overlay(overlay).approvals_of("docs.example.com")] == \
        ["egress-request-1", "egress-request-3"]

    before = (overlay.read_bytes(), overlay.stat().st_mtime_ns)
    again = approve_route(overlay, "docs.example.com", 8443, request_id="egress-request-3", by="bob")
    assert not again.port_added and not again.approval_added
    assert (overlay.read_bytes(), overlay.stat().st_mtime_ns) == before


def test_withdrawing_takes_out_only_what_that_approval_added(overlay: Path) -> None:
    approve_route(overlay, "docs.example.com", 443, request_id="egress-request-1", by="alice")
    second = approve_route(overlay, "docs.example.com", 8443, request_id="egress-request-2", by="alice")
    fresh = approve_route(overlay, "new.example.com", 443, request_id="egress-request-3", by="alice")
    withdraw_approval(overlay, second)
    withdraw_approval(overlay, fresh)
    assert [(r.host, r.ports) for r in load_overlay(overlay)] == [("docs.example.com", (443,))]
    assert [a.request_id for a in read_overlay(overlay).approvals] == ["egress-request-1"]

    # A port another approval still names stays routed.
    approve_route(overlay, "docs.example.com", 8443, request_id="egress-request-4", by="alice")
    racing = approve_route(overlay, "docs.example.com", 9443, request_id="egress-request-5", by="alice")
    approve_route(overlay, "docs.example.com", 9443, request_id="egress-request-6", by="bob")
    withdraw_approval(overlay, racing)
    assert load_overlay(overlay)[0].ports == (443, 8443, 9443)


@pytest.mark.parametrize("document, where", [
    ('{"version": 1, "routes": [', "not valid JSON (line 1)"),
    ('{"version": 2, "routes": []}', "version: must be 1"),
    ('{"version": 1, "routes": [{"host": "x.example", "token": {"env": "A"}}]}', "routes[0].token: unknown key"),
    ('{"version": 1, "routes": [{"host": "bad host!"}]}', 'routes[0].host: must be a host name or "*.domain"'),
    ('{"version": 1, "routes": [{"host": "x.example", "ports": [0]}]}', "routes[0].ports[0]: must be a port number"),
    ('{"version": 1, "routes": [{"host": "x.example"}, {"host": "x.example"}]}', "routes[1].host: duplicate"),
    ('{"version": 1, "routes": [], "approvals": [{"host": "x.example", "port": true, "request_id": "r", '
     '"by": "a", "at": "t"}]}', "approvals[0].port: must be a port number"),
])
def test_a_bad_overlay_is_one_error_naming_the_file_and_the_key(overlay: Path, document: str, where: str) -> None:
    overlay.parent.mkdir(parents=True)
    overlay.write_text(document)
    with pytest.raises(OverlayError) as error:
        load_overlay(overlay)
    assert str(error.value).startswith(f"{overlay}: ") and where in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(OverlayError):  # and no approval is written over it
        approve_route(overlay, "docs.example.com", 443, request_id="egress-request-1", by="alice")
    assert overlay.read_text() == document


def test_an_approval_is_for_one_exact_host_and_a_real_port(overlay: Path) -> None:
    for host, port, problem in [("*.example.com", 443, "not a wildcard"), ("docs.example.com", 0, "port number"),
                                ("docs.example.com", True, "port number"), ("bad host!", 443, "must be a host name")]:
        with pytest.raises(OverlayError, match=problem):
            approve_route(overlay, host, port, request_id="egress-request-1", by="alice")
    assert not overlay.exists()


# --------------------------------------------------------------------------- approve scope=always


def test_scope_always_writes_the_overlay_before_the_decision(tmp_path: Path, overlay: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "supervise")
    request = held_request(store)
    seen_at_decision: list[tuple] = []
    original = Store.decide

    def spying_decide(self, *args, **kwargs):
        seen_at_decision.append(tuple((r.host, r.ports) for r in load_overlay(overlay)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "decide", spying_decide)
    decided, change = supervise_cli.approve_always(store.state_dir, overlay, request.id, "alice", "docs")
    assert seen_at_decision == [(("docs.example.com", (443,)),)]
    assert (decided.status, decided.scope, change.host, change.port) == ("approved", "always", "docs.example.com", 443)
    assert Store(store.state_dir).get(request.id).scope == "always"  # what egress reads
    decision = json.loads((store.decisions_dir / f"{request.id}.json").read_text())
    assert decision["scope"] == "always" and decision["decision"] == "approve"
    assert store.history()[-1]["scope"] == "always"


def test_scope_always_takes_the_route_out_again_when_the_decision_fails(tmp_path: Path, overlay: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    approve_route(overlay, "kept.example.com", 443, request_id="egress-request-0", by="alice")
    kept = overlay.read_text()
    store = Store(tmp_path / "supervise")
    request = held_request(store)
    original = Store.decide

    def someone_else_denies_first(self, request_id, *args, **kwargs):
        original(Store(self.state_dir), request_id, "deny", "bob", "no")
        return original(self, request_id, *args, **kwargs)

    monkeypatch.setattr(Store, "decide", someone_else_denies_first)
    with pytest.raises(AlreadyDecided, match="already denied by bob"):
        supervise_cli.approve_always(store.state_dir, overlay, request.id, "alice")
    assert [r.host for r in load_overlay(overlay)] == ["kept.example.com"]
    assert json.loads(overlay.read_text()) == json.loads(kept)


def test_scope_always_needs_a_pending_request(tmp_path: Path, overlay: Path) -> None:
    store = Store(tmp_path / "supervise")
    request = held_request(store)
    store.decide(request.id, "deny", "bob", "no")
    with pytest.raises(AlreadyDecided):
        supervise_cli.approve_always(store.state_dir, overlay, request.id, "alice")
    assert not overlay.exists()


def test_scope_always_is_refused_for_a_guest_request(tmp_path: Path, overlay: Path) -> None:
    store = Store(tmp_path / "supervise")
    request = store.create_request("WebFetch", {"host": "evil.example.com", "port": 443}, "fetch", 120)
    with pytest.raises(SuperviseError) as error:
        supervise_cli.approve_always(store.state_dir, overlay, request.id, "alice")
    assert "not egress" in str(error.value) and "scope=once" in str(error.value)
    assert not overlay.exists() and store.get(request.id).pending
    assert supervise_cli.main(["--state-dir", str(store.state_dir), "approve", request.id, "--scope", "always",
                               "--overlay", str(overlay)]) == 1
    assert not overlay.exists()


def test_scope_is_recorded_only_on_approvals(tmp_path: Path) -> None:
    store = Store(tmp_path / "supervise")
    once, denied = held_request(store, "egress-request-1"), held_request(store, "egress-request-2")
    assert supervise_cli.main(["--state-dir", str(store.state_dir), "approve", once.id, "--by", "a"]) == 0
    assert store.get(once.id).scope == "once"
    with pytest.raises(supervise_store.InvalidArgument, match="only for an approval"):
        store.decide(denied.id, "deny", "a", scope="always")
    store.decide(denied.id, "deny", "a")
    assert "scope" not in json.loads((store.decisions_dir / f"{denied.id}.json").read_text())


def test_an_egress_request_shows_host_port_method_and_path_printable(tmp_path: Path) -> None:
    store = Store(tmp_path / "supervise")
    held_request(store, path="/x\x1b[2J\u202e")
    text = supervise_cli.format_pending(store.state_dir)
    assert "from:    egress, holding a request to a host the agent file does not name" in text
    for line in ("host:    docs.example.com", "port:    443", "method:  GET", "path:    /x\\x1b[2J\\u202e"):
        assert line in text
    assert "\x1b" not in text and "\u202e" not in text


# --------------------------------------------------------------------------- the doit tasks


def plan_for(tmp_path: Path, network: str):
    agents = tmp_path / "agents"
    agents.mkdir(exist_ok=True)
    (agents / "asker.yaml").write_text(textwrap.dedent(f"""
        routes:
          - host: api.anthropic.com
        {network}
    """))
    settings = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
                                  "BOTTLE_CACHE_DIR": str(tmp_path / "cache")})
    return make_plan(load_spec(agents / "asker.yaml"), settings)


@pytest.fixture
def doit_vars():
    reset_vars()
    yield set_var
    reset_vars()


def test_approve_scope_always_works_with_ask_and_no_supervise_section(tmp_path: Path, doit_vars, capsys) -> None:
    plan = plan_for(tmp_path, "network: {unknown_hosts: ask}")
    assert plan.supervise is None and plan.approvals_dir is not None
    request = held_request(Store(plan.approvals_dir))
    doit_vars("id", request.id)
    doit_vars("scope", "always")
    supervise_tasks.decide(plan, "approve")
    assert [(r.host, r.ports) for r in load_overlay(overlay_path(plan.policy_dir))] == [("docs.example.com", (443,))]
    assert Store(plan.approvals_dir).get(request.id).scope == "always"
    assert "docs.example.com port 443 is in the policy overlay" in capsys.readouterr().out

    doit_vars("scope", "forever")
    with pytest.raises(BottleError, match="scope=forever is not one of once, always"):
        supervise_tasks.decide(plan, "approve")
    with pytest.raises(BottleError, match="scope= is for approvals"):
        supervise_tasks.decide(plan, "deny")
    doit_vars("scope", "once")
    with pytest.raises(BottleError, match="already approved"):  # a store error is a clean task failure
        supervise_tasks.decide(plan, "approve")


def test_approve_without_supervise_or_ask_says_what_to_add(tmp_path: Path, doit_vars) -> None:
    plan = plan_for(tmp_path, "")
    doit_vars("id", "egress-request-1")
    with pytest.raises(BottleError, match=r"no supervise section and network.unknown_hosts is not ask"):
        supervise_tasks.decide(plan, "approve")
    with pytest.raises(BottleError, match="unknown_hosts: ask"):
        supervise_tasks.list_pending(plan)
