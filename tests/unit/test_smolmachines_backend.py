"""The smolmachines building blocks against the fake smolvm's CLI contract (no docker needed)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from bottle_tasks.backends import smolmachines as smol
from bottle_tasks.backends import host_subnets
from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError
from bottle_tasks.subnets import bridge_subnet as smol_bridge_subnet
from bottle_tasks.settings import ROOT
from tests.unit.test_fake_smolvm_cli import write_pack

FAKE = ROOT / "tests" / "fakes" / "smolvm"


def test_bridge_subnet_is_stable_skips_17_and_moves_past_a_taken_one():
    subnet, note = smol_bridge_subnet("example", [])
    assert subnet == smol_bridge_subnet("example", [])[0] and note == ""
    assert subnet.subnet_of(ipaddress.ip_network("192.168.0.0/16")) and subnet.network_address.packed[2] != 17
    moved, note = smol_bridge_subnet("example", [subnet])
    assert moved != subnet and str(subnet) in note and str(moved) in note
    assert smol_bridge_subnet("example", [subnet]) == (moved, note)
    assert all(smol_bridge_subnet(f"agent-{i}", [])[0].network_address.packed[2] != 17 for i in range(300))


def test_host_routes_are_read_from_proc_and_skip_the_default_route(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"       # default via 192.168.0.1
        "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"       # 192.168.0.0/24 (the LAN)
        "br-1a2b\t0037A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")    # a docker bridge
    assert host_subnets.host_routes(table) == [("eth0", ipaddress.ip_network("192.168.0.0/24")),
                                       ("br-1a2b", ipaddress.ip_network("192.168.55.0/24"))]


def test_an_existing_bridge_keeps_its_subnet_until_something_else_overlaps_it():
    first, _ = smol_bridge_subnet("example", [])
    moved, _ = smol_bridge_subnet("example", [first])
    # The first choice is free again, but the bottle's bridge already sits on `moved`: it stays.
    assert smol_bridge_subnet("example", [], current=str(moved))[0] == moved
    assert smol_bridge_subnet("example", [moved], current=str(moved))[0] == first


def _create(tmp_path, version: str | None = None):
    pack = tmp_path / "pack"
    write_pack(tmp_path / "pack.smolmachine")
    argv = smol.machine_create_argv(str(FAKE), "bottle-x", pack, "192.168.40.2", {"HTTPS_PROXY": "http://192.168.40.2:8080"},
                                    labels={"dev.claude-bottle.slug": "x"}, cpus=2, mem_mib=smol.memory_mib("1g"),
                                    volumes=[f"{tmp_path}:/workspace"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLVM_")}
    env.update(SMOLVM_DATA_DIR=str(tmp_path / "data"), DOCKER="/nonexistent/docker")
    if version:
        env["SMOLVM_FAKE_VERSION"] = version
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=30)
    return argv, proc


def test_create_argv_is_accepted_by_the_1_9_contract_and_stores_the_fence(tmp_path):
    argv, proc = _create(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--smolfile" not in argv and "--image" not in argv and "--net-backend" not in argv
    record = smol.machine_record("bottle-x", smol.state_db(str(tmp_path / "data")))
    smol.verify_fence("bottle-x", record, "192.168.40.2")
    assert (record["cpus"], record["mem"], record["labels"]) == (2, 1024, {"dev.claude-bottle.slug": "x"})


def test_memory_sizes_convert_to_mib_and_bad_ones_name_the_key():
    assert [smol.memory_mib(m) for m in ("512m", "4g", "2048k", None)] == [512, 4096, 64, None]
    with pytest.raises(BottleError, match="resources.memory"):
        smol.memory_mib("lots")


def test_the_0_8_hole_is_caught_by_the_fence_check(tmp_path):
    _, proc = _create(tmp_path, version="0.8.0")
    assert proc.returncode == 0, proc.stderr          # 0.8 accepts the flags and silently drops the CIDR
    record = smol.machine_record("bottle-x", smol.state_db(str(tmp_path / "data")))
    with pytest.raises(BottleError, match="not fenced"):
        smol.verify_fence("bottle-x", record, "192.168.40.2")


def test_missing_machine_or_db_is_a_clear_error(tmp_path):
    with pytest.raises(BottleError, match="does not exist"):
        smol.machine_record("ghost", tmp_path / "nope.db")
    _create(tmp_path)
    with pytest.raises(BottleError, match="not in smolvm's state DB"):
        smol.machine_record("ghost", smol.state_db(str(tmp_path / "data")))


def _smol_plan(tmp_path):
    from tests.unit.test_plan import settings

    from bottle_tasks.plan import make_plan
    from bottle_tasks.spec import load_spec
    s = settings(tmp_path, BOTTLE_BACKEND="smolmachines", BOTTLE_SMOLVM_BIN=str(FAKE))
    return make_plan(load_spec(ROOT / "agents" / "example.yaml"), s)


def test_guest_exec_argv_drops_to_the_agent_and_keeps_the_1_9_syntax(tmp_path):
    plan = _smol_plan(tmp_path)
    guest = smol.SmolGuest(plan, smol.Smolvm(str(FAKE)))
    as_agent = guest.exec_argv(["id", "-un"], stdin=False)
    assert as_agent[:5] == [str(FAKE), "machine", "exec", "--name", plan.guest.name]
    assert as_agent[as_agent.index("--") + 1:] == ["runuser", "-u", "agent", "--", "id", "-un"]
    assert "-i" not in as_agent and "-t" not in as_agent
    as_root = guest.exec_argv(["true"], user="root")
    assert as_root[as_root.index("--") + 1:] == ["true"] and "-i" in as_root
    attach = guest.attach_argv(["claude"], tty=True)
    assert "-t" in attach and f"HTTPS_PROXY={plan.bundle.egress_url}" in attach
    # The fake parses each shape as smolvm 1.9 would: past the parser, it fails only on the missing machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLVM_")}
    env.update(SMOLVM_DATA_DIR=str(tmp_path / "data"), DOCKER="/nonexistent/docker")
    for argv in (as_agent, as_root, attach):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=30)
        assert (proc.returncode, proc.stderr.strip()) == (1, f"Error: vm not found: {plan.guest.name}"), proc.stderr


def test_a_machine_with_our_name_but_not_ours_is_refused_with_the_fix(tmp_path, monkeypatch):
    plan = _smol_plan(tmp_path)
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DOCKER", "/nonexistent/docker")
    smolvm = smol.Smolvm(str(FAKE))
    assert smolvm.status(plan.guest.name) is None
    write_pack(tmp_path / "other.smolmachine")
    smolvm("machine", "create", "--name", plan.guest.name, "--from", str(tmp_path / "other.smolmachine"))
    # A command through the client drops its cached status: the new machine is seen.
    status = smolvm.status(plan.guest.name)
    assert status["name"] == plan.guest.name and status["state"] == "created"
    with pytest.raises(BottleError, match=f"smolvm machine delete --name {plan.guest.name} -f"):
        smol.ensure_machine_owned(plan, status)
    owned = {**status, "labels": dict(plan.labels)}
    smol.ensure_machine_owned(plan, owned)


def test_clean_without_smolvm_stops_before_the_bridge_and_says_how_to_go_on(tmp_path):
    from dataclasses import replace

    plan = _smol_plan(tmp_path)
    plan = replace(plan, image_pipeline=replace(plan.image_pipeline, smolvm=str(tmp_path / "no-smolvm-here")))
    with pytest.raises(BottleError, match=f"cannot delete machine {plan.guest.name}.*BOTTLE_SMOLVM_BIN"):
        smol.SmolmachinesBackend(Docker()).remove_guest(plan)


@pytest.mark.parametrize("stored,why", [
    ({"allowed_cidrs": ["192.168.40.2/32"], "network_backend": "tsi"}, "network_backend='tsi'"),
    ({"allowed_cidrs": ["192.168.40.2/32"], "dns_filter_hosts": ["evil.test"]}, "dns_filter_hosts"),
    ({"allowed_cidrs": ["192.168.40.2/32"], "ports": ["8080:80"]}, "ports"),
    ({"allowed_cidrs": ["192.168.40.2/32", "0.0.0.0/0"]}, "0.0.0.0/0"),
    ({"allowed_cidrs": None}, "allowed_cidrs=None"),
])
def test_the_stored_policy_must_be_the_bundle_and_nothing_else(stored, why):
    with pytest.raises(BottleError, match="is not fenced") as caught:
        smol.verify_fence("bottle-x", {"network": True, **stored}, "192.168.40.2")
    assert why in str(caught.value)
    smol.verify_fence("bottle-x", {"network": True, "allowed_cidrs": ["192.168.40.2/32"], "ports": [],
                                   "network_backend": "virtio-net"}, "192.168.40.2")


def test_a_host_with_no_free_subnet_still_loads_the_plan_and_preflight_refuses(tmp_path):
    from tests.unit.test_plan import settings

    from bottle_tasks.plan import make_plan
    from bottle_tasks.spec import load_spec
    everything = smol.HostSubnets((ipaddress.ip_network("192.168.0.0/16"),))      # a VPN that pushed the whole range
    plan = make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path, BOTTLE_BACKEND="smolmachines"),
                     everything)
    assert "no free subnet in 192.168.0.0/16" in plan.network.problem
    with pytest.raises(BottleError, match="no free subnet in 192.168.0.0/16"):
        smol.SmolmachinesBackend(Docker()).preflight(plan)


def test_the_subnet_note_never_changes_a_fingerprint(tmp_path):
    from dataclasses import replace

    plan = _smol_plan(tmp_path)
    noted = replace(plan, network=replace(plan.network, note="subnet x is in use; y instead"))
    assert noted == plan and repr(noted) == repr(plan)


def test_smolvm_1_8_is_refused_for_its_cp(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVM_FAKE_VERSION", "1.8.3")
    with pytest.raises(BottleError, match="older than 1.9.0.*machine cp"):
        smol.require_smolvm(str(FAKE))


def test_state_db_follows_smolvm_on_linux_and_macos(tmp_path, monkeypatch):
    monkeypatch.delenv("SMOLVM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert smol.state_db(platform="linux") == tmp_path / "xdg/smolvm/server/smolvm.db"
    assert smol.state_db(str(tmp_path), platform="linux") == tmp_path / ".local/share/smolvm/server/smolvm.db"
    assert smol.state_db(str(tmp_path), platform="darwin") == tmp_path / "Library/Application Support/smolvm/server/smolvm.db"


def test_a_skill_symlink_is_recreated_as_a_link_and_its_host_target_never_copied(tmp_path, monkeypatch):
    plan = _smol_plan(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text("not for the guest")
    skill = tmp_path / "skill"
    (skill / "sub").mkdir(parents=True)
    (skill / "SKILL.md").write_text("a skill")
    (skill / "leak").symlink_to(secret)
    (skill / "linked-dir").symlink_to(tmp_path)
    calls = []
    smolvm = smol.Smolvm(str(FAKE), runner=lambda argv, **kw: calls.append(list(argv)))
    smol.SmolGuest(plan, smolvm).copy(skill, "/home/agent/.claude/skills/skill")
    copied = [c[-2] for c in calls if c[1:3] == ["machine", "cp"]]
    assert copied == [str(skill / "SKILL.md")]
    links = [c[c.index("--") + 1:] for c in calls if "ln" in c]
    assert ["ln", "-sfn", str(secret), "/home/agent/.claude/skills/skill/leak"] in links
    assert ["ln", "-sfn", str(tmp_path), "/home/agent/.claude/skills/skill/linked-dir"] in links
