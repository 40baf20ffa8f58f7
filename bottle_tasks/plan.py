"""The plan: a frozen description of one bottle, computed from the agent spec and settings without I/O.

Every backend and task reads it; nothing else decides a name, an address, a path or an env var.
What differs per backend (the network, the image pipeline, the workspace) comes from the backend's
planning hooks (backends/base.py), which are pure too; what they need to know about the host (the
subnets in use) is gathered before planning and passed in as `host_facts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bottle_tasks.bundle_plan import (
    DAEMON_TABLE, EGRESS_PORT, SECRETS_FILE, GIT_GATE_PORT, SUPERVISE_PORT, BundleDaemon, BundleInputs, ConfigFile, StateDir,
    bundle_daemons, bundle_limits, shared_files,
)
from bottle_tasks.contract import DEFAULT_MAX_PUSH_BYTES, GitRepo, Route, SupervisePolicy, TokenSlot, namespace_root
from bottle_tasks.errors import BottleError
from bottle_tasks.instances import Bottle, bottle_of
from bottle_tasks.labels import AGENT_LABEL, INSTANCE_LABEL, STATE_LABEL, SLUG_LABEL, label_args
from bottle_tasks.settings import Settings
from bottle_tasks.spec import AgentSpec, GitUser

# Paths inside the guest.
GUEST_HOME = "/home/agent"
GUEST_USER = "agent"
GUEST_AGENT_UID = 1000          # bottle_tasks/images/agent/Dockerfile creates the agent with this uid
GUEST_WORKSPACE = "/workspace"
GUEST_CA_PATH = "/usr/local/share/ca-certificates/claude-bottle.crt"
GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_PROMPT_PATH = f"{GUEST_HOME}/.claude-bottle/prompt.md"
GUEST_SKILLS_DIR = f"{GUEST_HOME}/.claude/skills"
# supervise lives where the agent cannot edit it: root-owned files, and Claude Code's managed
# (policy) settings, which user and project settings cannot override.
GUEST_SUPERVISE_DIR = "/etc/claude-bottle"
# Skills are stored root-owned under it; the agent's skills dir holds links to them.
GUEST_SKILLS_STORE = f"{GUEST_SUPERVISE_DIR}/skills"
GUEST_SUPERVISE_CONFIG = f"{GUEST_SUPERVISE_DIR}/supervise.json"
GUEST_SUPERVISE_HOOK = f"{GUEST_SUPERVISE_DIR}/supervise_hook.py"
GUEST_CLAUDE_MANAGED_SETTINGS = "/etc/claude-code/managed-settings.json"
# Where git-gate sees a repo's SSH key.
BUNDLE_SSH_KEY = "/etc/bottle/git/{repo}/ssh_key"


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
    """The bottle's docker networks. The bundle sits on the first at bundle_ip, where the guest meets it,
    and joins the others; the last is where it reaches out. docker: an --internal network plus an egress
    network. smolmachines: one bridge, both guest side and outbound."""
    bridges: tuple[Bridge, ...]
    bundle_ip: str
    guest_ip: str
    # Said, never compared: the wording differs between the run that moves a subnet and later ones, and
    # it must not change a container's fingerprint.
    note: str = field(default="", compare=False, repr=False)      # why the subnet is not the slug's first choice
    problem: str = field(default="", compare=False, repr=False)   # why no subnet fits; preflight raises it

    @property
    def guest_side(self) -> Bridge:
        return self.bridges[0]

    @property
    def outbound(self) -> Bridge:
        return self.bridges[-1]


@dataclass(frozen=True)
class ImagePlan:
    kind: str                 # "agent", "bundle" or "registry"
    tag: str
    dockerfile_dir: Path      # the checked-in Dockerfile and its files
    context_dir: Path         # staged build context (adds extra CA, code, binaries)
    iid_file: Path            # `docker build --iidfile`: the digest passed to later tasks
    build_args: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class BundlePlan:
    name: str                                  # the bundle container
    daemons: tuple[BundleDaemon, ...]          # bundle_plan.py: the one list
    shared_files: tuple[ConfigFile, ...]       # read by several daemons (CA, daemon table)
    env: tuple[tuple[str, str], ...]           # non-secret
    memory_mib: int                            # docker --memory (and --memory-swap: no swap on top)
    pids: int                                  # docker --pids-limit
    secret_env_names: tuple[str, ...]          # host variables whose values the bundle's secrets file holds
    egress_url: str

    @property
    def daemon_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.daemons)

    @property
    def files(self) -> tuple[ConfigFile, ...]:
        """Every file the bundle reads, mounted read-only."""
        return (*self.shared_files, *(f for d in self.daemons for f in d.files))

    @property
    def state_dirs(self) -> tuple[StateDir, ...]:
        return tuple(dict.fromkeys(s for d in self.daemons for s in d.state))  # one mount for a dir daemons share

    @property
    def mounts(self) -> tuple[Mount, ...]:
        return (*(Mount(str(f.host_path), f.target) for f in self.files),
                *(Mount(str(s.host_path), s.target, readonly=s.readonly) for s in self.state_dirs))

    @property
    def guest_ports(self) -> tuple[tuple[str, int], ...]:
        """(protocol, port) of the bundle the guest may reach; the guest's fence admits exactly these."""
        return tuple(port for d in self.daemons for port in d.guest_ports)


@dataclass(frozen=True)
class GuestPlan:
    name: str                                  # the guest's container or machine name
    env: tuple[tuple[str, str], ...]
    env_file: ConfigFile                       # the same env as a file (docker --env-file)
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
    destination: str   # where its value goes (a route's host, a repo's upstream), for start to say


@dataclass(frozen=True)
class GitPlan:
    user: GitUser
    repos: tuple[GitRepo, ...]          # as git-gate sees them: default branches filled, ssh keys at their bundle path
    ssh_key_sources: tuple[str, ...]    # per repo: the host key file ("" for none)
    config_file: Path                    # rendered git-gate.yaml
    gate_dir: Path                       # host: this bottle's git-gate state (its repos, audit log, spools); kept by clean
    mirrors_dir: Path                    # host: the objects fetched from the upstreams, shared by the agent's bottles; kept by clean
    url: str                             # http://<bundle-ip>:8081 as the guest sees it
    max_push_bytes: int = DEFAULT_MAX_PUSH_BYTES   # receive.maxInputSize of every repo
    approval_timeout: int | None = None  # seconds a push held for a human waits (supervise.timeout); None: none is held


@dataclass(frozen=True)
class SupervisePlan:
    policy: SupervisePolicy
    hook_matcher: str                    # Claude Code's PreToolUse matcher: the tools the rules name
    config_file: Path                    # rendered supervise.yaml (bundle)
    guest_config: ConfigFile             # rendered supervise.json (the guest hook)
    claude_settings: ConfigFile          # rendered managed-settings.json (registers the hook)
    state_dir: Path                      # host: requests, decisions, history; kept by clean
    url: str


@dataclass(frozen=True)
class Plan:
    agent: str
    slug: str                 # <agent>-<instance>, or <agent> for the default bottle (instances.py)
    spec_path: Path
    backend: str
    labels: tuple[tuple[str, str], ...]
    state_dir: Path           # per bottle, kept by clean: CA, rendered config, prompt, audit stream
    cache_dir: Path           # per bottle, transient
    ca_cert: Path
    ca_key: Path
    prompt_file: ConfigFile
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
    image_pipeline: Any | None   # the backend's own stages between the image and the guest (smolmachines: packs)
    audit_dir: Path = Path()     # the audit stream (sidecars/audit.py); kept by clean
    policy_dir: Path = Path()    # routes approved with scope=always (the overlay), applied live by egress; kept by clean
    approvals_dir: Path | None = None  # the supervise queue: tool calls (supervise) and held unknown hosts (ask)
    unknown_hosts: str = "deny"  # network.unknown_hosts: deny, ask (held for a human) or learn (allowed, logged)
    hold_timeout: int = 300      # seconds egress holds a request to an unknown host (ask): supervise.timeout
    unknown_private_network: bool = False  # hosts admitted by ask or learn may resolve to private addresses
    instance: str = ""           # name= ("" for the agent's default bottle)
    cache_root: Path = Path()    # the host's cache dir, shared by every bottle (locks, claims, images)

    @property
    def bottle(self) -> Bottle:
        return Bottle(self.agent, self.instance)

    @property
    def selector(self) -> str:
        """How commands name this bottle: agent=x [name=y]."""
        return self.bottle.selector

    @property
    def rendered_files(self) -> tuple[ConfigFile, ...]:
        """Every file the render task writes, bundle's and guest's."""
        guest = [self.guest.env_file, self.prompt_file]
        if self.supervise:
            guest += [self.supervise.guest_config, self.supervise.claude_settings]
        return tuple(f for f in (*self.bundle.files, *guest) if f.rendered)

    @property
    def guest_files(self) -> tuple[ConfigFile, ...]:
        """Rendered files provisioning copies into the guest."""
        return (self.prompt_file, *((self.supervise.guest_config, self.supervise.claude_settings) if self.supervise else ()))

    def label_args(self, role: str) -> list[str]:
        return label_args(self.labels, role)

    @property
    def slug_label(self) -> str:
        return f"{SLUG_LABEL}={self.slug}"


def audit_dir_of(state_dir: Path) -> Path:
    return state_dir / "audit"


def queue_dir_of(state_dir: Path) -> Path:
    """The supervise queue: tool calls, held pushes and held requests to unknown hosts."""
    return state_dir / "supervise"


def policy_dir_of(state_dir: Path) -> Path:
    return state_dir / "policy"


def workspace_volume_name(slug: str) -> str:
    """The docker volume of a bottle whose agent file names no workspace directory."""
    return f"bottle-{slug}-workspace"


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


def backend_name(spec: AgentSpec, settings: Settings) -> str:
    return settings.backend or spec.backend or "docker"


def covers_git_push(rule: str) -> bool:
    """Whether a supervise rule is about git pushes, so git-gate holds every push for a human: it
    matches the command ``git push`` (``Bash(git push:*)``, ``Bash(git push*)``, ``Bash(git:*)``,
    ``Bash``, ``*``), or it names a narrower push (``Bash(git push origin main)``), since git-gate
    cannot tell how git was invoked in the guest."""
    from bottle_tasks.guest.supervise_hook import HookError, compile_pattern

    try:
        if compile_pattern(rule)("Bash", {"command": "git push"}, ""):
            return True
    except HookError:
        return False
    tool, _, spec = rule.strip().partition("(")
    return tool == "Bash" and " ".join(spec.removesuffix(")").split()).startswith("git push")


def hook_matcher(patterns: tuple[str, ...]) -> str:
    """The settings.json ``matcher`` (a regex on tool_name) that sends exactly the tools the
    patterns can match to the hook: ``["Bash(git push:*)", "WebFetch"]`` -> ``Bash|WebFetch``."""
    tools: list[str] = []
    for pattern in patterns:
        tool = pattern.split("(", 1)[0].strip()
        if tool == "*":
            return "*"
        if tool.startswith("mcp__") and tool.count("__") == 1:
            tool += "__.*"
        if tool not in tools:
            tools.append(tool)
    return "|".join(tools)


def mirrors_dir_of(state_root: Path, agent: str) -> Path:
    """The fetched objects every bottle of one agent shares: one download serves them all. Under a dot
    name, which no bottle's slug can be."""
    return state_root / ".mirrors" / agent


def agent_images_cache(cache_root: Path, agent: str) -> Path:
    """The agent image's build context and digest: one per agent file, shared by its instances."""
    return cache_root / "images" / f"agent-{agent}"


def make_plan(spec: AgentSpec, settings: Settings, host_facts: Any = None, instance: str = "") -> Plan:
    """host_facts: what the backend gathered about the host before planning (backends/base.py);
    instance: name= ("" for the agent's default bottle)."""
    from bottle_tasks.backends import backend_class

    slug = bottle_of(spec.name, instance).slug   # names are DNS-safe (spec.AGENT_NAME), the slug short enough
    backend = backend_name(spec, settings)
    kind = backend_class(backend)
    state = settings.state_dir / slug
    cache = settings.cache_dir / slug
    config = state / "config"
    network = kind.plan_network(slug, spec, settings, host_facts)
    pipelock = settings.pipelock_bin is not None or bool(settings.pipelock_image)  # settings.pipelock_source
    labels = ((SLUG_LABEL, slug), (AGENT_LABEL, spec.name), (INSTANCE_LABEL, instance), (STATE_LABEL, str(state)))
    images_cache = settings.cache_dir / "images"
    common_args = (("BASE_IMAGE", settings.base_image),)
    agent_images = agent_images_cache(settings.cache_dir, spec.name)
    agent_image = ImagePlan(
        kind="agent",
        tag=f"{settings.image_prefix}/agent:{spec.name}",
        dockerfile_dir=settings.images_dir / "agent",
        context_dir=agent_images / "context",
        iid_file=agent_images / "agent.iid",
        build_args=(*common_args, ("CLAUDE_CODE_VERSION", settings.claude_code_version), *kind.agent_build_args),
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
    egress_url = f"http://{network.bundle_ip}:{EGRESS_PORT}"
    git = _git_plan(spec, instance, settings.state_dir, state, config, network) if spec.git_repos else None
    supervise = _supervise_plan(spec.supervise, state, config, network) if spec.supervise else None
    approvals = supervise.state_dir if supervise else (queue_dir_of(state) if spec.unknown_hosts == "ask" else None)
    inputs = BundleInputs(
        bundle_ip=network.bundle_ip, config_dir=config, pipelock=pipelock, upstream_ca=settings.upstream_ca_certs,
        route_secrets=tuple(sorted({slot.env for slot in spec.token_slots})),
        git_secrets=tuple(sorted({r.identity.token_env for r in spec.git_repos if r.identity.kind == "token"})),
        git_config=git.config_file if git else None, git_state=git.gate_dir if git else None,
        git_mirrors=git.mirrors_dir if git else None,
        git_approvals=supervise.state_dir if supervise and git and git.approval_timeout else None,
        ssh_keys=tuple(ConfigFile(Path(source), repo.identity.ssh_key, origin=f"git.repos[{i}].identity.ssh_key")
                       for i, (repo, source) in enumerate(zip(git.repos, git.ssh_key_sources)) if source) if git else (),
        supervise_config=supervise.config_file if supervise else None,
        supervise_state=supervise.state_dir if supervise else None, audit_dir=audit_dir_of(state),
        policy_dir=policy_dir_of(state), unknown_host_approvals=approvals if spec.unknown_hosts == "ask" else None)
    daemons = bundle_daemons(inputs)
    memory_mib, pids = bundle_limits(daemons)
    if spec.resources.bundle_memory:
        memory_mib = _mebibytes(spec.resources.bundle_memory)
        if memory_mib < 256:
            raise BottleError(f"{spec.path}: resources.bundle.memory {spec.resources.bundle_memory} is below 256m, "
                              f"too little for the bundle's daemons ({', '.join(d.name for d in daemons)}); "
                              "raise it, or leave it out for the sized default")

    secret_envs = tuple(
        [SecretEnv(r.token.env, f"routes[{i}].token.env", r.host) for i, r in enumerate(spec.routes) if r.token]
        + [SecretEnv(r.identity.token_env, f"git.repos[{i}].identity.token_env", f"the upstream of repo {r.name}")
           for i, r in enumerate(spec.git_repos) if r.identity.kind == "token"])
    bundle = BundlePlan(
        name=f"bottle-{slug}-bundle",
        daemons=daemons,
        shared_files=shared_files(inputs, state / "ca"),
        env=(("BUNDLE_DAEMONS", ",".join(d.name for d in daemons)), ("BOTTLE_DAEMON_TABLE", DAEMON_TABLE),
             ("BOTTLE_SECRETS_FILE", SECRETS_FILE), ("BOTTLE_SLUG", slug)),
        memory_mib=memory_mib,
        pids=spec.resources.bundle_pids or pids,
        secret_env_names=tuple(sorted({s.name for s in secret_envs})),
        egress_url=egress_url,
    )
    if instance and spec.workspace_host_path:
        raise BottleError(
            f"{spec.path}: workspace.host_path {spec.workspace_host_path} is one directory, and instance {instance!r} "
            "needs a workspace of its own (two agents editing one checkout would overwrite each other's work). "
            "Remove workspace.host_path to give every instance its own (git-gate clones the repos into it), "
            "or start this agent without name=")
    workspace_host = spec.workspace_host_path or kind.default_workspace(state)
    workspace_volume = None if workspace_host else workspace_volume_name(slug)
    guest_mounts = (
        Mount(str(workspace_host), GUEST_WORKSPACE, readonly=False) if workspace_host
        else Mount(workspace_volume, GUEST_WORKSPACE, readonly=False, volume=True),
    )
    guest = GuestPlan(
        name=f"bottle-{slug}-guest",
        env=_guest_env(spec, egress_url),
        env_file=ConfigFile(config / "guest.env", "", "guest.env.j2", 0o600),
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
        prompt_file=ConfigFile(config / "prompt.md", GUEST_PROMPT_PATH, "prompt.md.j2", 0o600),
        upstream_ca=settings.upstream_ca_certs,
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
        image_pipeline=kind.image_pipeline(slug, settings, cache, common_args),
        audit_dir=inputs.audit_dir,
        policy_dir=inputs.policy_dir,
        approvals_dir=approvals,
        unknown_hosts=spec.unknown_hosts,
        unknown_private_network=spec.unknown_private_network,
        hold_timeout=spec.supervise.timeout if spec.supervise else 300,
        instance=instance,
        cache_root=settings.cache_dir,
    )


def _mebibytes(size: str) -> int:
    """'1536m' or '2g' (the schema allows only these) in MiB."""
    return int(size[:-1]) * (1024 if size[-1].lower() == "g" else 1)


def instance_namespace(agent: str, instance: str) -> str:
    """The branches a bottle pushes to by default: bottle/<agent>/<instance>/*, or bottle/<agent>/* for
    the default bottle (which git-gate keeps out of every instance's bottle/<agent>/<name>/)."""
    return f"{namespace_root(agent)}{instance}/*" if instance else f"{namespace_root(agent)}*"


def _git_plan(spec: AgentSpec, instance: str, state_root: Path, state: Path, config: Path,
              network: NetworkPlan) -> GitPlan:
    default_branches = (instance_namespace(spec.name, instance),)
    repos = tuple(
        replace(r, push=replace(r.push, branches=r.push.branches or default_branches),
                identity=replace(r.identity, ssh_key=BUNDLE_SSH_KEY.format(repo=r.name) if r.identity.ssh_key else ""))
        for r in spec.git_repos)
    if spec.supervise is not None and any(covers_git_push(rule) for rule in spec.supervise.tools):
        repos = tuple(replace(r, push=replace(r.push, approve=True)) for r in repos)
    held = spec.supervise is not None and any(r.push.approve for r in repos)  # spec: approve needs supervise
    return GitPlan(user=spec.git_user, repos=repos, ssh_key_sources=tuple(r.identity.ssh_key for r in spec.git_repos),
                   config_file=config / "git-gate.yaml", gate_dir=state / "git",
                   mirrors_dir=mirrors_dir_of(state_root, spec.name),
                   url=f"http://{network.bundle_ip}:{GIT_GATE_PORT}", max_push_bytes=spec.git_max_push_bytes,
                   approval_timeout=spec.supervise.timeout if held else None)


def _supervise_plan(policy: SupervisePolicy, state: Path, config: Path, network: NetworkPlan) -> SupervisePlan:
    return SupervisePlan(
        policy=policy,
        hook_matcher=hook_matcher(policy.tools),
        config_file=config / "supervise.yaml",
        guest_config=ConfigFile(config / "supervise.json", GUEST_SUPERVISE_CONFIG, "supervise.json.j2"),
        claude_settings=ConfigFile(config / "claude-managed-settings.json", GUEST_CLAUDE_MANAGED_SETTINGS,
                                   "claude-managed-settings.json.j2"),
        state_dir=queue_dir_of(state),
        url=f"http://{network.bundle_ip}:{SUPERVISE_PORT}",
    )
