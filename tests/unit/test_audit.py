"""The audit stream's writer, file and sink (bottle_tasks/sidecars/audit.py)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import jsonschema
import pytest

from bottle_tasks.settings import PACKAGE_DIR
from bottle_tasks.sidecars import audit
from bottle_tasks.sidecars.scrub import SecretScrubber

SCHEMA = json.loads((PACKAGE_DIR / "schema" / "audit-v1.schema.json").read_text())
FAKE_TOKEN = "sk-ant-api03-" + "Q" * 40 + "fake"
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLQ"


def lines(directory: Path) -> list[dict]:
    return list(audit.read_records(directory))


def test_a_record_follows_the_schema_and_drops_the_query(tmp_path):
    writer = audit.AuditWriter("egress", directory=tmp_path, bottle="demo")
    writer.emit("request", "block", reason_code="route_not_allowed", reason="no route for example.com",
                request_id="abc123abc123", method="GET", host="example.com", port=443,
                path="/search?q=secret#frag", fix="add a route", dlp_pattern="", detail={"k": 1})
    [record] = lines(tmp_path)
    jsonschema.validate(record, SCHEMA)
    assert record["path"] == "/search"
    assert record["bottle"] == "demo" and record["source"] == "egress" and record["port"] == 443


def test_token_values_and_secrets_never_reach_the_file(tmp_path):
    scrubber = SecretScrubber.placeholders({FAKE_TOKEN: "bottle-placeholder-anthropic"})
    writer = audit.AuditWriter("egress", directory=tmp_path, scrubber=scrubber)
    writer.emit("request", "block", reason=f"header carried {FAKE_TOKEN}", host="api.example.com",
                path=f"/upload/{AWS_KEY}", detail={"note": f"key={AWS_KEY}"})
    text = (tmp_path / audit.AUDIT_FILE).read_text()
    assert FAKE_TOKEN not in text and AWS_KEY not in text
    assert "bottle-placeholder-anthropic" in text   # the scrubber ran, not just the DLP redactor
    jsonschema.validate(json.loads(text), SCHEMA)


def test_an_unknown_source_or_decision_is_refused():
    with pytest.raises(ValueError):
        audit.audit_record("guest", "x", "allow")
    with pytest.raises(ValueError):
        audit.audit_record("egress", "x", "maybe")


def test_a_huge_record_is_cut_to_one_pipe_atomic_line():
    record = audit.audit_record("git-gate", "push", "block", reason="r" * 5000, path="/" + "p" * 5000,
                                detail={"refs": ["x" * 100] * 100})
    line = audit.encode_line(record)
    assert len(line) <= audit.MAX_LINE_BYTES and line.endswith(b"\n")
    parsed = json.loads(line)
    assert parsed["truncated"] is True and "detail" not in parsed
    jsonschema.validate(parsed, SCHEMA)


def test_rotation_keeps_the_newest_generations_and_loses_no_line(tmp_path):
    file = audit.AuditFile(tmp_path, rotate_bytes=2000, keep=2)
    writer = audit.AuditWriter("init", directory=tmp_path)
    writer.file = file
    for n in range(100):
        writer.emit("daemon_start", "info", reason=f"line {n:03d}")
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    kept = [r["reason"] for r in lines(tmp_path)]
    assert kept == sorted(kept) and kept[-1] == "line 099"   # oldest first, newest last, in order
    assert all(p.stat().st_size <= 2000 for p in file.generations())
    assert len(kept) < 100   # the oldest went with the third rotation


def test_the_sink_stamps_the_bottle_and_drops_what_is_not_a_record(tmp_path):
    read_end, write_end = audit.make_pipe()
    writer = audit.AuditWriter("egress", fd=write_end)
    done = threading.Thread(target=audit.sink, args=(read_end, audit.AuditFile(tmp_path), "bottle-x"))
    done.start()
    writer.emit("request", "allow", host="example.com")
    os.write(write_end, b"not json\n" + json.dumps({"v": 1, "source": "guest"}).encode() + b"\n")
    writer.emit("request", "block", host="example.org")
    os.close(write_end)
    done.join(10)
    records = lines(tmp_path)
    assert [r["host"] for r in records] == ["example.com", "example.org"]
    assert {r["bottle"] for r in records} == {"bottle-x"}


def test_a_full_pipe_drops_lines_and_the_next_line_counts_them(tmp_path):
    read_end, write_end = audit.make_pipe()
    writer = audit.AuditWriter("egress", fd=write_end)
    sent = 0
    while writer.dropped == 0:   # nobody reads: the pipe fills, and the writer never blocks
        writer.emit("request", "block", reason="flood " + "x" * 500)
        sent += 1
        assert sent < 10_000
    writer.emit("request", "block", reason="flood " + "x" * 500)   # no room for a line this long either
    assert writer.dropped == 2
    data = b""
    while True:
        try:
            chunk = os.read(read_end, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
        os.set_blocking(read_end, False)
    writer.emit("request", "block", reason="after the flood")
    last = json.loads(os.read(read_end, 1 << 16).splitlines()[-1])
    assert last["dropped"] == 2 and last["reason"] == "after the flood"
    assert all(json.loads(line) for line in data.splitlines())   # whole lines only
    os.close(read_end)
    os.close(write_end)


def test_from_env_reads_the_fd_and_the_slug():
    writer = audit.AuditWriter.from_env("dns", {"BOTTLE_AUDIT_FD": "7", "BOTTLE_SLUG": "demo"})
    assert writer.fd == 7 and writer.bottle == "demo" and writer.file is None
    nowhere = audit.AuditWriter.from_env("dns", {})
    assert nowhere.fd is None and nowhere.file is None
    nowhere.emit("query", "block")   # goes nowhere, raises nothing


def test_supervise_history_reaches_the_stream_with_the_request_id(tmp_path):
    from bottle_tasks import supervise_cli
    from bottle_tasks.sidecars.supervise_store import Store

    queue = tmp_path / "demo" / "supervise"
    store = Store(queue, audit=audit.AuditWriter("supervise", directory=tmp_path / "demo" / "audit"))
    request = store.create_request("Bash", {"command": "git push"}, "push it", 60)
    supervise_cli.decide(queue, request.id, "deny", "alice", "not now")   # the host's own writer
    got = [(r["event"], r["decision"], r["request_id"]) for r in lines(tmp_path / "demo" / "audit")]
    assert got == [("approval_request", "hold", request.id), ("decision", "deny", request.id)]
    decision = lines(tmp_path / "demo" / "audit")[-1]
    assert decision["reason"] == "alice: not now" and decision["bottle"] == "demo"
    assert decision["detail"]["record"] == "supervise/history.jsonl"
    assert len(store.history()) == 2   # the queue's own record is kept whole


def test_git_gate_records_reach_the_stream_and_point_at_their_file(tmp_path):
    import io

    from bottle_tasks.sidecars.gitgate.audit import AuditLog

    log = AuditLog(tmp_path / "git-audit.jsonl", io.StringIO(), SecretScrubber({}),
                   stream=audit.AuditWriter("git-gate", directory=tmp_path / "audit"))
    log.emit({"event": "push", "repo": "app", "refs": [{"ref": "refs/heads/main"}], "accepted": False,
              "reason": "refs/heads/main: not an allowed branch"})
    log.emit({"event": "refresh", "repo": "app", "accepted": True}, audit=False)   # not a decision
    [line] = lines(tmp_path / "audit")
    assert (line["source"], line["event"], line["decision"], line["reason_code"]) == \
        ("git-gate", "push", "block", "push_refused")
    assert line["detail"] == {"repo": "app", "refs": ["refs/heads/main"], "record": "git/audit.jsonl"}
    assert (tmp_path / "git-audit.jsonl").read_text().count("\n") == 1   # the full record stays where it was


def test_pipelock_blocks_become_stream_records_and_its_other_lines_do_not():
    blocked = json.dumps({"level": "warn", "event": "blocked", "method": "CONNECT", "url": "https://evil.test:443/",
                          "scanner": "domain_blocklist", "reason": "domain blocked"})
    event, decision, fields = audit.from_pipelock(blocked)
    record = audit.audit_record("pipelock", event, decision, **fields)
    jsonschema.validate({**record, "bottle": "x"}, SCHEMA)
    assert (decision, record["host"], record["reason_code"]) == ("block", "evil.test", "domain_blocklist")
    assert audit.from_pipelock(json.dumps({"event": "tunnel_open", "target": "a.test:443"})) is None
    assert audit.from_pipelock("Mode: strict") is None


def test_a_link_planted_in_the_audit_dir_never_redirects_a_host_append(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    directory = tmp_path / "audit"
    directory.mkdir()
    (directory / audit.AUDIT_FILE).symlink_to(victim)
    writer = audit.AuditWriter("supervise", directory=directory, echo=None)
    writer.emit("decision", "approve", reason="alice")   # fails closed: nothing written through the link
    assert victim.read_text() == "precious\n"
    assert writer.dropped == 1
