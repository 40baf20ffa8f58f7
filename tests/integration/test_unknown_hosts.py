"""Hosts the agent file does not name, on the real engine: deny (a 403 that says what to do, one audit
line with its request id), ask (held for a human, approved once or for good and applied live, or
denied with a reason the agent reads) and learn (allowed and recorded, then suggested as routes that,
with deny, let the same traffic through and nothing else).

The stand-in upstream sits on a private test network, so these agents set
network.unknown_private_network: the private-address floor itself is proved in the unit tests
(tests/unit/test_egress_decisions.py), which resolve names to public and private addresses alike.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from bottle_tasks.sidecars import audit
from bottle_tasks.sidecars.supervise_store import Store
from tests.integration.conftest import _bottle, _teardown, docker, start_upstream


DENY = """
    description: "unknown hosts: deny"
    routes:
      - host: upstream.test
        private_network: true
"""
ASK = """
    description: "unknown hosts: ask"
    routes: []
    network: {unknown_hosts: ask, unknown_private_network: true}
"""
LEARN = """
    description: "unknown hosts: learn"
    routes: []
    network: {unknown_hosts: learn, unknown_private_network: true}
"""


def curl(bottle, url: str, *extra: str) -> subprocess.CompletedProcess:
    return bottle.exec("curl", "-sS", "-m", "90", "-o", "-", "-w", "\n%{http_code}\n", *extra, url)


def status_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def audit_lines(bottle) -> list[dict]:
    return list(audit.read_records(bottle.plan.audit_dir))


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def started_at(bottle) -> str:
    return docker("inspect", "-f", "{{.State.StartedAt}}", bottle.plan.bundle.name).stdout.strip()


def agent_bottle(env, name: str, text: str):
    env.write_agent(name, text)
    bottle = _bottle(env, name)
    yield bottle
    _teardown(bottle)


@pytest.fixture(scope="module")
def deny_bottle(bottle_env):
    yield from agent_bottle(bottle_env, "probe-deny", DENY)


def test_a_block_is_one_audit_line_with_the_request_id_the_403_names(deny_bottle):
    proc = deny_bottle.exec("curl", "-sS", "-m", "10", "-i", "http://unrouted.test/probe?token=x")
    assert " 403 " in proc.stdout.splitlines()[0], proc.stdout
    request_id = re.search(r"(?im)^x-bottle-request-id: (\w+)", proc.stdout).group(1)
    assert f"request id: {request_id}" in proc.stdout
    assert '- {"host": "unrouted.test"}' in proc.stdout and "unknown_hosts: ask" in proc.stdout
    lines = wait_for(lambda: [r for r in audit_lines(deny_bottle) if r.get("request_id") == request_id],
                     "the audit line")
    time.sleep(0.5)   # a second line for the same request would arrive by now
    lines = [r for r in audit_lines(deny_bottle) if r.get("request_id") == request_id]
    assert len(lines) == 1, lines
    [line] = lines
    assert (line["source"], line["decision"], line["reason_code"], line["host"], line["path"]) == \
        ("egress", "block", "route_not_allowed", "unrouted.test", "/probe")
    assert line["bottle"] == deny_bottle.plan.slug
    assert (deny_bottle.plan.state_dir / "audit.jsonl").resolve() == deny_bottle.plan.audit_dir / "audit.jsonl"


def test_the_stream_records_the_bundles_daemons_starting(deny_bottle):
    started = {r["detail"]["daemon"] for r in audit_lines(deny_bottle) if r["event"] == "daemon_start"}
    assert {"egress", "dns"} <= started


@pytest.fixture(scope="module")
def ask_bottle(bottle_env):
    yield from agent_bottle(bottle_env, "probe-ask", ASK)


def held(bottle, host: str) -> str:
    store = Store(bottle.plan.approvals_dir)
    request = wait_for(lambda: next((r for r in store.list_pending() if r.input.get("host") == host), None),
                       f"a held request to {host}")
    assert request.source == "egress"
    return request.id


def test_a_held_host_approved_for_good_passes_live_without_a_restart(ask_bottle):
    before = started_at(ask_bottle)
    agent = subprocess.Popen(ask_bottle.exec_argv(["curl", "-sS", "-m", "90", "-w", "\n%{http_code}\n",
                                                   "https://upstream.test/first"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ask_bottle.env.test_env)
    request_id = held(ask_bottle, "upstream.test")
    ask_bottle.env.doit("approve", "agent=probe-ask", f"id={request_id}", "scope=always")
    out, err = agent.communicate(timeout=60)
    assert out.strip().splitlines()[-1] == "200", out + err
    second = curl(ask_bottle, "https://upstream.test/second")
    assert status_of(second) == "200", second.stdout + second.stderr
    assert Store(ask_bottle.plan.approvals_dir).list_pending() == []
    assert len([r for r in Store(ask_bottle.plan.approvals_dir).history() if r["event"] == "request"]) == 1
    assert started_at(ask_bottle) == before   # applied live: the bundle was not restarted
    overlay = json.loads((ask_bottle.plan.policy_dir / "overlay.json").read_text())
    assert [r["host"] for r in overlay["routes"]] == ["upstream.test"]
    ids = [(r["source"], r["decision"]) for r in audit_lines(ask_bottle) if r.get("request_id") == request_id]
    assert ("egress", "hold") in ids and ("supervise", "approve") in ids and ("egress", "allow") in ids


def test_a_denial_reason_reaches_the_agent(ask_bottle):
    agent = subprocess.Popen(ask_bottle.exec_argv(["curl", "-sS", "-m", "90", "http://api.anthropic.com/nope"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ask_bottle.env.test_env)
    request_id = held(ask_bottle, "api.anthropic.com")
    ask_bottle.env.doit("deny", "agent=probe-ask", f"id={request_id}", "reason=not part of this task")
    out, err = agent.communicate(timeout=60)
    assert "denied_by_human" in out and "not part of this task" in out, out + err


def test_an_approval_for_good_survives_clean_and_only_purge_removes_it(ask_bottle):
    env, overlay = ask_bottle.env, ask_bottle.plan.policy_dir / "overlay.json"
    assert "upstream.test" in overlay.read_text()   # approved for good above
    env.doit("clean", "agent=probe-ask")
    assert "upstream.test" in overlay.read_text()
    env.doit("start", "agent=probe-ask", "command=true")
    start_upstream(env, ask_bottle.plan, ask_bottle.upstream)   # clean took its network with the bottle's
    again = curl(ask_bottle, "https://upstream.test/after-clean")
    assert status_of(again) == "200", again.stdout + again.stderr
    assert Store(ask_bottle.plan.approvals_dir).list_pending() == []
    env.doit("clean", "agent=probe-ask", "purge=1")
    assert not overlay.exists() and not ask_bottle.plan.state_dir.exists()


@pytest.fixture(scope="module")
def learned(bottle_env):
    bottle_env.write_agent("probe-learn", LEARN)
    bottle = _bottle(bottle_env, "probe-learn")
    try:
        traffic = [("GET", "https://upstream.test/v1/models"), ("POST", "https://upstream.test/v1/messages"),
                   ("GET", "https://api.anthropic.com/status")]
        for method, url in traffic:
            proc = curl(bottle, url, "-X", method, *(["-d", "{}"] if method == "POST" else []))
            assert status_of(proc) == "200", (url, proc.stdout, proc.stderr)
        suggestion = bottle_env.doit("policy", "suggest", "agent=probe-learn").stdout
        yield bottle, traffic, suggestion
    finally:
        _teardown(bottle)


def test_learn_records_what_it_allowed(learned):
    bottle, traffic, _ = learned
    seen = {(r["method"], r["host"], r["path"]) for r in audit_lines(bottle) if r["decision"] == "learn"}
    assert {("GET", "upstream.test", "/v1/models"), ("POST", "upstream.test", "/v1/messages"),
            ("GET", "api.anthropic.com", "/status")} <= seen


def test_start_warns_that_learn_mode_is_on(bottle_env, learned):
    proc = bottle_env.doit("start", "agent=probe-learn", "command=true")
    assert "learn mode" in proc.stdout + proc.stderr


def test_the_suggested_routes_with_deny_pass_the_same_traffic_and_nothing_else(bottle_env, learned):
    bottle, traffic, suggestion = learned
    # doit's own ".  policy" line is not the command's output
    routes = yaml.safe_load("\n".join(line for line in suggestion.splitlines() if not line.startswith(".  ")))
    routes = routes["routes"] if isinstance(routes, dict) else routes
    assert {r["host"] for r in routes} == {"upstream.test", "api.anthropic.com"}
    for route in routes:
        route["private_network"] = True   # the stand-in upstream's test network, as every test agent says
    bottle_env.write_agent("probe-learned", yaml.safe_dump({"description": "routes from learn",
                                                            "routes": routes}))
    locked = _bottle(bottle_env, "probe-learned")
    try:
        for method, url in traffic:
            proc = curl(locked, url, "-X", method, *(["-d", "{}"] if method == "POST" else []))
            assert status_of(proc) == "200", (url, proc.stdout, proc.stderr)
        other_path = curl(locked, "https://upstream.test/admin", "-X", "DELETE")
        assert status_of(other_path) == "403", other_path.stdout
        new_host = locked.exec("curl", "-sS", "-m", "10", "-i", "http://unrouted.test/")
        assert " 403 " in new_host.stdout.splitlines()[0] and "route_not_allowed" in new_host.stdout
    finally:
        _teardown(locked)
