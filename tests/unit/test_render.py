"""Templates render configs the daemons accept: routes.yaml through egress's own loader, pipelock.yaml
through the real `pipelock check` when the binary is available, the guest fence as iptables input."""

import subprocess
from dataclasses import replace

import pytest
import yaml

from bottle_tasks.plan import make_plan
from bottle_tasks.render import render, write_atomic
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.sidecars import pipelock_scan
from bottle_tasks.sidecars.routes import load_routes
from bottle_tasks.spec import load_spec
from tests.unit.test_pipelock_real import PIPELOCK


def _plan(tmp_path, pipelock="/usr/bin/pipelock-test"):
    s = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "s"),
                           "BOTTLE_CACHE_DIR": str(tmp_path / "c"), "BOTTLE_PIPELOCK_BIN": pipelock})
    return make_plan(load_spec(ROOT / "agents" / "example.yaml"), s)


def test_routes_yaml_round_trips_through_the_egress_loader(tmp_path):
    plan = _plan(tmp_path)
    path = tmp_path / "routes.yaml"
    path.write_text(render("routes.yaml.j2", plan))
    routes = load_routes(path)
    assert [r.host for r in routes.routes] == [r.host for r in plan.routes]
    anthropic = routes.routes[0]
    assert anthropic.token.env == "ANTHROPIC_API_KEY" and anthropic.token.header == "x-api-key"
    assert anthropic.token.placeholder == plan.token_slots[0].placeholder
    assert routes.upstream_proxy == "http://127.0.0.1:8888"


def test_route_ports_and_body_limit_round_trip_through_the_egress_loader(tmp_path):
    plan = _plan(tmp_path)
    custom = replace(plan.routes[1], ports=(8443, 443), max_body_bytes=4096)
    plan = replace(plan, routes=(plan.routes[0], custom))
    path = tmp_path / "routes.yaml"
    path.write_text(render("routes.yaml.j2", plan))
    assert load_routes(path).routes == plan.routes


def test_routes_yaml_without_pipelock_dials_directly(tmp_path):
    plan = replace(_plan(tmp_path), pipelock_enabled=False)
    path = tmp_path / "routes.yaml"
    path.write_text(render("routes.yaml.j2", plan))
    routes = load_routes(path)
    assert routes.upstream_proxy == "" and routes.pipelock_scan_url == ""


def test_pipelock_yaml_allowlists_exactly_the_routes(tmp_path):
    plan = _plan(tmp_path)
    data = yaml.safe_load(render("pipelock.yaml.j2", plan, scan_token="t0k"))
    assert data["mode"] == "strict"
    assert data["api_allowlist"] == [r.host for r in plan.routes]
    assert data["forward_proxy"]["enabled"] is True
    assert data["scan_api"]["auth"]["bearer_tokens"] == ["t0k"]
    assert data["fetch_proxy"]["listen"].startswith("127.0.0.1:")
    assert "blocklist" not in data["fetch_proxy"]["monitoring"]
    # An exact route's labels are the agent file's, not the agent's: only wildcard routes keep the entropy check.
    assert data["fetch_proxy"]["monitoring"]["subdomain_entropy_exclusions"] == [r.host for r in plan.routes]


def test_pipelock_yaml_for_an_offline_bottle_allows_one_name_that_it_also_blocks(tmp_path):
    plan = replace(_plan(tmp_path), routes=())
    data = yaml.safe_load(render("pipelock.yaml.j2", plan, scan_token="t0k"))
    (only,) = data["api_allowlist"]  # strict mode refuses an empty allowlist
    assert only.endswith(".invalid")
    assert data["fetch_proxy"]["monitoring"]["blocklist"] == ["*.invalid"]
    assert "trusted_domains" not in data and "subdomain_entropy_exclusions" not in data["fetch_proxy"]["monitoring"]


def _seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


def test_pipelock_yaml_sets_the_limits_that_would_stall_a_bottle(tmp_path):
    data = yaml.safe_load(render("pipelock.yaml.j2", _plan(tmp_path), scan_token="t0k"))
    timeouts = data["scan_api"]["timeouts"]
    # The write timeout covers the scan: below it, a long scan's connection closed with no answer.
    assert _seconds(timeouts["write"]) > _seconds(timeouts["scan"]) and _seconds(timeouts["read"]) >= 2
    assert pipelock_scan.TIMEOUT_SECONDS > _seconds(timeouts["write"])  # the client hears pipelock's own answer
    monitoring = data["fetch_proxy"]["monitoring"]
    assert monitoring["max_requests_per_minute"] >= 10_000  # 0 would be pipelock's 60, per domain
    assert monitoring["max_data_per_minute"] == 0 and monitoring["max_url_length"] > 2048
    assert data["scan_api"]["rate_limit"]["requests_per_minute"] >= 60_000
    assert data["scan_api"]["rate_limit"]["burst"] >= 1000
    assert data["forward_proxy"]["max_tunnel_seconds"] >= 3600
    assert data["session_profiling"]["enabled"] is False and data["adaptive_enforcement"]["enabled"] is False
    assert data["scan_api"]["kinds"] == {"url": False, "dlp": True, "prompt_injection": True, "tool_call": False}


@pytest.mark.skipif(PIPELOCK is None, reason="no pipelock binary on this machine (the Go module proxy refuses it here)")
@pytest.mark.parametrize("routes", ["example", "none", "learn on a lan"])
def test_real_pipelock_accepts_the_rendered_config(tmp_path, routes):
    plan = _plan(tmp_path, PIPELOCK)
    if routes == "none":
        plan = replace(plan, routes=())
    if routes == "learn on a lan":   # balanced mode, and ssrf.ip_allowlist with the LAN ranges
        plan = replace(plan, unknown_hosts="learn", unknown_private_network=True)
    config = tmp_path / "pipelock.yaml"
    write_atomic(config, render("pipelock.yaml.j2", plan, scan_token="t0k"), mode=0o600)
    proc = subprocess.run([PIPELOCK, "check", "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ask_and_learn_turn_pipelocks_allowlist_off_and_a_lan_on_only_when_asked(tmp_path):
    import yaml

    plan = _plan(tmp_path)
    strict = yaml.safe_load(render("pipelock.yaml.j2", plan, scan_token="t"))
    assert strict["mode"] == "strict" and "ssrf" not in strict
    learn = yaml.safe_load(render("pipelock.yaml.j2", replace(plan, unknown_hosts="learn"), scan_token="t"))
    assert learn["mode"] == "balanced" and "ssrf" not in learn
    lan = yaml.safe_load(render("pipelock.yaml.j2", replace(plan, unknown_hosts="ask", unknown_private_network=True),
                               scan_token="t"))
    assert lan["ssrf"]["ip_allowlist"] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


def test_guest_fence_admits_only_the_bundle_front_door_and_dns(tmp_path):
    plan = _plan(tmp_path)
    rules = render("guest-fence.rules.j2", plan)
    accepts = [line for line in rules.splitlines() if line.startswith("-A OUTPUT") and "ACCEPT" in line]
    assert accepts == [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A OUTPUT -d {plan.network.bundle_ip}/32 -p tcp --dport 8080 -j ACCEPT",
        f"-A OUTPUT -d {plan.network.bundle_ip}/32 -p udp --dport 53 -j ACCEPT",
        f"-A OUTPUT -d {plan.network.bundle_ip}/32 -p tcp --dport 53 -j ACCEPT",
    ]
    assert ":OUTPUT DROP" in rules and rules.rstrip().endswith("COMMIT")


def test_guest_env_file_holds_placeholders_only(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real-value-never-rendered")
    text = render("guest.env.j2", _plan(tmp_path))
    assert "ANTHROPIC_API_KEY=bottle-placeholder-ANTHROPIC_API_KEY" in text.splitlines()
    assert "sk-ant-real-value" not in text
