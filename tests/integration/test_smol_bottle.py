"""The smolmachines backend end to end: the same bottle as the docker one, with the guest in a smolvm
microVM (the fake, on the real engine). It runs the backend-neutral isolation suite, the client and
token checks, the seed's five probes, and proves the start aborts when the fence is missing.

The "real" flavour runs the same module against a real smolvm when one can run here (KVM or HVF);
otherwise it is skipped with a message saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import tests.integration.test_clients as clients
import tests.integration.test_git as git_tests
import tests.integration.test_observe as observe_tests
import tests.integration.test_supervise as supervise_tests
import tests.integration.test_tokens as tokens
from bottle_tasks.backends.smolmachines import bridge_name as smol_bridge_name
from bottle_tasks.bundle_plan import EGRESS_PORT
from bottle_tasks.settings import ROOT
from tests.integration.conftest import (
    AGENT_FILES, FAKE_TOKEN, GIT_AND_SUPERVISE, GIT_TOKEN, _seed_upstream, _teardown, docker, make_smol_env, smol_bottle,
)
from tests.integration.probes import Probe, run_probes
from tests.integration.test_isolation import (
    assert_only_the_front_door, assert_probed_targets_listen, assert_routed_https_works,
)

AGENT = "smol-a"
FAULTY = "smol-fault"


@pytest.fixture(scope="module", params=["fake", "real"])
def smol_a(request, bottle_env, tmp_path_factory):
    env = make_smol_env(bottle_env, tmp_path_factory, request.param)
    env.env["BOTTLE_TEST_GIT_TOKEN"] = GIT_TOKEN
    env.write_agent(AGENT, "backend: smolmachines\n" + textwrap.dedent(AGENT_FILES["probe-a"]) + GIT_AND_SUPERVISE)
    # git-gate mirrors the upstream when it comes up, so the upstream (on the bottle's bridge) goes first.
    bottle = smol_bottle(env, AGENT, before_start=lambda b: _seed_upstream(b.upstream))
    yield bottle
    _teardown(bottle)
    if request.param == "fake":
        _assert_machine_gone(bottle)


def _machines_of(env) -> list[str]:
    proc = subprocess.run([env.env["BOTTLE_SMOLVM_BIN"], "machine", "ls", "--json"], capture_output=True, text=True,
                          env=env.test_env, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [m["name"] for m in json.loads(proc.stdout)]


def _assert_machine_gone(bottle) -> None:
    assert bottle.plan.guest.name not in _machines_of(bottle.env)
    assert docker("ps", "-aq", "--filter", f"label=smolvm-fake.name={bottle.plan.guest.name}").stdout.strip() == ""
    for name in (b.name for b in bottle.plan.network.bridges):
        assert docker("network", "inspect", name, check=False).returncode != 0, f"network {name} left behind"


def _log_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---- the seed's five probes ------------------------------------------------------------------------

def test_seed_probes(smol_a, host_listener):
    net = smol_a.plan.network
    echo = smol_a.exec("echo", "hello-from-vm")
    assert (echo.returncode, echo.stdout) == (0, "hello-from-vm\n"), echo.stderr
    blocked = run_probes(smol_a, [
        Probe("guest dial to 127.0.0.1", "tcp", ("127.0.0.1", host_listener)),
        Probe("guest dial to the bundle's internal port", "tcp", (net.bundle_ip, 8888)),
        # smolvm's gateway relays 100.96.0.1 to the host's loopback (reference/smolvm-1.9.md §6). The fake has no
        # such gateway, so this one can only fail on a real smolvm, where it matters.
        Probe("smolvm host gateway to a host port", "tcp", ("100.96.0.1", host_listener)),
    ])
    assert not any(r["reached"] for r in blocked.values()), blocked
    prompt = smol_a.exec("cat", "/home/agent/.claude-bottle/prompt.md")
    assert prompt.stdout == "You are a test agent.", prompt.stderr
    # The front door answers on the bundle IP: any HTTP status (egress refuses a bare GET) proves it listens.
    code = smol_a.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*", "-m", "10",
                       f"http://{net.bundle_ip}:{EGRESS_PORT}/")
    assert code.stdout.isdigit() and code.stdout != "000", code.stdout + code.stderr


# ---- the backend-neutral suite ---------------------------------------------------------------------

def test_the_guest_is_a_machine_on_the_bottle_bridge(smol_a):
    plan = smol_a.plan
    assert plan.guest.name in _machines_of(smol_a.env)
    bridge = json.loads(docker("network", "inspect", smol_bridge_name(AGENT)).stdout)[0]
    assert bridge["IPAM"]["Config"][0]["Subnet"] == plan.network.guest_side.subnet
    assert plan.network.guest_side.subnet.startswith("192.168.") and ".17.0/" not in plan.network.guest_side.subnet
    bundle_ip = docker("inspect", "-f", '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}',
                       plan.bundle.name).stdout.strip()
    assert bundle_ip == plan.network.bundle_ip and bundle_ip.endswith(".2")
    # Every smolvm call ran on the machine by name, in the 1.9 syntax.
    calls = _log_lines(smol_a.env.smolvm_argv_log)
    create = next(c for c in calls if c.startswith("machine create"))
    assert f"--allow-cidr {plan.network.bundle_ip}/32" in create and f"--dns {plan.network.bundle_ip}" in create
    assert "--smolfile" not in create and "--net-backend" not in create


LISTENERS = r"""
import json
found = set()
for path, proto in (("/proc/net/tcp", "tcp"), ("/proc/net/tcp6", "tcp"), ("/proc/net/udp", "udp"), ("/proc/net/udp6", "udp")):
    for line in open(path).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, port = local.rsplit(":", 1)
        # /proc writes IPv4 little-endian: 127.x.y.z ends in 7F (docker's own resolver sits on 127.0.0.11)
        loopback = (len(addr) == 8 and addr[6:] == "7F") or addr == "00000000000000000000000001000000"
        if (proto == "udp" or state == "0A") and not loopback:
            found.add(f"{proto}/{int(port, 16)}")
print(json.dumps(sorted(found)))
"""


def test_the_bundle_listens_beyond_loopback_only_on_the_guests_ports(smol_a):
    """smolvm's allowlist is the bundle's whole IP (no ports), so everything else the bundle runs must sit
    on its loopback: pipelock and the scan API are probed from the guest in the suite above, too."""
    plan = smol_a.plan
    found = json.loads(docker("exec", plan.bundle.name, "python3", "-c", LISTENERS).stdout)
    assert found, "the listener scan found nothing, not even egress"
    assert set(found) <= {f"{proto}/{port}" for proto, port in plan.bundle.guest_ports}, found
    assert {"tcp/8080", "tcp/8081", "tcp/8082", "udp/53"} <= set(found), found


def test_guest_reaches_only_the_front_door(smol_a, bottle_b, host_listener):
    assert_only_the_front_door(smol_a, bottle_b, host_listener)


def test_positive_controls_the_probed_targets_really_listen(smol_a, host_listener):
    assert_probed_targets_listen(smol_a, host_listener)


def test_routed_https_works_through_the_chain(smol_a):
    assert_routed_https_works(smol_a)


def test_clients_trust_the_bottle_ca_and_provisioning_landed(smol_a):
    clients.test_curl_python_node_and_git_trust_the_bottle_ca(smol_a)
    clients.test_without_the_ca_the_same_client_is_refused(smol_a)
    clients.test_skills_and_prompt_land_in_the_guest(smol_a)
    owner = smol_a.exec("stat", "-c", "%U %a", "/home/agent/.claude-bottle/prompt.md")
    assert owner.stdout.split() == ["agent", "600"], owner.stdout + owner.stderr


def test_commands_run_as_the_agent_and_the_workspace_is_theirs(smol_a):
    who = smol_a.exec("sh", "-c", "id -un; pwd; touch /workspace/made-by-agent && stat -c %U /workspace/made-by-agent")
    assert who.stdout.split() == ["agent", "/workspace", "agent"], who.stdout + who.stderr
    # The workspace is a host directory in the bottle's state dir, so it outlives the machine.
    assert (smol_a.plan.state_dir / "workspace" / "made-by-agent").exists()


def test_token_reaches_upstream_and_never_the_guest_or_an_argv(smol_a):
    tokens.test_real_token_arrives_upstream_and_the_guest_sees_only_the_placeholder(smol_a)
    env = smol_a.exec("env").stdout
    assert "ANTHROPIC_API_KEY=bottle-placeholder-ANTHROPIC_API_KEY" in env and FAKE_TOKEN not in env
    environ = smol_a.exec("sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'", user="root").stdout
    assert "ANTHROPIC_API_KEY" in environ and FAKE_TOKEN not in environ
    # The needle goes in on stdin: a token on this test's own argv would land in the argv logs checked below.
    scan = smol_a.exec("grep", "-rlsF", "-f", "-", "/etc", "/home", "/workspace", "/root", "/tmp", "/usr/local",
                       user="root", input=FAKE_TOKEN + "\n")
    assert scan.returncode == 1 and scan.stdout == "", scan.stdout
    control = smol_a.exec("grep", "-rlsF", "You are a test agent.", "/home", user="root")
    assert control.stdout.strip(), "the scan would not have found the prompt file that is there"
    assert FAKE_TOKEN not in smol_a.env.smolvm_argv_log.read_text()
    assert FAKE_TOKEN not in smol_a.env.argv_log.read_text()
    db = smol_a.env.env.get("SMOLVM_DATA_DIR")
    if db:     # the fake keeps smolvm's state DB where the real one does; the machine's env is stored there
        from bottle_tasks.backends.smolmachines import state_db
        stored = state_db(db).read_bytes()
        assert b"bottle-placeholder-ANTHROPIC_API_KEY" in stored and FAKE_TOKEN.encode() not in stored


def test_unchanged_start_creates_no_machine_and_builds_nothing(smol_a):
    mark_smol, mark_docker = len(_log_lines(smol_a.env.smolvm_argv_log)), len(_log_lines(smol_a.env.argv_log))
    smol_a.env.doit("start", f"agent={AGENT}", "command=true")
    smol_calls = _log_lines(smol_a.env.smolvm_argv_log)[mark_smol:]
    docker_calls = _log_lines(smol_a.env.argv_log)[mark_docker:]
    assert not [c for c in smol_calls if c.startswith(("machine create", "machine delete", "pack create"))], smol_calls
    assert not [c for c in docker_calls if c.split(" ", 1)[0] in ("build", "save", "create")], docker_calls


def test_start_attaches_a_tty_when_interactive(smol_a):
    env = smol_a.env
    proc = subprocess.run(["script", "-qec", f"{sys.executable} -m doit -f {ROOT}/dodo.py start agent={AGENT} command=tty",
                           "/dev/null"], cwd=ROOT, env=env.env, capture_output=True, text=True, timeout=120)
    assert "/dev/pts/" in proc.stdout, proc.stdout + proc.stderr
    piped = env.doit("start", f"agent={AGENT}", "command=tty", check=False)
    assert "not a tty" in piped.stdout, piped.stdout


def test_git_gate_serves_the_repo_and_forwards_only_allowed_pushes(smol_a):
    git_tests.test_repo_is_cloned_through_git_gate_with_the_agents_identity(smol_a)
    branch = f"bottle/{AGENT}/feature"
    with git_tests.approving_pushes(smol_a):  # Bash(git push:*): git-gate holds every push for a human
        push = git_tests._guest_git(smol_a, f"git checkout -q -b {branch} && echo change > f.txt && git add f.txt && "
                                            f"git commit -qm 'agent change' && git push -q origin {branch} && git rev-parse HEAD")
    assert push.returncode == 0, push.stderr
    assert git_tests._wait_upstream_has(smol_a, f"refs/heads/{branch}", push.stdout.split()[-1]), git_tests._audit(smol_a)
    before = git_tests._upstream_git(smol_a, "for-each-ref")
    to_main = git_tests._guest_git(smol_a, "git checkout -q main && echo x >> README.md && git commit -qam 'to main' && "
                                           "git push origin main")
    assert to_main.returncode != 0 and "git-gate: rejected" in to_main.stderr, to_main.stderr
    assert git_tests._upstream_git(smol_a, "for-each-ref") == before
    assert GIT_TOKEN not in smol_a.exec("env").stdout


def test_supervise_holds_a_push_until_a_human_approves(smol_a):
    supervise_tests.test_the_agent_cannot_edit_the_hook_away(smol_a)
    supervise_tests.test_approve_lets_the_call_through_and_records_who(smol_a)


def test_status_logs_and_shell_see_the_machine(smol_a):
    observe_tests.check_status(smol_a, "smolmachines")
    observe_tests.check_logs(smol_a)
    observe_tests.check_shell(smol_a)


# ---- a missing fence aborts the start ----------------------------------------------------------------

@pytest.fixture()
def faulty(smol_a):
    if smol_a.env.env["BOTTLE_SMOLVM_BIN"].endswith("-real"):
        pytest.skip("fault injection needs the fake smolvm")
    env = smol_a.env
    env.write_agent(FAULTY, "backend: smolmachines\nroutes: []\n")
    yield env, {"SMOLVM_FAKE_NETWORK": smol_bridge_name(FAULTY)}
    env.doit("clean", f"agent={FAULTY}", "purge=1", check=False)


def _start_fails(env, extra: dict, fault: str) -> str:
    proc = env.doit("start", f"agent={FAULTY}", "command=true", check=False, extra_env={**extra, **fault_env(fault)})
    assert proc.returncode != 0, proc.stdout
    return proc.stdout + proc.stderr


def fault_env(fault: str) -> dict:
    versions = {"0.8": "0.8.0", "1.8": "1.8.3"}
    return {"SMOLVM_FAKE_VERSION": versions[fault]} if fault in versions else {"SMOLVM_FAKE_FAULT": fault}


def test_a_missing_fence_aborts_the_start_and_leaves_no_machine(faulty):
    env, extra = faulty
    plan = env.plan(FAULTY)
    # smolvm stores no egress policy (0.8's --from behaviour in a 1.9 disguise): the state-DB check catches it.
    out = _start_fails(env, extra, "drop-policy")
    assert "is not fenced" in out and "allowed_cidrs=None" in out, out
    assert plan.guest.name not in _machines_of(env)
    # smolvm stores the policy but enforces nothing: only the canary from inside can tell. The agent's
    # workspace (it outlives machines) holds modules that would forge the canary's verdict if root's
    # python imported from there.
    forged = 'import sys\nprint(\'["connected", "timeout"]\')\nsys.exit(0)\n'
    for module in ("json.py", "socket.py"):
        (plan.state_dir / "workspace" / module).write_text(forged)
    out = _start_fails(env, extra, "no-enforce")
    assert "is not fenced" in out and "reached" in out and plan.network.guest_side.gateway in out, out
    assert plan.guest.name not in _machines_of(env)
    # A real 0.8: refused before anything is created, with the reason.
    out = _start_fails(env, extra, "0.8")
    assert "older than 1.8.0" in out and "--allow-cidr" in out, out
    out = _start_fails(env, extra, "1.8")
    assert "older than 1.9.0" in out and "machine cp" in out, out
    # The positive control: with an honest smolvm the same agent starts. A network the test made on the
    # bridge's first-choice subnet moves it to the next candidate, and start says so.
    env.doit("clean", f"agent={FAULTY}", extra_env=extra)      # the failed starts left the bundle and its bridge
    blocker = f"bottle-test-blocker-{FAULTY}"
    docker("network", "create", "--subnet", plan.network.guest_side.subnet, "--label", "dev.claude-bottle.test=blocker", blocker)
    try:
        started = env.doit("start", f"agent={FAULTY}", "command=true", extra_env=extra)
        moved = env.plan(FAULTY).network
        assert moved.guest_side.subnet != plan.network.guest_side.subnet
        assert f"subnet {plan.network.guest_side.subnet} is in use" in started.stderr and moved.guest_side.subnet in started.stderr
        assert plan.guest.name in _machines_of(env)
        # The second start finds everything current: the note about the move changes no fingerprint.
        mark = len(_log_lines(env.smolvm_argv_log))
        assert env.doit("start", f"agent={FAULTY}", "command=echo up", extra_env=extra).stdout.strip().endswith("up")
        assert not [c for c in _log_lines(env.smolvm_argv_log)[mark:] if c.startswith("machine create")]
        # A machine restarted outside doit is recreated and proved again, canary included.
        smolvm = [env.env["BOTTLE_SMOLVM_BIN"], "machine"]
        for verb in ("stop", "start"):
            subprocess.run([*smolvm, verb, "--name", plan.guest.name], env={**env.test_env, **extra},
                           check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        mark = len(_log_lines(env.smolvm_argv_log))
        env.doit("start", f"agent={FAULTY}", "command=true", extra_env=extra)
        again = _log_lines(env.smolvm_argv_log)[mark:]
        assert any(c.startswith("machine create") for c in again) and any("-I -c" in c for c in again), again
        env.doit("clean", f"agent={FAULTY}", "purge=1", extra_env=extra)
    finally:
        docker("network", "rm", blocker, check=False)
    assert plan.guest.name not in _machines_of(env)
    assert docker("network", "inspect", smol_bridge_name(FAULTY), check=False).returncode != 0
    assert docker("ps", "-aq", "--filter", f"label=smolvm-fake.name={plan.guest.name}").stdout.strip() == ""
