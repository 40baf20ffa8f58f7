"""Attacks on the audit stream, unknown_hosts ask/learn, the policy overlay and `doit policy suggest`,
by a hostile guest or (second tier) a compromised bundle daemon that can write the bundle-writable
state dirs (audit/, supervise/). Each test fails if its control does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from bottle_tasks import policy_view, supervise_cli
from bottle_tasks.sidecars import audit, dnssink, egress
from bottle_tasks.sidecars.overlay import OverlayError, approve_route, read_overlay
from bottle_tasks.sidecars.supervise_store import Store, SuperviseError
from tests.unit.test_egress import assert_allowed, assert_blocked, tunnel_flow
from tests.unit.test_egress_decisions import addon_with_audit, decide_when_held


def finishes_within(seconds: float, fn) -> bool:
    """Run fn in a daemon thread; True when it returned (or raised) in time, False when it hangs."""
    thread = threading.Thread(target=_quiet, args=(fn,), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def _quiet(fn) -> None:
    try:
        fn()
    except Exception:
        pass


def learn_line(host: str, path: str = "/x") -> str:
    return json.dumps(audit.audit_record("egress", "request", "learn", host=host, port=443, method="GET",
                                         path=path)) + "\n"


# --------------------------------------------------------------------------- links planted in supervise/


def test_a_link_planted_as_supervise_history_never_gets_the_hosts_append(tmp_path):
    """A bundle daemon swaps history.jsonl for a link to ~/.bashrc; the guest's tool name holds $(...).
    `doit approve` must not append that line (a command substitution bash would run) to the target."""
    store = Store(tmp_path / "supervise").ensure_layout()
    request = store.create_request("$(touch /tmp/pwned)", {"command": "ls"}, "list files", 60)
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("# mine\n")
    os.chmod(bashrc, 0o644)
    store.history_path.unlink()
    store.history_path.symlink_to(bashrc)
    with contextlib.suppress(SuperviseError):
        supervise_cli.decide(store.state_dir, request.id, "approve", "alice")
    assert bashrc.read_text() == "# mine\n"
    assert bashrc.stat().st_mode & 0o777 == 0o644   # nor chmod-ed through the link


def test_a_decisions_dir_swapped_for_a_link_never_gets_the_hosts_decision(tmp_path):
    store = Store(tmp_path / "supervise").ensure_layout()
    request = store.create_request("Bash", {"command": "ls"}, "list files", 60)
    elsewhere = tmp_path / "home-config"
    elsewhere.mkdir()
    os.rmdir(store.decisions_dir)
    store.decisions_dir.symlink_to(elsewhere)
    with pytest.raises(SuperviseError, match="decisions"):
        supervise_cli.decide(store.state_dir, request.id, "approve", "alice")
    assert list(elsewhere.iterdir()) == []


def test_a_fifo_planted_as_a_request_file_does_not_hang_doit_supervise(tmp_path):
    store = Store(tmp_path / "supervise").ensure_layout()
    os.mkfifo(store.requests_dir / "AAAAAAAAAAAA.json")
    assert finishes_within(3, lambda: supervise_cli.format_pending(store.state_dir))


# --------------------------------------------------------------------------- links and fifos planted in audit/


def test_a_link_planted_as_an_older_generation_is_not_read_by_policy_suggest(tmp_path):
    directory = tmp_path / "audit"
    audit.AuditFile(directory).ensure()
    outside = tmp_path / "outside.jsonl"
    outside.write_text(learn_line("planted.example"))
    (directory / f"{audit.AUDIT_FILE}.1").symlink_to(outside)
    (directory / audit.AUDIT_FILE).write_text(learn_line("seen.example"))
    hosts = [record["host"] for record in audit.read_records(directory)]
    assert hosts == ["seen.example"]


def test_a_fifo_planted_in_the_audit_dir_hangs_neither_suggest_nor_approve(tmp_path):
    directory = tmp_path / "audit"
    audit.AuditFile(directory).ensure()
    os.mkfifo(directory / f"{audit.AUDIT_FILE}.1")
    assert finishes_within(3, lambda: list(audit.read_records(directory)))
    os.mkfifo(directory / audit.AUDIT_FILE)
    writer = audit.AuditWriter("supervise", directory=directory)
    assert finishes_within(3, lambda: writer.emit("decision", "approve", reason="alice"))


def test_a_planted_line_without_an_end_is_not_read_whole(tmp_path):
    """A generation of one endless line (a compromised sink): read in bounded pieces, skipped, and
    the records after it still count."""
    directory = tmp_path / "audit"
    audit.AuditFile(directory).ensure()
    with open(directory / f"{audit.AUDIT_FILE}.1", "wb") as handle:
        handle.write(b"x" * (8 << 20) + b"\n" + learn_line("after.example").encode())
    import tracemalloc

    tracemalloc.start()
    hosts = [record["host"] for record in audit.read_records(directory)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert hosts == ["after.example"]
    assert peak < 1 << 20


# --------------------------------------------------------------------------- floods


def test_a_flood_of_random_dns_names_is_a_bounded_number_of_audit_lines(tmp_path):
    class Counting:
        lines: list[dict] = []

        def emit(self, event, decision, **fields):
            self.lines.append(fields)

    sink = Counting()
    log = dnssink.QueryLog(sink, remember=100)  # type: ignore[arg-type]
    for n in range(5000):
        label = f"x{n:06d}".encode()
        query = dnssink.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + bytes([len(label)]) + label + b"\x04test\x00\x00\x01\x00\x01"
        log.note(query, now=1.0 + n * 0.001)
    assert len(sink.lines) <= 101
    # the next window says how many names went unrecorded
    log.note(dnssink.HEADER.pack(7, 0x0100, 1, 0, 0, 0) + b"\x03new\x04test\x00\x00\x01\x00\x01", now=100.0)
    assert sink.lines[-1]["host"] == "new.test"
    assert sink.lines[-1]["detail"]["names_not_recorded"] == 5000 - 100


def test_held_requests_are_bounded_so_a_flood_cannot_fill_egress_memory(tmp_path):
    """ask: every request to a held host waits with its body in memory; past the cap they are refused
    at once (429) instead of piling up for hold_seconds."""
    addon = addon_with_audit(tmp_path, unknown_hosts="ask", hold_seconds=2)
    Store(tmp_path / "supervise").ensure_layout()
    flows = [tunnel_flow(addon, "POST", "new.example.net", "/", content=b"a" * 1000)
             for _ in range(egress.MAX_HELD_REQUESTS + 20)]

    async def all_at_once():
        await asyncio.gather(*(addon.request(flow) for flow in flows))

    asyncio.run(all_at_once())
    refused = [f for f in flows if f.response.headers.get(egress.BLOCK_HEADER) == "approvals_full"]
    assert len(refused) >= 20
    assert addon._held_requests == 0 and addon._held_bytes == 0   # nothing leaks after the holds end


def test_held_request_bodies_are_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(egress, "MAX_HELD_BYTES", 3000)
    addon = addon_with_audit(tmp_path, unknown_hosts="ask", hold_seconds=1)
    Store(tmp_path / "supervise").ensure_layout()
    flows = [tunnel_flow(addon, "POST", "new.example.net", "/", content=b"a" * 1001) for _ in range(4)]

    async def all_at_once():
        await asyncio.gather(*(addon.request(flow) for flow in flows))

    asyncio.run(all_at_once())
    reasons = sorted(f.response.headers.get(egress.BLOCK_HEADER) for f in flows)
    assert reasons.count("approvals_full") == 2


# --------------------------------------------------------------------------- approving more than was seen


def test_a_once_approval_of_a_get_does_not_pass_a_post_the_human_never_saw(tmp_path):
    addon = addon_with_audit(tmp_path, unknown_hosts="ask", hold_seconds=5)
    store = Store(tmp_path / "supervise").ensure_layout()
    seen = tunnel_flow(addon, "GET", "new.example.net", "/docs")
    unseen = tunnel_flow(addon, "DELETE", "new.example.net", "/repos/important")

    async def scenario():
        first = asyncio.create_task(addon.request(seen))
        while not store.list_pending():
            await asyncio.sleep(0.02)
        second = asyncio.create_task(addon.request(unseen))
        await asyncio.sleep(0.3)
        [held] = store.list_pending()
        assert held.input["method"] == "GET"
        await asyncio.to_thread(store.decide, held.id, "approve", "alice", "", "once")
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert_allowed(seen)
    assert unseen.response is not None and unseen.response.status_code >= 400


def test_scope_always_adds_the_host_the_human_saw_in_its_one_spelling(tmp_path):
    """Case, a trailing dot and IDNA all collapse to the name egress routes; a wildcard is refused."""
    overlay = tmp_path / "policy" / "overlay.json"
    approve_route(overlay, "New.Example.NET.", 443, request_id="r" * 16, by="alice")
    approve_route(overlay, "bücher.example", 443, request_id="s" * 16, by="alice")
    hosts = [route.host for route in read_overlay(overlay).routes]
    assert hosts == ["new.example.net", "xn--bcher-kva.example"]
    with pytest.raises(OverlayError, match="wildcard"):
        approve_route(overlay, "*.example.net", 443, request_id="t" * 16, by="alice")


def test_suggest_grants_no_wildcard_host_and_paths_that_match_only_what_was_seen(tmp_path):
    records = [json.loads(line) for line in (
        learn_line("*.evil.example"), learn_line("ok.example", "/a*b"), learn_line("ok.example", "/q?[x]"),
        learn_line("ok.example", '/"]\n- host: "evil.example'))]
    text = policy_view.suggest("agent=demo", Path("/a/demo.yaml"), tmp_path, records, ())
    [route] = yaml.safe_load(text)
    assert route["host"] == "ok.example"
    from bottle_tasks.contract import Route

    granted = Route("ok.example", paths=tuple(route["paths"]))
    assert granted.allows_path("/a*b") and granted.allows_path("/q?[x]")
    assert not granted.allows_path("/aXb") and not granted.allows_path("/qZx")


def test_the_guests_hold_can_still_be_decided_while_egress_polls(tmp_path):
    """A denial lands on the held request and its waiters alike (the poll loop is not stuck)."""
    addon = addon_with_audit(tmp_path, unknown_hosts="ask", hold_seconds=10)
    Store(tmp_path / "supervise").ensure_layout()
    human = decide_when_held(tmp_path, "deny", "no")
    flows = [tunnel_flow(addon, "GET", "new.example.net", "/") for _ in range(3)]
    started = time.monotonic()

    async def all_at_once():
        await asyncio.gather(*(addon.request(flow) for flow in flows))

    asyncio.run(all_at_once())
    human.join(5)
    assert time.monotonic() - started < 5
    for flow in flows:
        assert_blocked(flow, "denied_by_human")
