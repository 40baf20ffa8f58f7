"""The plan: a frozen description of one bottle, computed from the agent spec and settings without I/O.

Every backend and task reads it; nothing else decides a name, an address, a path or an env var.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from bottle_tasks.errors import BottleError
from bottle_tasks.settings import Settings
from bottle_tasks.spec import AgentSpec, GitRepo, GitUser, Route, TokenSlot

LABEL = "dev.claude-bottle"
EGRESS_PORT = 8080
GIT_GATE_PORT = 8081
SUPERVISE_PORT = 8082
DNS_PORT = 53
PIPELOCK_LISTEN = "127.0.0.1:8888"
PIPELOCK_SCAN_LISTEN = "127.0.0.1:8889"
# Paths inside the guest.
GUEST_HOME = "/home/agent"
GUEST_USER = "agent"
GUEST_AGENT_UID = 1000          # images/agent/Dockerfile creates the agent with this uid
GUEST_WORKSPACE = "/workspace"
GUEST_CA_PATH = "/usr/local/share/ca-certificates/claude-bottle.crt"
GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_PROMPT_PATH = f"{GUEST_HOME}/.claude-bottle/prompt.md"
GUEST_SKILLS_DIR = f"{GUEST_HOME}/.claude/skills"
# supervise lives where the agent cannot edit it: root-owned files, and Claude Code's managed
# (policy) settings, which user and project settings cannot override.
GUEST_SUPERVISE_DIR = "/etc/claude-bottle"
GUEST_SUPERVISE_CONFIG = f"{GUEST_SUPERVISE_DIR}/supervise.json"
GUEST_SUPERVISE_HOOK = f"{GUEST_SUPERVISE_DIR}/supervise_hook.py"
GUEST_CLAUDE_MANAGED_SETTINGS = "/etc/claude-code/managed-settings.json"
# Paths inside the bundle (docs/bundle-contract.md).
BUNDLE_CONFIG_DIR = "/etc/bottle"
BUNDLE_GIT_DIR = "/var/lib/bottle/git"
BUNDLE_SUPERVISE_DIR = "/var/lib/bottle/supervise"
# Never route these around the proxy; the guest's NO_PROXY is empty on purpose.
RESERVED_SUBNETS = (ipaddress.ip_network("192.168.17.0/24"),)
# smolmachines: the guest's own address on smolvm's virtio-net gateway (reference/smolvm-1.9.md §6).
SMOL_GUEST_IP = "100.96.0.2"


@dataclass(frozen=True)
class Mount:
    source: str      # host path or volume name
    target: str
    readonly: bool = True
    volume: bool = False

    def docker_arg(self) -> str:
        kind = "volume" if self.volume else "bind"
        return f"type={kind},source={self.source},target={self.target}" + (",readonly" if self.readonly else "")


@dataclass(frozen=True)
class Bridge:
    """One docker network the bottle owns."""
    name: str
    subnet: str
    gateway: str
    internal: bool
    ip_range: str | None = None        # where docker hands out dynamic addresses (never the pinned bundle)


@dataclass(frozen=True)
class NetworkPlan:
    """docker: an --internal network (guest, bundle) plus an egress network (bundle only).
    smolmachines: one bridge the bundle sits on at .2; the microVM reaches it through the host, so
    the internal_* and egress_* fields both name that bridge."""
    internal_name: str
    internal_subnet: str
    internal_gateway: str
    bundle_ip: str
    guest_ip: str
    egress_name: str
    egress_subnet: str
    egress_gateway: str
    bridges: tuple[Bridge, ...]
    # Said, never compared: the wording differs between the run that moves a subnet and later ones, and
    # it must not change a container's fingerprint.
    note: str = field(default="", compare=False, repr=False)      # why the subnet is not the slug's first choice
    problem: str = field(default="", compare=False, repr=False)   # why no subnet fits; preflight raises it


@dataclass(frozen=True)
class ImagePlan:
    kind: str                 # "agent" or "bundle"
    tag: str
    dockerfile_dir: Path      # the checked-in Dockerfile and its files
    context_dir: Path         # staged build context (adds extra CA, code, binaries)
    iid_file: Path            # `docker build --iidfile`: the digest passed to later tasks
    build_args: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class BundlePlan:
    container: str
    daemons: tuple[str, ...]
    env: tuple[tuple[str, str], ...]          # non-secret
    secret_env_names: tuple[str, ...]          # passed by name; values come from the host env
    mounts: tuple[Mount, ...]
    egress_url: str


@dataclass(frozen=True)
class GuestPlan:
    container: str
    env: tuple[tuple[str, str], ...]
    mounts: tuple[Mount, ...]
    workspace_volume: str | None
    command: tuple[str, ...]
    cpus: float | None
    memory: str | None
    pids: int


@dataclass(frozen=True)
class SecretEnv:
    name: str          # host environment variable, passed to the bundle by name
    key: str           # where the agent file asks for it, for error messages


@dataclass(frozen=True)
class GitPlan:
    user: GitUser
    repos: tuple[GitRepo, ...]          # branches filled with the default when the file gives none
    config_file: Path                    # rendered git-gate.yaml
    mirrors_dir: Path                    # host state dir: mirrors, audit log; kept by clean
    url: str                             # http://<bundle-ip>:8081 as the guest sees it


@dataclass(frozen=True)
class SupervisePlan:
    tools: tuple[str, ...]
    timeout: int
    config_file: Path                    # rendered supervise.yaml (bundle)
    guest_config_file: Path              # rendered supervise.json (guest hook)
    claude_settings_file: Path           # rendered managed-settings.json (registers the hook)
    state_dir: Path                      # host: requests, decisions, history; kept by clean
    url: str


@dataclass(frozen=True)
class SmolPlan:
    """The smolmachines image pipeline: docker save -> throwaway registry -> crane push -> smolvm pack."""
    registry_image: ImagePlan
    registry_container: str
    registry_port_file: Path           # the host port docker picked, for this run only
    repository: str                    # <registry>/<repository>:<digest tag>
    tarball_dir: Path                  # per-digest docker save output; removed once pushed
    packs_dir: Path                    # <packs_dir>/<digest16> (+ .smolmachine), cached across runs
    smolvm: str
    crane: str


@dataclass(frozen=True)
class Plan:
    agent: str
    slug: str
    spec_path: Path
    backend: str
    labels: tuple[tuple[str, str], ...]
    state_dir: Path           # per bottle, kept by clean: CA, rendered config, prompt
    cache_dir: Path           # per bottle, transient
    ca_cert: Path
    ca_key: Path
    routes_file: Path
    pipelock_file: Path
    prompt_file: Path
    guest_env_file: Path
    upstream_ca: Path | None
    pipelock_enabled: bool
    network: NetworkPlan
    agent_image: ImagePlan
    bundle_image: ImagePlan
    bundle: BundlePlan
    guest: GuestPlan
    routes: tuple[Route, ...]
    token_slots: tuple[TokenSlot, ...]
    secret_envs: tuple[SecretEnv, ...]
    prompt: str
    skills: tuple[Path, ...]
    git: GitPlan | None
    supervise: SupervisePlan | None
    smol: SmolPlan | None

    @property
    def guest_ports(self) -> tuple[int, ...]:
        """TCP ports of the bundle the guest may reach (the firewall admits these and DNS)."""
        return (EGRESS_PORT, *((GIT_GATE_PORT,) if self.git else ()), *((SUPERVISE_PORT,) if self.supervise else ()))

    def label_args(self, role: str) -> list[str]:
        args = []
        for key, value in (*self.labels, (f"{LABEL}.role", role)):
            args += ["--label", f"{key}={value}"]
        return args

    @property
    def slug_label(self) -> str:
        return f"{LABEL}.slug={self.slug}"


def slug_for(agent: str) -> str:
    """DNS-safe and stable: agent names are already restricted to [a-z0-9-] (spec.AGENT_NAME)."""
    return agent


def bottle_subnet(slug: str, pool: str, explicit: str | None = None) -> ipaddress.IPv4Network:
    """A /23 for the bottle: derived from the slug hash, or the agent file's network.subnet."""
    if explicit:
        try:
            return ipaddress.ip_network(explicit, strict=True)
        except ValueError:
            fixed = ipaddress.ip_network(explicit, strict=False)
            raise BottleError(f"network.subnet {explicit!r} has host bits set; write {fixed}") from None
    pool_net = ipaddress.ip_network(pool)
    if pool_net.prefixlen > 23:
        raise BottleError(f"BOTTLE_SUBNET_POOL {pool} is smaller than a /23; use a /16 such as 10.243.0.0/16")
    blocks = list(pool_net.subnets(new_prefix=23))
    start = int.from_bytes(hashlib.sha256(slug.encode()).digest()[:4], "big") % len(blocks)
    for offset in range(len(blocks)):
        candidate = blocks[(start + offset) % len(blocks)]
        if not any(candidate.overlaps(r) for r in RESERVED_SUBNETS):
            return candidate
    raise BottleError(f"BOTTLE_SUBNET_POOL {pool} has no usable /23")


def _network(slug: str, subnet: ipaddress.IPv4Network) -> NetworkPlan:
    internal, egress = subnet.subnets(new_prefix=24)
    names = (f"bottle-{slug}-internal", f"bottle-{slug}-egress")
    gateways = (str(internal.network_address + 1), str(egress.network_address + 1))
    return NetworkPlan(
        internal_name=names[0],
        internal_subnet=str(internal),
        internal_gateway=gateways[0],
        bundle_ip=str(internal.network_address + 2),
        guest_ip=str(internal.network_address + 3),
        egress_name=names[1],
        egress_subnet=str(egress),
        egress_gateway=gateways[1],
        bridges=(Bridge(names[0], str(internal), gateways[0], internal=True),
                 Bridge(names[1], str(egress), gateways[1], internal=False)),
    )


def smol_bridge_subnet(slug: str, taken: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                       current: str | None = None) -> tuple[ipaddress.IPv4Network, str]:
    """The smolmachines bridge: 192.168.<hash>.0/24 from the slug, skipping the reserved .17. A subnet
    in use moves to the next candidate, deterministically; the note says so (empty when nothing moved).
    The bridge this bottle already has keeps its subnet while nothing else overlaps it."""
    taken = [t for t in taken if t.version == 4]
    if current and not any(ipaddress.ip_network(current).overlaps(t) for t in taken):
        first = _smol_candidates(slug)[0]
        chosen = ipaddress.ip_network(current)
        return chosen, "" if chosen == first else f"bottle {slug!r} keeps its bridge subnet {chosen} (first choice {first} was in use when it was made)"
    candidates = _smol_candidates(slug)
    for candidate in candidates:
        if not any(candidate.overlaps(t) for t in taken):
            note = "" if candidate == candidates[0] else (
                f"subnet {candidates[0]} is in use; bottle {slug!r} uses {candidate} instead")
            return candidate, note
    raise BottleError(f"no free /24 in 192.168.0.0/16 for bottle {slug!r}; remove unused docker networks")


def _smol_candidates(slug: str) -> list[ipaddress.IPv4Network]:
    start = int.from_bytes(hashlib.sha256(slug.encode()).digest()[:4], "big") % 254 + 1
    octets = ((start - 1 + offset) % 254 + 1 for offset in range(254))
    return [ipaddress.ip_network(f"192.168.{o}.0/24") for o in octets
            if not any(ipaddress.ip_network(f"192.168.{o}.0/24").overlaps(r) for r in RESERVED_SUBNETS)]


def smol_bridge_name(slug: str) -> str:
    return f"bottle-{slug}-bridge"


def _smol_network(slug: str, subnet: ipaddress.IPv4Network, note: str, problem: str = "") -> NetworkPlan:
    name = smol_bridge_name(slug)
    gateway, bundle_ip = str(subnet.network_address + 1), str(subnet.network_address + 2)
    # Dynamic addresses come from the upper half, so nothing else ever takes the bundle's .2.
    ip_range = str(list(subnet.subnets(new_prefix=subnet.prefixlen + 1))[1])
    return NetworkPlan(
        internal_name=name, internal_subnet=str(subnet), internal_gateway=gateway,
        bundle_ip=bundle_ip, guest_ip=SMOL_GUEST_IP,
        egress_name=name, egress_subnet=str(subnet), egress_gateway=gateway,
        bridges=(Bridge(name, str(subnet), gateway, internal=False, ip_range=ip_range),),
        note=note,
        problem=problem,
    )


def _guest_env(spec: AgentSpec, proxy_url: str) -> tuple[tuple[str, str], ...]:
    env: dict[str, str] = dict(spec.env)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = proxy_url
    env["NO_PROXY"] = env["no_proxy"] = ""
    # node, python, curl and git read different variables; all point at the system bundle,
    # which holds the bottle CA once provisioning has run update-ca-certificates.
    env["NODE_EXTRA_CA_CERTS"] = GUEST_CA_PATH
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"):
        env[name] = GUEST_CA_BUNDLE
    # Claude Code's telemetry and update checks would only meet 403s.
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    env["DISABLE_AUTOUPDATER"] = "1"
    for slot in spec.token_slots:
        env[slot.env] = slot.placeholder
    return tuple(sorted(env.items()))


def agent_command(argv: tuple[str, ...], prompt: str) -> tuple[str, ...]:
    """claude gets the agent file's prompt appended; any other command runs as written."""
    if argv and Path(argv[0]).name == "claude" and prompt:
        return (*argv, "--append-system-prompt-file", GUEST_PROMPT_PATH)
    return argv


def backend_of(spec: AgentSpec, settings: Settings) -> str:
    return settings.backend or spec.backend or "docker"


def make_plan(spec: AgentSpec, settings: Settings, host_subnets: Iterable[ipaddress.IPv4Network] = (),
              current_bridge: str | None = None) -> Plan:
    """host_subnets and current_bridge matter to smolmachines only: the networks and routes already on
    the host, and the subnet of the bridge this bottle already has (the caller gathers both)."""
    slug = slug_for(spec.name)
    backend = backend_of(spec, settings)
    state = settings.state_dir / slug
    cache = settings.cache_dir / slug
    if backend == "smolmachines":
        if spec.subnet:
            explicit = bottle_subnet(slug, settings.subnet_pool, spec.subnet)
            if explicit.prefixlen > 24:
                raise BottleError(f"{spec.path}: network.subnet {spec.subnet} is smaller than a /24; the smolmachines "
                                  "bridge needs a /24 (e.g. 192.168.77.0/24)")
            network = _smol_network(slug, next(explicit.subnets(new_prefix=24)), "")
        else:
            try:
                network = _smol_network(slug, *smol_bridge_subnet(slug, host_subnets, current_bridge))
            except BottleError as exc:   # the plan still loads (clean, list); preflight refuses to start
                network = _smol_network(slug, _smol_candidates(slug)[0], "", problem=str(exc))
    else:
        network = _network(slug, bottle_subnet(slug, settings.subnet_pool, spec.subnet))
    pipelock = settings.pipelock_bin is not None
    labels = ((f"{LABEL}.slug", slug), (f"{LABEL}.agent", spec.name), (f"{LABEL}.state", str(state)))
    images_cache = settings.cache_dir / "images"
    common_args = (("BASE_IMAGE", settings.base_image),)
    agent_image = ImagePlan(
        kind="agent",
        tag=f"{settings.image_prefix}/agent:{slug}",
        dockerfile_dir=settings.images_dir / "agent",
        context_dir=cache / "agent-context",
        iid_file=cache / "agent.iid",
        # smolvm's exec has no --user: the smolmachines image defaults to root, and the host drops to
        # the agent user per command (backends/smolmachines.py).
        build_args=(*common_args, ("CLAUDE_CODE_VERSION", settings.claude_code_version),
                    *((("EXEC_USER", "root"),) if backend == "smolmachines" else ())),
    )
    bundle_tag = f"{settings.image_prefix}/bundle:latest"
    bundle_key = bundle_tag.replace("/", "_").replace(":", "_")   # one digest file per tag
    bundle_image = ImagePlan(
        kind="bundle",
        tag=bundle_tag,
        dockerfile_dir=settings.images_dir / "bundle",
        context_dir=images_cache / f"{bundle_key}-context",
        iid_file=images_cache / f"{bundle_key}.iid",
        build_args=common_args,
    )
    config = state / "config"
    upstream_ca = settings.upstream_ca_certs
    mounts = [
        Mount(str(config / "routes.yaml"), f"{BUNDLE_CONFIG_DIR}/routes.yaml"),
        Mount(str(state / "ca"), f"{BUNDLE_CONFIG_DIR}/ca"),
    ]
    daemons = ["egress", "dns"]
    if pipelock:
        mounts.append(Mount(str(config / "pipelock.yaml"), f"{BUNDLE_CONFIG_DIR}/pipelock.yaml"))
        daemons.insert(1, "pipelock")
    if upstream_ca:
        mounts.append(Mount(str(upstream_ca), f"{BUNDLE_CONFIG_DIR}/upstream-ca.pem"))
    git = _git_plan(spec, state, config, network) if spec.git_repos else None
    if git:
        daemons.append("git-gate")
        mounts.append(Mount(str(git.config_file), f"{BUNDLE_CONFIG_DIR}/git-gate.yaml"))
        mounts.append(Mount(str(git.mirrors_dir), BUNDLE_GIT_DIR, readonly=False))
        mounts += [Mount(str(r.ssh_key), f"{BUNDLE_CONFIG_DIR}/git/{r.name}/ssh_key") for r in git.repos if r.ssh_key]
    supervise = None
    if spec.supervise:
        supervise = SupervisePlan(
            tools=spec.supervise.tools, timeout=spec.supervise.timeout,
            config_file=config / "supervise.yaml", guest_config_file=config / "supervise.json",
            claude_settings_file=config / "claude-managed-settings.json",
            state_dir=state / "supervise", url=f"http://{network.bundle_ip}:{SUPERVISE_PORT}")
        daemons.append("supervise")
        mounts.append(Mount(str(supervise.config_file), f"{BUNDLE_CONFIG_DIR}/supervise.yaml"))
        mounts.append(Mount(str(supervise.state_dir), BUNDLE_SUPERVISE_DIR, readonly=False))
    secret_envs = tuple(
        [SecretEnv(r.token.env, f"routes[{i}].token.env") for i, r in enumerate(spec.routes) if r.token]
        + [SecretEnv(r.token_env, f"git.repos[{i}].identity.token_env") for i, r in enumerate(spec.git_repos) if r.token_env])
    egress_url = f"http://{network.bundle_ip}:{EGRESS_PORT}"
    bundle = BundlePlan(
        container=f"bottle-{slug}-bundle",
        daemons=tuple(daemons),
        env=(("BUNDLE_DAEMONS", ",".join(daemons)), ("BOTTLE_DNS_LISTEN", f"{network.bundle_ip}:{DNS_PORT}")),
        secret_env_names=tuple(sorted({s.name for s in secret_envs})),
        mounts=tuple(mounts),
        egress_url=egress_url,
    )
    # A microVM mounts host directories only, so its default workspace is a dir in the state dir.
    workspace_host = spec.workspace_host_path or (state / "workspace" if backend == "smolmachines" else None)
    workspace_volume = None if workspace_host else f"bottle-{slug}-workspace"
    guest_mounts = (
        Mount(str(workspace_host), GUEST_WORKSPACE, readonly=False) if workspace_host
        else Mount(workspace_volume, GUEST_WORKSPACE, readonly=False, volume=True),
    )
    guest = GuestPlan(
        container=f"bottle-{slug}-guest",
        env=_guest_env(spec, egress_url),
        mounts=guest_mounts,
        workspace_volume=workspace_volume,
        command=agent_command(spec.command, spec.prompt),
        cpus=spec.resources.cpus,
        memory=spec.resources.memory,
        pids=spec.resources.pids,
    )
    return Plan(
        agent=spec.name,
        slug=slug,
        spec_path=spec.path,
        backend=backend,
        labels=labels,
        state_dir=state,
        cache_dir=cache,
        ca_cert=state / "ca" / "ca.pem",
        ca_key=state / "ca" / "ca-key.pem",
        routes_file=config / "routes.yaml",
        pipelock_file=config / "pipelock.yaml",
        prompt_file=config / "prompt.md",
        guest_env_file=config / "guest.env",
        upstream_ca=upstream_ca,
        pipelock_enabled=pipelock,
        network=network,
        agent_image=agent_image,
        bundle_image=bundle_image,
        bundle=bundle,
        guest=guest,
        routes=spec.routes,
        token_slots=spec.token_slots,
        secret_envs=secret_envs,
        prompt=spec.prompt,
        skills=spec.skills,
        git=git,
        supervise=supervise,
        smol=_smol_plan(slug, settings, cache, common_args) if backend == "smolmachines" else None,
    )


def _smol_plan(slug: str, settings: Settings, cache: Path, build_args: tuple[tuple[str, str], ...]) -> SmolPlan:
    images_cache = settings.cache_dir / "images"
    registry = ImagePlan(
        kind="registry",
        tag=f"{settings.image_prefix}/registry:latest",
        dockerfile_dir=settings.images_dir / "registry",
        context_dir=images_cache / "registry-context",
        iid_file=images_cache / f"{settings.image_prefix.replace('/', '_')}_registry.iid",
        build_args=build_args,
    )
    return SmolPlan(
        registry_image=registry,
        registry_container=f"bottle-{slug}-registry",
        registry_port_file=cache / "registry.port",
        repository=f"claude-bottle/agent-{slug}",
        tarball_dir=cache / "image-tarballs",
        packs_dir=settings.cache_dir / "smolmachines",
        smolvm=settings.smolvm_bin,
        crane=settings.crane_bin,
    )


def _git_plan(spec: AgentSpec, state: Path, config: Path, network: NetworkPlan) -> GitPlan:
    default_branches = (f"bottle/{spec.name}/*",)
    repos = tuple(replace(r, branches=r.branches or default_branches) for r in spec.git_repos)
    return GitPlan(user=spec.git_user, repos=repos, config_file=config / "git-gate.yaml",
                   mirrors_dir=state / "git", url=f"http://{network.bundle_ip}:{GIT_GATE_PORT}")
