"""Integration fixtures: real engine, real bottles started with `doit start`, a fake upstream the tests own.

Bottles are session-scoped (starting one costs seconds); every test uses its own probes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bottle_tasks.labels import LABEL
from bottle_tasks.plan import Plan
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.backends import backend_for
from bottle_tasks.tasks.common import load_plan

from tests.integration.certs import mint_upstream_certs

UPSTREAM_IMAGE = "claude-bottle-test/upstream:latest"
UPSTREAM_NAMES = ["api.anthropic.com", "upstream.test", "unrouted.test"]
# A fake credential in the Anthropic key shape; it must arrive upstream and appear nowhere in the guest.
FAKE_TOKEN = "sk-ant-api03-" + secrets.token_hex(24)

AGENT_FILES = {
    "probe-a": """
        description: "isolation and token probes"
        prompt: "You are a test agent."
        skills: [skills/probe-skill]
        routes:
          - host: api.anthropic.com
            private_network: true      # the fake upstream sits on a private test network
            token: {env: ANTHROPIC_API_KEY, header: x-api-key}
          - host: upstream.test
            private_network: true
          - host: "*.wild.test"
            private_network: true
            methods: [GET]
    """,
    "probe-b": """
        description: "a second bottle, the neighbour the first must not reach"
        routes: []
    """,
}


def docker(*args: str, check: bool = True, input: str | None = None,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra} if env_extra else None   # values by name, like the tool does
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, input=input, env=env)


@dataclass
class Env:
    root: Path
    env: dict[str, str]
    argv_log: Path
    smolvm_argv_log: Path | None = None

    def doit(self, *args: str, check: bool = True, timeout: float = 1800, extra_env: dict | None = None,
             ) -> subprocess.CompletedProcess:
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    @property
    def test_env(self) -> dict[str, str]:
        """The tool's environment without the docker argv shim: what a test runs itself is not the tool's argv."""
        path = ":".join(p for p in self.env["PATH"].split(":") if p != str(self.root / "shim"))
        return {**self.env, "PATH": path}

    def settings(self, extra_env: dict | None = None) -> Settings:
        return Settings.from_env({**self.env, **(extra_env or {})})

    def plan(self, agent: str, extra_env: dict | None = None) -> Plan:
        """The plan exactly as the tool computes it (for smolmachines that includes the host's subnets)."""
        return load_plan(Path(self.env["BOTTLE_AGENTS_DIR"]) / f"{agent}.yaml", self.settings(extra_env))

    def write_agent(self, name: str, text: str) -> Path:
        path = Path(self.env["BOTTLE_AGENTS_DIR"]) / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path


@dataclass
class Bottle:
    env: Env
    agent: str
    plan: Plan
    upstream: str
    upstream_ip: str = ""
    extras: dict = field(default_factory=dict)

    def exec_argv(self, cmd, *, user: str = "agent", env: dict | None = None) -> list[str]:
        """The backend's own exec (docker exec, or smolvm machine exec), run with this test's environment."""
        return backend_for(self.plan).guest(self.plan).exec_argv(list(cmd), user=user, env=env)

    def exec(self, *cmd: str, user: str = "agent", check: bool = False, input: str | None = None):
        return subprocess.run(self.exec_argv(cmd, user=user), capture_output=True, text=True, check=check,
                              input=input, env=self.env.test_env, stdin=None if input is not None else subprocess.DEVNULL)

    def upstream_log(self) -> list[dict]:
        out = docker("logs", self.upstream).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def bundle_log(self) -> str:
        proc = docker("logs", self.plan.bundle.name)
        return proc.stdout + proc.stderr


def _engine_or_fail() -> None:
    if docker("info", check=False).returncode != 0:
        pytest.fail("the Docker engine is not reachable; integration tests need it (CI starts dockerd)")


def _remove_leftovers_of_earlier_runs(base: Path) -> None:
    """A run that died (CI timeout, SIGKILL) leaves bottles whose names would clash with ours. Only
    resources labelled with a state dir under pytest's temp root, i.e. made by these tests, go."""
    root = str(base.parent)
    listings = {"container": (["ps", "-a"], "{{.Names}}", ["rm", "-f"]),
                "network": (["network", "ls"], "{{.Name}}", ["network", "rm"]),
                "volume": (["volume", "ls"], "{{.Name}}", ["volume", "rm", "-f"])}
    for ls, name_format, remove in listings.values():      # containers first: networks and volumes need them gone
        out = docker(*ls, "--filter", f"label={LABEL}.state", "--format",
                     name_format + ' {{.Label "' + LABEL + '.state"}}').stdout
        for line in out.splitlines():
            name, _, state = line.partition(" ")
            if state.startswith(root) and not state.startswith(str(base)):
                docker(*remove, name, check=False)
    for name in docker("ps", "-a", "--filter", f"label={LABEL}.test", "--format", "{{.Names}}").stdout.split():
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def bottle_env(tmp_path_factory) -> Env:
    _engine_or_fail()
    _remove_leftovers_of_earlier_runs(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("bottle")
    agents = root / "agents"
    agents.mkdir()
    certs = root / "upstream-certs"
    ca_pem, _, _ = mint_upstream_certs(certs, UPSTREAM_NAMES + ["sub.wild.test", "git.test"])
    # A docker shim on PATH records every argv the tool runs, so tests can prove no secret is on one.
    shim_dir = root / "shim"
    shim_dir.mkdir()
    argv_log = root / "docker-argv.log"
    real_docker = shutil.which("docker")
    (shim_dir / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{argv_log}"\nexec "{real_docker}" "$@"\n')
    (shim_dir / "docker").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim_dir}:{os.environ['PATH']}",
        "BOTTLE_AGENTS_DIR": str(agents),
        "BOTTLE_STATE_DIR": str(root / "state"),
        "BOTTLE_CACHE_DIR": str(root / "cache"),
        "BOTTLE_UPSTREAM_CA_CERTS": str(ca_pem),
        "ANTHROPIC_API_KEY": FAKE_TOKEN,
    }
    e = Env(root=root, env=env, argv_log=argv_log)
    for name, text in AGENT_FILES.items():
        e.write_agent(name, text)
    skill = agents / "skills" / "probe-skill"
    skill.mkdir(parents=True)
    (skill / "SKILL.md").write_text("---\nname: probe-skill\ndescription: a probe skill\n---\nA probe skill.\n")
    docker("build", "-q", "-t", UPSTREAM_IMAGE, "--build-arg", f"BASE_IMAGE={e.settings().base_image}",
           str(ROOT / "tests" / "integration" / "upstream"))
    yield e
    # Leak check: after every bottle's clean, nothing labelled by these tests may remain.
    leftovers = docker("ps", "-a", "--filter", f"label={LABEL}.state", "--format", "{{.Names}} {{.Label \"" + LABEL + ".state\"}}").stdout
    ours = [line for line in leftovers.splitlines() if str(root) in line]
    assert not ours, f"containers left behind: {ours}"


def start_upstream(env: Env, plan: Plan, name: str, aliases: list[str] | None = None,
                   container_env: dict[str, str] | None = None, certs: Path | None = None) -> str:
    """The stand-in upstream on the plan's egress network, answering to aliases; its IP. certs: a
    directory with server.pem and server-key.pem (default: the session's)."""
    certs = certs or env.root / "upstream-certs"
    names = aliases or UPSTREAM_NAMES + ["sub.wild.test"]
    env_args = [arg for key in (container_env or {}) for arg in ("--env", key)]
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--label", f"{LABEL}.test=upstream",
           "--network", plan.network.outbound.name, *sum((["--network-alias", n] for n in names), []),
           "--cap-add", "NET_ADMIN", *env_args,
           "-v", f"{certs}:/certs:ro", UPSTREAM_IMAGE, "/certs/server.pem", "/certs/server-key.pem",
           env_extra=container_env)
    # The link-local metadata address, on a host the test owns, so probing it touches nothing real.
    docker("exec", name, "ip", "addr", "add", "169.254.169.254/32", "dev", "eth0")
    for _ in range(100):
        if '"ready"' in docker("logs", name).stdout:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the stand-in upstream {name} did not start")
    return docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name).stdout.strip()


def _bottle(env: Env, agent: str, before_start=None) -> Bottle:
    """Start `agent` with the fake upstream on its egress network. With before_start (given the bottle),
    the networks and the upstream come first, for a bundle that needs the upstream as it starts."""
    plan = env.plan(agent)
    bottle = Bottle(env=env, agent=agent, plan=plan, upstream=f"bottle-test-upstream-{agent}")
    try:
        if before_start:
            env.doit(f"networks:{agent}", f"agent={agent}")
            bottle.upstream_ip = start_upstream(env, plan, bottle.upstream, aliases=UPSTREAM_NAMES + ["sub.wild.test", "git.test"],
                                                container_env={"UPSTREAM_GIT_TOKEN": GIT_TOKEN})
            before_start(bottle)
        env.doit("start", f"agent={agent}", "command=true")
        if not before_start:
            bottle.upstream_ip = start_upstream(env, plan, bottle.upstream)
    except BaseException:
        _teardown(bottle)   # a fixture that fails never reaches its teardown
        raise
    return bottle


def _teardown(bottle: Bottle) -> None:
    docker("rm", "-f", bottle.upstream, check=False)
    bottle.env.doit("clean", f"agent={bottle.agent}", "purge=1", check=False)


@pytest.fixture(scope="session")
def bottle_a(bottle_env) -> Bottle:
    bottle = _bottle(bottle_env, "probe-a")
    yield bottle
    _teardown(bottle)


@pytest.fixture(scope="session")
def bottle_b(bottle_env) -> Bottle:
    bottle = _bottle(bottle_env, "probe-b")
    yield bottle
    _teardown(bottle)


class _Banner(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"host-listener\n")


@pytest.fixture(scope="session")
def host_listener():
    """A TCP listener on every host address: the docker gateways, the host's own IPs."""
    server = socketserver.ThreadingTCPServer(("0.0.0.0", 0), _Banner)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


GIT_TOKEN = "ghp_" + secrets.token_hex(18)      # a fake upstream credential, GitHub-token shaped
AGENT_GIT = "probe-git"
# A repo behind git-gate (the upstream container serves it); its last line is the repo's, so a
# test can add keys to it (push:).
GIT_REPO = """
git:
  user: {name: Probe Agent, email: probe@bottle.test}
  repos:
    - name: app
      url: https://git.test/git/app.git
      identity: {token_env: BOTTLE_TEST_GIT_TOKEN}
"""
# ... and a supervised `git push`.
GIT_AND_SUPERVISE = GIT_REPO + """\
supervise:
  tools: ["Bash(git push:*)"]
  timeout: 15
"""


def _seed_upstream(name: str) -> None:
    script = """
set -e
git init -q --bare -b main /srv/git/app.git
tmp=$(mktemp -d) && cd "$tmp" && git init -q -b main && git config user.email up@test && git config user.name up
echo hello > README.md && git add README.md && git commit -qm "initial commit"
git push -q /srv/git/app.git main
"""
    docker("exec", name, "sh", "-c", script)


@pytest.fixture(scope="session")
def bottle_git(bottle_env: Env):
    bottle_env.write_agent(AGENT_GIT, textwrap.dedent("""
        routes:
          - host: api.anthropic.com
            private_network: true
            token: {env: ANTHROPIC_API_KEY, header: x-api-key}
    """) + GIT_AND_SUPERVISE)
    extra = {"BOTTLE_TEST_GIT_TOKEN": GIT_TOKEN}
    env = Env(root=bottle_env.root, env={**bottle_env.env, **extra}, argv_log=bottle_env.argv_log)
    # git-gate mirrors the upstream when it comes up, so the upstream goes first.
    bottle = _bottle(env, AGENT_GIT, before_start=lambda b: _seed_upstream(b.upstream))
    yield bottle
    _teardown(bottle)


# ---- smolmachines: the same bottle with the guest in a (fake) smolvm microVM -----------------------

FAKE_SMOLVM = ROOT / "tests" / "fakes" / "smolvm"


def crane_or_skip() -> str:
    found = shutil.which("crane") or next((p for p in ("/var/cache/claude-bottle-ci/go-bin/crane",
                                                       str(Path.home() / "go/bin/crane")) if os.path.exists(p)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("crane is not installed; .ci/run installs it")
        pytest.skip("crane is not installed here (CI installs it)")
    return found


def real_smolvm_or_skip() -> str:
    """A real smolvm needs KVM (Linux) or HVF (macOS); none runs on the CI machines."""
    found = shutil.which("smolvm")
    if found is None or not (os.path.exists("/dev/kvm") or sys.platform == "darwin"):
        pytest.skip("no real smolvm with KVM or HVF on this machine: the smolmachines suite ran against "
                    "tests/fakes/smolvm; put smolvm >= 1.9 on PATH on a KVM/HVF host to run it for real")
    return found


def make_smol_env(base: Env, tmp_path_factory, flavour: str = "fake") -> Env:
    """An Env whose smolvm is the fake (behind an argv-logging shim) or, when present, the real one."""
    crane = crane_or_skip()
    smolvm = real_smolvm_or_skip() if flavour == "real" else f"{sys.executable} {FAKE_SMOLVM}"
    shim = base.root / f"shim/smolvm-{flavour}"
    argv_log = base.root / f"smolvm-{flavour}-argv.log"
    # One line per call: a multi-line argument (a python -c script) is folded onto it.
    shim.write_text(f'#!/bin/sh\nprintf "%s" "$*" | tr "\\n" " " >> "{argv_log}"\necho >> "{argv_log}"\nexec {smolvm} "$@"\n')
    shim.chmod(0o755)
    extra = {"BOTTLE_SMOLVM_BIN": str(shim), "BOTTLE_CRANE_BIN": crane, "CRANE": crane}
    if flavour == "fake":
        extra["SMOLVM_DATA_DIR"] = str(tmp_path_factory.mktemp("smolvm-data"))
    env = Env(root=base.root, env={**base.env, **extra}, argv_log=base.argv_log)
    env.smolvm_argv_log = argv_log
    return env


def smol_bottle(env: Env, agent: str, before_start=None) -> Bottle:
    """Start `agent` on the smolmachines backend; the fake attaches its guest to the bottle's bridge."""
    from bottle_tasks.backends.smolmachines import bridge_name as smol_bridge_name

    env.env["SMOLVM_FAKE_NETWORK"] = smol_bridge_name(agent)
    return _bottle(env, agent, before_start)
