"""supervise: the file store, the daemon, the guest hook and the host CLI, end to end on 127.0.0.1."""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from bottle_tasks import supervise_cli
from bottle_tasks.contract import SupervisePolicy
from bottle_tasks.sidecars import supervise
from bottle_tasks.sidecars.supervise_store import (
    AlreadyDecided, InvalidArgument, RequestExpired, Store, UnknownRequest,
)

HOOK = Path(__file__).resolve().parents[2] / "bottle_tasks" / "guest" / "supervise_hook.py"


def load_hook_module() -> Any:
    spec = importlib.util.spec_from_file_location("supervise_hook_under_test", HOOK)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


hook = load_hook_module()


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_daemon(state_dir: Path, port: int = 0, default_timeout: int = 300) -> supervise.SuperviseServer:
    config = supervise.Config("127.0.0.1", port, state_dir, SupervisePolicy(tools=(), timeout=default_timeout))
    return supervise.SuperviseServer(config, Store(state_dir).ensure_layout()).start()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "supervise"


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[supervise.SuperviseServer]:
    server = start_daemon(state_dir)
    yield server
    server.stop()


def http_json(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        connection.request(method, path, body=payload, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/json", data[:200]
        return response.status, json.loads(data)
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read the reply until the server closes."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


def write_hook_config(tmp_path: Path, port: int, patterns: list[str], timeout: int = 30,
                      grace: float = 5) -> Path:
    path = tmp_path / "supervise.json"
    path.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "patterns": patterns,
                                "timeout_seconds": timeout, "grace_seconds": grace}))
    return path


def hook_event(tool_name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"session_id": "s1", "transcript_path": "/tmp/t.jsonl", "cwd": "/workspace",
            "permission_mode": "default", "hook_event_name": "PreToolUse", "tool_name": tool_name,
            "tool_input": tool_input, "tool_use_id": "toolu_1"}


def start_hook(config: Path, event: dict[str, Any], cwd: Path) -> subprocess.Popen[str]:
    """The hook as Claude Code runs it: its own process, isolated (-I: bottle_tasks is not
    importable), with a dead proxy in the environment that it must ignore."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HTTP_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    process = subprocess.Popen([sys.executable, "-I", str(HOOK), str(config)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    assert process.stdin is not None
    process.stdin.write(json.dumps(event))
    process.stdin.close()
    return process


def finish(process: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    assert process.stdout is not None and process.stderr is not None
    code = process.wait(timeout=timeout)
    return code, process.stdout.read(), process.stderr.read()


def wait_for_pending(state_dir: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = Store(state_dir).list_pending()
        if pending:
            return pending[0].id
        time.sleep(0.05)
    raise AssertionError("no pending request appeared")


def in_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --------------------------------------------------------------------------- store


def test_store_request_decision_and_history(state_dir: Path) -> None:
    store = Store(state_dir)
    request = store.create_request("Bash", {"command": "git push origin x"}, "git push origin x", 60)
    assert request.status == "pending" and len(request.id) >= 16
    assert request.id.replace("-", "").replace("_", "").isalnum()
    assert [r.id for r in store.list_pending()] == [request.id]

    decided = store.decide(request.id, "approve", "alice (Alice)", "looks fine")
    assert (decided.status, decided.by, decided.reason) == ("approved", "alice (Alice)", "looks fine")
    again = Store(state_dir).get(request.id)  # a fresh process sees the same thing
    assert (again.status, again.by, again.reason, again.decided_at) == ("approved", "alice (Alice)", "looks fine",
                                                                         decided.decided_at)
    assert again.decided_at.endswith("Z") and again.created_at.endswith("Z")
    assert store.list_pending() == []

    history = store.history()
    assert [h["event"] for h in history] == ["request", "decision"]
    assert history[1] == {"event": "decision", "id": request.id, "at": decided.decided_at, "tool": "Bash",
                          "decision": "approve", "by": "alice (Alice)", "reason": "looks fine"}
    decision_file = json.loads((state_dir / "decisions" / f"{request.id}.json").read_text())
    assert set(decision_file) == {"decision", "by", "reason", "decided_at"}
    for path in (state_dir / "requests" / f"{request.id}.json", state_dir / "decisions" / f"{request.id}.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    leftovers = [p.name for p in state_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_store_refuses_unknown_twice_decided_and_bad_arguments(state_dir: Path) -> None:
    store = Store(state_dir)
    request = store.create_request("WebFetch", {"url": "https://x.test"}, "x", 60)
    with pytest.raises(UnknownRequest, match="unknown request id 'nope-nope-nope'"):
        store.decide("nope-nope-nope", "approve", "alice")
    with pytest.raises(UnknownRequest):
        store.get("../../etc/passwd")
    with pytest.raises(InvalidArgument, match="approve or deny"):
        store.decide(request.id, "maybe", "alice")
    with pytest.raises(InvalidArgument, match="by"):
        store.decide(request.id, "deny", " ")
    store.decide(request.id, "deny", "bob", "no")
    with pytest.raises(AlreadyDecided, match=r"already denied by bob"):
        store.decide(request.id, "approve", "alice")
    for bad in [("", {}, "", 5), ("x" * 201, {}, "", 5), ("Bash", [], "", 5), ("Bash", {}, 3, 5),
                ("Bash", {}, "s" * 2001, 5), ("Bash", {}, "", 0), ("Bash", {}, "", 3601), ("Bash", {}, "", True)]:
        with pytest.raises(InvalidArgument):
            store.create_request(*bad)


def test_store_concurrent_decisions_exactly_one_wins(state_dir: Path) -> None:
    store = Store(state_dir)
    request = store.create_request("Bash", {"command": "rm -rf /"}, "rm", 60)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def decide(index: int) -> None:
        barrier.wait()
        try:
            Store(state_dir).decide(request.id, "approve" if index % 2 else "deny", f"user{index}")
            outcomes.append("won")
        except AlreadyDecided:
            outcomes.append("lost")

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert [h["event"] for h in store.history()].count("decision") == 1


def test_store_expiry_is_computed_recorded_once_and_final(state_dir: Path) -> None:
    clock = FakeClock()
    store = Store(state_dir, clock=clock)
    request = store.create_request("Bash", {"command": "git push"}, "git push", 10)
    clock.advance(10.5)  # past expires_at, inside the grace: still answerable
    assert store.get(request.id).status == "pending"
    clock.advance(1)
    with pytest.raises(RequestExpired, match="expired"):
        store.decide(request.id, "approve", "alice")
    expired = store.get(request.id)
    assert (expired.status, expired.reason) == ("expired", "no decision within 10 s")
    for _ in range(3):
        assert Store(state_dir, clock=clock).get(request.id).status == "expired"
    assert store.list_pending() == []
    events = [h["event"] for h in store.history()]
    assert events == ["request", "expired"], events
    # A decision file written late (after expires_at) does not resurrect it.
    (state_dir / "decisions" / f"{request.id}.json").write_text(json.dumps(
        {"decision": "approve", "by": "late", "reason": "", "decided_at": "2030-01-01T00:00:00.000Z"}))
    assert store.get(request.id).status == "expired"


# --------------------------------------------------------------------------- daemon


def test_daemon_post_and_long_poll_returns_as_soon_as_decided(daemon: supervise.SuperviseServer,
                                                              state_dir: Path) -> None:
    status, created = http_json(daemon.port, "POST", "/v1/requests",
                                {"tool": "Bash", "input": {"command": "git push"}, "summary": "git push"})
    assert status == 201 and created["status"] == "pending"
    request = Store(state_dir).get(created["id"])
    assert request.timeout_seconds == 300  # the config default
    status, answer = http_json(daemon.port, "GET", f"/v1/requests/{created['id']}")
    assert (status, answer["status"]) == (200, "pending")

    def decide_soon() -> None:
        time.sleep(0.5)
        supervise_cli.decide(state_dir, created["id"], "deny", "carol", "not today")

    thread = in_thread(decide_soon)
    started = time.monotonic()
    status, answer = http_json(daemon.port, "GET", f"/v1/requests/{created['id']}?wait=30")
    elapsed = time.monotonic() - started
    thread.join()
    assert status == 200 and 0.4 < elapsed < 3
    assert {k: answer[k] for k in ("id", "status", "by", "reason")} == {
        "id": created["id"], "status": "denied", "by": "carol", "reason": "not today"}
    assert answer["decided_at"].endswith("Z")


@pytest.mark.parametrize("raw, error", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "tool is required"),
    (json.dumps({"tool": ""}).encode(), "tool must be a non-empty string"),
    (json.dumps({"tool": 7}).encode(), "tool must be a non-empty string"),
    (json.dumps({"tool": "x" * 201}).encode(), "at most 200"),
    (json.dumps({"tool": "Bash", "input": "ls"}).encode(), "input must be a JSON object"),
    (json.dumps({"tool": "Bash", "summary": ["x"]}).encode(), "summary must be a string"),
    (json.dumps({"tool": "Bash", "summary": "s" * 2001}).encode(), "at most 2000"),
    (json.dumps({"tool": "Bash", "timeout_seconds": 0}).encode(), "timeout_seconds"),
    (json.dumps({"tool": "Bash", "timeout_seconds": 3601}).encode(), "timeout_seconds"),
    (json.dumps({"tool": "Bash", "timeout_seconds": "60"}).encode(), "timeout_seconds"),
    (json.dumps({"tool": "Bash", "timeout_seconds": 1.5}).encode(), "timeout_seconds"),
    (json.dumps({"tool": "Bash", "timeout_seconds": True}).encode(), "timeout_seconds"),
    (json.dumps({"tool": "Bash", "extra": 1}).encode(), "unknown field"),
    (b"\xff\xfe", "not valid JSON"),
    (json.dumps({"tool": "Bash", "input": {"a": "x" * 70_000}}).encode(), "larger than 65536"),
])
def test_daemon_rejects_malformed_requests_and_keeps_serving(daemon: supervise.SuperviseServer, raw: bytes,
                                                             error: str) -> None:
    status, answer = http_json(daemon.port, "POST", "/v1/requests", raw=raw)
    assert status == 400 and error in answer["error"]
    status, answer = http_json(daemon.port, "POST", "/v1/requests", {"tool": "Bash", "input": {}})
    assert status == 201


def test_daemon_other_errors_are_json_and_never_crash(daemon: supervise.SuperviseServer) -> None:
    assert http_json(daemon.port, "GET", "/v1/requests/unknownid123")[0] == 404
    assert http_json(daemon.port, "GET", "/v1/requests/..%2F..%2Fetc")[0] == 404
    assert http_json(daemon.port, "GET", "/v2/whatever")[0] == 404
    assert http_json(daemon.port, "DELETE", "/v1/requests")[0] == 405
    status, created = http_json(daemon.port, "POST", "/v1/requests", {"tool": "Bash"})
    status, answer = http_json(daemon.port, "GET", f"/v1/requests/{created['id']}?wait=abc")
    assert status == 400 and "wait" in answer["error"]
    assert http_json(daemon.port, "GET", f"/v1/requests/{created['id']}?wait=-1")[0] == 400
    # No Content-Length, a chunked body, a broken request line, an unknown method.
    reply = raw_exchange(daemon.port, b"POST /v1/requests HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400") and b"Content-Length is required" in reply
    reply = raw_exchange(daemon.port, b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400") and b"chunked" in reply
    reply = raw_exchange(daemon.port, b"garbage\r\n\r\n")
    assert b'"error"' in reply and b"Traceback" not in reply and b"<html" not in reply.lower()
    reply = raw_exchange(daemon.port, b"BREW /v1/requests HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 501") and b'"error"' in reply
    assert http_json(daemon.port, "GET", "/healthz") == (200, {"ok": True})


def test_daemon_config_parsing(tmp_path: Path) -> None:
    path = tmp_path / "supervise.yaml"
    path.write_text('listen: "10.243.7.2:8082"\nstate_dir: /var/lib/bottle/supervise\ndefault_timeout_seconds: 120\n')
    assert supervise.load_config(path) == supervise.Config("10.243.7.2", 8082, Path("/var/lib/bottle/supervise"),
                                                           SupervisePolicy(tools=(), timeout=120))
    for bad, message in [("listen: nope\n", "ip:port"), ("state_dir: /x\n", "listen is required"),
                         ('listen: "1.2.3.4:1"\ndefault_timeout_seconds: 0\n', "default_timeout_seconds"),
                         ('listen: "1.2.3.4:1"\nbogus: 1\n', "unknown key")]:
        path.write_text(bad)
        with pytest.raises(supervise.ConfigError, match=message):
            supervise.load_config(path)


def test_daemon_config_tools_are_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "supervise.yaml"
    path.write_text('listen: "10.243.7.2:8082"\ntools: ["Bash(git push:*)", "WebFetch"]\n')
    assert supervise.load_config(path).policy == SupervisePolicy(tools=("Bash(git push:*)", "WebFetch"), timeout=300)
    for bad in ('listen: "1.2.3.4:1"\ntools: "WebFetch"\n', 'listen: "1.2.3.4:1"\ntools: ["", "Bash"]\n',
                'listen: "1.2.3.4:1"\ntools: [1]\n'):
        path.write_text(bad)
        with pytest.raises(supervise.ConfigError, match=f"{path}: tools: must be a list of non-empty strings"):
            supervise.load_config(path)


# --------------------------------------------------------------------------- hook, end to end


def test_hook_approved_by_host_allows(daemon: supervise.SuperviseServer, state_dir: Path, tmp_path: Path) -> None:
    config = write_hook_config(tmp_path, daemon.port, ["Bash(git push:*)", "WebFetch"])
    process = start_hook(config, hook_event("Bash", {"command": "cd /workspace && git push origin bottle/x",
                                                      "description": "push"}), tmp_path)
    request_id = wait_for_pending(state_dir)
    request = Store(state_dir).get(request_id)
    assert request.tool == "Bash" and request.input["command"].endswith("git push origin bottle/x")
    assert "git push origin bottle/x" in request.summary
    time.sleep(0.3)
    assert process.poll() is None, "the hook blocks until the host decides"
    supervise_cli.decide(state_dir, request_id, "approve", "alice", "ship it")
    code, out, err = finish(process)
    assert code == 0, err
    output = json.loads(out)["hookSpecificOutput"]
    assert output["hookEventName"] == "PreToolUse" and output["permissionDecision"] == "allow"
    assert "approved by alice: ship it" in output["permissionDecisionReason"]


def test_hook_denied_by_host_blocks_with_reason(daemon: supervise.SuperviseServer, state_dir: Path,
                                                tmp_path: Path) -> None:
    config = write_hook_config(tmp_path, daemon.port, ["WebFetch(domain:example.com)"])
    process = start_hook(config, hook_event("WebFetch", {"url": "https://example.com/a", "prompt": "p"}), tmp_path)
    request_id = wait_for_pending(state_dir)
    in_thread(lambda: supervise_cli.decide(state_dir, request_id, "deny", "bob", "not that site"))
    code, out, err = finish(process)
    assert code == 2 and out == ""
    assert "a human on the host (bob) denied this WebFetch call: not that site" in err
    assert request_id in err


def test_hook_times_out_when_nobody_decides(daemon: supervise.SuperviseServer, state_dir: Path,
                                            tmp_path: Path) -> None:
    config = write_hook_config(tmp_path, daemon.port, ["Bash(git push:*)"], timeout=1)
    started = time.monotonic()
    code, out, err = finish(start_hook(config, hook_event("Bash", {"command": "git push"}), tmp_path))
    assert code == 2 and out == ""
    assert "no human approved this Bash call within 1 s" in err and "timed out" in err
    assert time.monotonic() - started < 6
    events = [h["event"] for h in Store(state_dir).history()]
    assert events == ["request", "expired"]


def test_pending_request_survives_a_daemon_restart(state_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    first = start_daemon(state_dir, port)
    config = write_hook_config(tmp_path, port, ["Bash(git push:*)"])
    process = start_hook(config, hook_event("Bash", {"command": "git push"}), tmp_path)
    request_id = wait_for_pending(state_dir)
    time.sleep(0.3)  # the hook is in its long poll
    first.stop()
    supervise_cli.decide(state_dir, request_id, "approve", "alice", "decided while the bundle was down")
    time.sleep(1.0)  # the hook retries against a closed port meanwhile
    assert process.poll() is None
    second = start_daemon(state_dir, port)
    try:
        code, out, err = finish(process, timeout=10)
    finally:
        second.stop()
    assert code == 0, err
    assert "decided while the bundle was down" in json.loads(out)["hookSpecificOutput"]["permissionDecisionReason"]


def test_hook_ignores_non_matching_tools_without_contacting_the_daemon(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    config = write_hook_config(tmp_path, port, ["Bash(git push:*)", "WebFetch(domain:example.com)"])
    for tool, tool_input in [("Read", {"file_path": "/workspace/a"}), ("Bash", {"command": "git status"}),
                             ("WebFetch", {"url": "https://other.test/"})]:
        started = time.monotonic()
        code, out, err = finish(start_hook(config, hook_event(tool, tool_input), tmp_path))
        assert (code, out, err) == (0, "", "")
        assert time.monotonic() - started < 3


def test_hook_fails_closed_when_the_daemon_is_unreachable_or_config_bad(tmp_path: Path) -> None:
    config = write_hook_config(tmp_path, free_port(), ["Bash"], timeout=1, grace=0)
    code, _out, err = finish(start_hook(config, hook_event("Bash", {"command": "ls"}), tmp_path))
    assert code == 2 and "could not reach the approval service" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"url": "http://127.0.0.1:1", "patterns": ["Bash(git push:*)", "Task(x)"]}')
    code, _out, err = finish(start_hook(bad, hook_event("Bash", {"command": "ls"}), tmp_path))
    assert code == 2 and "Task(x)" in err
    code, _out, err = finish(start_hook(tmp_path / "missing.json", hook_event("Bash", {"command": "ls"}), tmp_path))
    assert code == 2 and "cannot read the hook config" in err


# --------------------------------------------------------------------------- hook patterns


@pytest.mark.parametrize("pattern, tool, tool_input, expected", [
    ("Bash", "Bash", {"command": "ls"}, True),
    ("Bash", "BashOutput", {}, False),
    ("WebFetch", "WebFetch", {"url": "https://a.test"}, True),
    ("Bash(git push:*)", "Bash", {"command": "git push origin main"}, True),
    ("Bash(git push:*)", "Bash", {"command": "git  push"}, True),
    ("Bash(git push:*)", "Bash", {"command": "git status"}, False),
    ("Bash(git push:*)", "Bash", {"command": "cd /w && git push"}, True),
    ("Bash(git push:*)", "Bash", {"command": "make; GIT_TRACE=1 git push -f"}, True),
    ("Bash(git push:*)", "Bash", {"command": "sudo env A=b /usr/bin/git push"}, True),
    ("Bash(git push:*)", "Bash", {"command": "echo $(git push)"}, True),
    ("Bash(git push:*)", "Bash", {"command": "true || git push\n"}, True),
    ("Bash(git push:*)", "WebFetch", {"command": "git push"}, False),
    ("Bash(npm publish)", "Bash", {"command": "npm publish"}, True),
    ("Bash(npm publish)", "Bash", {"command": "npm publish --tag x"}, False),
    ("Bash(git push * --force)", "Bash", {"command": "git push origin --force"}, True),
    ("Bash(*)", "Bash", {"command": "anything"}, True),
    ("WebFetch(domain:example.com)", "WebFetch", {"url": "https://EXAMPLE.com/x"}, True),
    ("WebFetch(domain:example.com)", "WebFetch", {"url": "https://evil.com/?example.com"}, False),
    ("WebFetch(domain:example.com)", "WebFetch", {"url": "https://a.example.com/"}, False),
    ("WebFetch(domain:*.example.com)", "WebFetch", {"url": "https://a.example.com/"}, True),
    ("Edit(/workspace/secrets/*)", "Edit", {"file_path": "/workspace/secrets/k.pem"}, True),
    ("Write(*.env)", "Write", {"file_path": "/workspace/app/.env"}, True),
    ("Write(*.env)", "Write", {"file_path": "/workspace/app/main.py"}, False),
    ("mcp__github", "mcp__github__create_pull_request", {}, True),
    ("mcp__github__merge", "mcp__github__create_pull_request", {}, False),
    ("*", "Anything", {}, True),
])
def test_hook_patterns(pattern: str, tool: str, tool_input: dict[str, Any], expected: bool) -> None:
    assert hook.compile_pattern(pattern)(tool, tool_input, "/workspace") is expected


def test_hook_rejects_bad_patterns() -> None:
    for pattern in ["Task(x)", "WebFetch(example.com)", "Bash(unclosed", "", "1Bash"]:
        with pytest.raises(hook.HookError):
            hook.compile_pattern(pattern)


def test_hook_in_process_reports_bad_stdin() -> None:
    assert hook.main(["/nonexistent"], stdin=io.StringIO("not json")) == 2
    assert hook.main(["/nonexistent"], stdin=io.StringIO("[]")) == 2


# --------------------------------------------------------------------------- host CLI


def test_cli_format_pending_decide_errors_and_watch(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert supervise_cli.format_pending(state_dir) == "no pending supervise requests"
    store = Store(state_dir)
    request = store.create_request("Bash", {"command": "git push", "nested": {"a": 1}}, "git push origin x", 120)
    text = supervise_cli.format_pending(state_dir)
    assert request.id in text and "tool:    Bash" in text and "summary: git push origin x" in text
    assert '      "nested": {\n        "a": 1\n      }' in text
    assert "ago" in text and "left" in text

    out = io.StringIO()
    stop = threading.Event()
    watcher = in_thread(lambda: supervise_cli.watch(state_dir, 0.05, notify=False, out=out, stop=stop))
    time.sleep(0.2)
    second = store.create_request("WebFetch", {"url": "https://x.test"}, "https://x.test", 120)
    time.sleep(0.3)
    stop.set()
    watcher.join(5)
    printed = out.getvalue()
    assert printed.count(f"request {request.id}") == 1 and printed.count(f"request {second.id}") == 1

    monkeypatch.setenv("USER", "hostuser")
    author = supervise_cli.default_author()
    assert author.startswith("hostuser")
    decided = supervise_cli.decide(state_dir, request.id, "approve")
    assert decided.by == author
    with pytest.raises(AlreadyDecided) as already:
        supervise_cli.decide(state_dir, request.id, "deny", "x")
    with pytest.raises(UnknownRequest) as unknown:
        supervise_cli.decide(state_dir, "doesnotexist", "deny", "x")
    for error in (already.value, unknown.value):
        assert "\n" not in str(error)
    assert supervise_cli.main(["--state-dir", str(state_dir), "deny", "doesnotexist"]) == 1
    assert supervise_cli.main(["--state-dir", str(state_dir), "deny", second.id, "--reason", "no", "--by", "z"]) == 0
    history = Store(state_dir).history()
    decisions = [(h["id"], h["decision"], h["by"], h["reason"]) for h in history if h["event"] == "decision"]
    assert decisions == [(request.id, "approve", author, ""), (second.id, "deny", "z", "no")]
    assert all(h["at"].endswith("Z") for h in history)
