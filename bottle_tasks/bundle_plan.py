"""What the sidecar bundle runs and reads, as one list: a record per daemon, each with its config files.

Everything about the bundle's inputs derives from these records and nowhere else: the render task
writes every file that has a template, doit's targets are those files, the bundle's read-only mounts
are every file, its read-write mounts every state dir, its fingerprint hashes the content of every
file, init starts the daemons of `daemons.json` (itself one of the files, rendered from the records),
the guest's firewall admits each daemon's guest ports, and docs/bundle-contract.md's table is
generated from them (`python -m bottle_tasks.contract_doc`).

Adding a daemon: write its module under bottle_tasks/sidecars/, add one builder below and its name to
DAEMON_BUILDERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Paths inside the bundle.
CONFIG_DIR = "/etc/bottle"
CA_DIR = f"{CONFIG_DIR}/ca"
UPSTREAM_CA = f"{CONFIG_DIR}/upstream-ca.pem"
DAEMON_TABLE = f"{CONFIG_DIR}/daemons.json"
# The secret values, written into the container (0600, root) before it starts; init hands each daemon
# only the variables its record names, so they are in no container's Config.Env.
SECRETS_FILE = "/var/lib/bottle/secrets.json"
GIT_DIR = "/var/lib/bottle/git"              # this bottle's git-gate: audit.jsonl, spools, known_hosts
GIT_MIRRORS_DIR = "/var/lib/bottle/mirrors"  # the bare mirrors, shared by every bottle of the agent
SUPERVISE_DIR = "/var/lib/bottle/supervise"
AUDIT_DIR = "/var/lib/bottle/audit"
POLICY_DIR = "/var/lib/bottle/policy"
# Ports.
EGRESS_PORT = 8080
GIT_GATE_PORT = 8081
SUPERVISE_PORT = 8082
DNS_PORT = 53
PIPELOCK_LISTEN = "127.0.0.1:8888"
PIPELOCK_SCAN_LISTEN = "127.0.0.1:8889"
PIPELOCK_SCAN_URL = f"http://{PIPELOCK_SCAN_LISTEN}/api/v1/scan"


@dataclass(frozen=True)
class ConfigFile:
    """One file (or directory) a reading side sees: rendered from a template, or a host file used as is."""
    host_path: Path
    target: str                   # where the reader sees it: a path in the bundle (or the guest)
    template: str | None = None   # bottle_tasks/templates/<template>; None: an existing host file or directory
    mode: int = 0o644
    origin: str = ""              # for a file used as is: the setting or key it comes from

    @property
    def rendered(self) -> bool:
        return self.template is not None


@dataclass(frozen=True)
class StateDir:
    """A host directory the bundle writes (or, readonly, one only the host writes and the bundle reads
    live); it holds work, so clean keeps it. Not in the bundle's fingerprint: its content changes
    while the bundle runs."""
    host_path: Path
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class BundleDaemon:
    name: str
    command: tuple[str, ...]
    probe: tuple[str, str] | None = None             # ("tcp"|"http"|"dns", target); None: ready once running
    guest_ports: tuple[tuple[str, int], ...] = ()    # (protocol, port) the guest may reach
    files: tuple[ConfigFile, ...] = ()               # its own config files
    state: tuple[StateDir, ...] = ()
    secrets: tuple[str, ...] = ()                    # the secret variables it (and only it) gets
    audit_sink: bool = False                         # reads the audit pipe (init gives every other daemon its write end)
    audit_stdout: str = ""                           # init reads its log for audit records ("pipelock")
    # Its share of the bundle's limits (docker --memory, --pids-limit), generous for a busy agent:
    # a daemon the guest floods runs into the bundle's ceiling, not the host's.
    memory_mib: int = 64
    pids: int = 32


@dataclass(frozen=True)
class BundleInputs:
    """What the builders need from the rest of the plan (plan.make_plan fills it)."""
    bundle_ip: str
    config_dir: Path                      # host: where rendered files go
    pipelock: bool
    upstream_ca: Path | None
    route_secrets: tuple[str, ...] = ()   # token slots' variables (egress fills them)
    git_secrets: tuple[str, ...] = ()     # git token identities' variables (git-gate forwards with them)
    git_config: Path | None = None        # host: git-gate.yaml; None: the agent uses no git
    git_state: Path | None = None         # host: this bottle's git-gate state (audit log, spools), kept by clean
    git_mirrors: Path | None = None       # host: the agent's bare mirrors, shared by its bottles, kept by clean
    git_approvals: Path | None = None     # host: the supervise state dir, when git-gate holds pushes for a human
    ssh_keys: tuple[ConfigFile, ...] = ()  # repos' SSH identities, mounted as they are
    supervise_config: Path | None = None  # host: supervise.yaml; None: nothing is supervised
    supervise_state: Path | None = None   # host: requests, decisions, history
    audit_dir: Path | None = None         # host: the audit stream, kept by clean
    policy_dir: Path | None = None        # host: the policy overlay (routes approved for good), read live by egress
    unknown_host_approvals: Path | None = None  # host: the supervise queue, when egress holds unknown hosts (ask)


def _python(module: str, *args: str) -> tuple[str, ...]:
    return ("python", "-m", f"bottle_tasks.sidecars.{module}", *args)


def audit(p: BundleInputs) -> BundleDaemon | None:
    if p.audit_dir is None:
        return None
    return BundleDaemon("audit", _python("audit", "--dir", AUDIT_DIR), state=(StateDir(p.audit_dir, AUDIT_DIR),),
                        audit_sink=True, memory_mib=32, pids=8)


def egress(p: BundleInputs) -> BundleDaemon:
    routes = ConfigFile(p.config_dir / "routes.yaml", f"{CONFIG_DIR}/routes.yaml", "routes.yaml.j2")
    return BundleDaemon(
        "egress",
        _python("egress", "--routes", routes.target, "--ca-dir", CA_DIR, "--upstream-ca", UPSTREAM_CA,
                "--pipelock-config", f"{CONFIG_DIR}/pipelock.yaml"),
        probe=("tcp", f"{p.bundle_ip}:{EGRESS_PORT}"),
        guest_ports=(("tcp", EGRESS_PORT),),
        files=(routes,),
        state=(*((StateDir(p.policy_dir, POLICY_DIR, readonly=True),) if p.policy_dir else ()),
               *((StateDir(p.unknown_host_approvals, SUPERVISE_DIR),) if p.unknown_host_approvals else ())),
        secrets=p.route_secrets,
        memory_mib=512,             # mitmproxy, bodies it scans, one thread per scan
        pids=96,
    )


def pipelock(p: BundleInputs) -> BundleDaemon | None:
    if not p.pipelock:
        return None
    # 0600: it holds the scan API's bearer token.
    config = ConfigFile(p.config_dir / "pipelock.yaml", f"{CONFIG_DIR}/pipelock.yaml", "pipelock.yaml.j2", 0o600)
    return BundleDaemon("pipelock", ("pipelock", "run", "--config", config.target),
                        probe=("http", f"http://{PIPELOCK_LISTEN}/health"), files=(config,), memory_mib=256, pids=64,
                        audit_stdout="pipelock")


def dns(p: BundleInputs) -> BundleDaemon:
    listen = f"{p.bundle_ip}:{DNS_PORT}"
    return BundleDaemon("dns", _python("dnssink", "--listen", listen), probe=("dns", listen),
                        guest_ports=(("udp", DNS_PORT), ("tcp", DNS_PORT)), memory_mib=48, pids=80)


def git_gate(p: BundleInputs) -> BundleDaemon | None:
    if p.git_config is None or p.git_mirrors is None or p.git_state is None:
        return None
    config = ConfigFile(p.git_config, f"{CONFIG_DIR}/git-gate.yaml", "git-gate.yaml.j2")
    return BundleDaemon(
        "git-gate",
        _python("gitgate", "--config", config.target, "--pipelock-config", f"{CONFIG_DIR}/pipelock.yaml",
                "--upstream-ca", UPSTREAM_CA),
        probe=("tcp", f"{p.bundle_ip}:{GIT_GATE_PORT}"),
        guest_ports=(("tcp", GIT_GATE_PORT),),
        files=(config, *p.ssh_keys),
        state=(StateDir(p.git_state, GIT_DIR), StateDir(p.git_mirrors, GIT_MIRRORS_DIR),
               *((StateDir(p.git_approvals, SUPERVISE_DIR),) if p.git_approvals else ())),
        secrets=p.git_secrets,
        memory_mib=512,             # git pack-objects and index-pack, per connection
        pids=320,                   # 64 connections, each with http-backend and its git children
    )


def supervise(p: BundleInputs) -> BundleDaemon | None:
    if p.supervise_config is None or p.supervise_state is None:
        return None
    config = ConfigFile(p.supervise_config, f"{CONFIG_DIR}/supervise.yaml", "supervise.yaml.j2")
    return BundleDaemon(
        "supervise", _python("supervise", "--config", config.target),
        probe=("tcp", f"{p.bundle_ip}:{SUPERVISE_PORT}"),
        guest_ports=(("tcp", SUPERVISE_PORT),),
        files=(config,),
        state=(StateDir(p.supervise_state, SUPERVISE_DIR),),
        memory_mib=64,
        pids=160,                   # a thread per long poll
    )


# In start order; BUNDLE_DAEMONS and daemons.json keep it.
DAEMON_BUILDERS: tuple[Callable[[BundleInputs], BundleDaemon | None], ...] = (
    audit, egress, pipelock, dns, git_gate, supervise)


def bundle_daemons(p: BundleInputs) -> tuple[BundleDaemon, ...]:
    return tuple(d for d in (build(p) for build in DAEMON_BUILDERS) if d is not None)


# init itself, its output pumps, the health check docker execs every second.
BASE_MEMORY_MIB = 64
BASE_PIDS = 32


def bundle_limits(daemons: tuple[BundleDaemon, ...]) -> tuple[int, int]:
    """(memory in MiB, pids) for the bundle: the daemons' shares plus init's."""
    return (BASE_MEMORY_MIB + sum(d.memory_mib for d in daemons), BASE_PIDS + sum(d.pids for d in daemons))


def shared_files(p: BundleInputs, ca_dir: Path) -> tuple[ConfigFile, ...]:
    """Files more than one daemon reads: the daemon table, the bottle CA, extra upstream CAs."""
    files = [ConfigFile(p.config_dir / "daemons.json", DAEMON_TABLE, "bundle-daemons.json.j2"),
             ConfigFile(ca_dir, CA_DIR, origin="the ca task: ca.pem, and ca-key.pem (0600)")]
    if p.upstream_ca:
        files.append(ConfigFile(p.upstream_ca, UPSTREAM_CA, origin="BOTTLE_UPSTREAM_CA_CERTS"))
    return tuple(files)
