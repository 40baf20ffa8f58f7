"""Templates render configs the daemons accept: routes.yaml through egress's own loader, pipelock.yaml
through the real `pipelock check` when the binary is available, the guest fence as iptables input."""

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bottle_tasks.plan import make_plan
from bottle_tasks.render import render, write_atomic
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.sidecars.routes import load_routes
from bottle_tasks.spec import load_spec


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


PIPELOCK = os.environ.get("BOTTLE_PIPELOCK_BIN") or shutil.which("pipelock") or next((str(p) for p in [Path.home() / "go/bin/pipelock"] if p.exists()), None)


@pytest.mark.skipif(PIPELOCK is None, reason="no pipelock binary on this machine (the Go module proxy refuses it here)")
def test_real_pipelock_accepts_the_rendered_config(tmp_path):
    plan = _plan(tmp_path, PIPELOCK)
    config = tmp_path / "pipelock.yaml"
    write_atomic(config, render("pipelock.yaml.j2", plan, scan_token="t0k"), mode=0o600)
    proc = subprocess.run([PIPELOCK, "check", "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
