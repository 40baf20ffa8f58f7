"""The config shapes the host and the bundle share: one dataclass each, imported by both sides.

The host builds them from the agent file (spec.py), carries them through the plan and renders them
with the Jinja templates; the bundle's daemons parse the rendered YAML back into the same classes.
Standard library only: this module ships in the bundle image.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

PLACEHOLDER_PREFIX = "bottle-placeholder-"
VALUE_MARKER = "{value}"
DEFAULT_MAX_PUSH_BYTES = 100 * 1024 * 1024  # git-gate's receive.maxInputSize unless git.max_push_bytes says otherwise
# The private LAN ranges network.unknown_private_network opens to hosts the agent chose (never loopback,
# link-local or CGNAT); egress checks them, pipelock's ssrf.ip_allowlist gets them.
LAN_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
DEFAULT_ROUTE_PORTS = (443, 80)  # a route's ports unless routes[].ports says otherwise: https, plain http
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body, as sent and decoded, unless routes[].max_body_bytes says otherwise

# What egress does with a secret found in a request (routes[].dlp): refuse it, forward it with each match
# replaced by [REDACTED:<pattern>], or only log it.
DLP_ACTIONS = ("block", "redact", "log")
# What egress does with a response body pipelock finds a prompt injection in (routes[].responses).
RESPONSE_ACTIONS = ("block", "warn", "off")
# Hosts whose requests carry the agent's whole conversation. A secret the agent once read is in every later
# request, so a block there ends the session: these default to redact, and their answers (the model's own
# output) are not scanned for injection.
MODEL_API_HOSTS = ("api.anthropic.com",)


def default_dlp_action(host: str) -> str:
    return "redact" if host in MODEL_API_HOSTS else "block"


def default_response_action(host: str) -> str:
    return "off" if host in MODEL_API_HOSTS else "block"


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, and an internationalised name in its ASCII (punycode) form:
    mitmproxy hands egress a CONNECT host decoded to Unicode while the SNI stays ASCII, and a
    route names one spelling."""
    host = host.strip().rstrip(".").lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a valid IDN: it matches no route, and no SNI
    return host


@dataclass(frozen=True)
class TokenSlot:
    """A header egress fills with a host secret; the guest holds only the placeholder."""

    env: str                   # host (and bundle) environment variable holding the real value
    header: str                # lower-case header name
    format: str = VALUE_MARKER  # e.g. "Bearer {value}"
    placeholder: str = ""      # what the guest holds instead; derived from env when empty

    def __post_init__(self) -> None:
        if not self.placeholder:
            object.__setattr__(self, "placeholder", PLACEHOLDER_PREFIX + self.env)

    def header_value(self, secret: str) -> str:
        # str.replace, not str.format: a "{" in a format string must not be interpreted.
        return self.format.replace(VALUE_MARKER, secret)


@dataclass(frozen=True)
class Route:
    """A host the agent may reach through egress."""

    host: str                          # lower-case; exact name or "*.example.com" (subdomains only)
    methods: tuple[str, ...] = ()      # upper-case; () = any method
    paths: tuple[str, ...] = ()        # fnmatch globs on the path; () = any path
    private_network: bool = False      # the host may resolve to a private address
    token: TokenSlot | None = None
    ports: tuple[int, ...] = DEFAULT_ROUTE_PORTS  # destination ports, checked at CONNECT and per request
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request body limit, as sent and once decoded
    dlp: str = ""                      # one of DLP_ACTIONS; "" = default_dlp_action(host)
    responses: str = ""                # one of RESPONSE_ACTIONS; "" = default_response_action(host)

    def __post_init__(self) -> None:
        if not self.dlp:
            object.__setattr__(self, "dlp", default_dlp_action(self.host))
        if not self.responses:
            object.__setattr__(self, "responses", default_response_action(self.host))

    def matches_host(self, host: str) -> bool:
        host = normalize_host(host)
        if self.host.startswith("*."):
            suffix = self.host[1:]  # ".example.com": subdomains only, not the apex
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def allows_port(self, port: int) -> bool:
        return port in self.ports

    def allows_method(self, method: str) -> bool:
        return not self.methods or method.upper() in self.methods

    def allows_path(self, path: str) -> bool:
        path_only = path.split("?", 1)[0].split("#", 1)[0] or "/"
        # fnmatchcase: paths are case-sensitive on the wire, the glob must be too.
        return not self.paths or any(fnmatch.fnmatchcase(path_only, glob) for glob in self.paths)


@dataclass(frozen=True)
class GitIdentity:
    """How git-gate authenticates to a repo's upstream; it never enters the guest."""

    kind: str = "none"                 # "token" | "ssh" | "none"
    token_env: str = ""                # kind token: environment variable, sent as HTTP basic auth
    username: str = "x-access-token"   # kind token
    ssh_key: str = ""                  # kind ssh: the key file, as the reading side sees it (host file, or its bundle mount)


def namespace_root(agent: str) -> str:
    """Where the branches of an agent's bottles live: ``<root><name>`` is the default instance's,
    ``<root><instance>/...`` instance <instance>'s (PushPolicy.namespace_owner)."""
    return f"bottle/{agent}/"


@dataclass(frozen=True)
class PushPolicy:
    """What git-gate's pre-receive hook lets through for one repo."""

    branches: tuple[str, ...] = ()  # fnmatch globs on the branch name (refs/heads/ stripped)
    force: bool = False
    delete: bool = False
    tags: bool = False
    approve: bool = False           # a push waits in the supervise queue until a human approves it
    namespace_root: str = ""        # namespace_root(agent); "" = no instance namespaces
    instance: str = ""              # the instance this bottle is ("" = the default instance)

    def branch_allowed(self, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, glob) for glob in self.branches)

    def namespace_owner(self, branch: str) -> str | None:
        """The instance whose namespace branch is in: under namespace_root, ``<seg>/...`` is instance
        <seg>'s and a name with no further ``/`` the default instance's (""); None outside the root.
        The root is matched without case: on a case-insensitive disk (a host mount on macOS)
        bottle/A/y/fix is the same ref file as bottle/a/y/fix."""
        root = self.namespace_root
        if not root or branch[:len(root)].casefold() != root.casefold():
            return None
        seg, slash, _ = branch[len(root):].partition("/")
        return seg if slash else ""

    def branch_refusal(self, branch: str) -> str:
        """Why this bottle may not push to branch, "" when it may. Another instance's namespace is
        refused whatever the globs say (``*`` matches it too), and so is a branch on the way to the root
        (``bottle``, ``bottle/<agent>``): git keeps it as a file where every namespace needs a directory."""
        root = self.namespace_root
        if root and root.casefold().startswith(branch.casefold() + "/"):
            return f"branch {branch} would hold the place of {root}, where every instance's branches live"
        owner = self.namespace_owner(branch)
        if owner is not None and owner != self.instance:
            whose = f"instance {owner}'s" if owner else "the default instance's"
            this = f"instance {self.instance}" if self.instance else "the default instance"
            own = (f"{self.namespace_root}{self.instance}/*" if self.instance
                   else f"{self.namespace_root}<name> (no further /)")
            return f"branch {branch} is {whose} namespace; this bottle ({this}) pushes to {own}"
        if not self.branch_allowed(branch):
            return f"branch not allowed (allowed: {', '.join(self.branches) or 'none'})"
        return ""


@dataclass(frozen=True)
class GitRepo:
    name: str
    url: str
    identity: GitIdentity = field(default_factory=GitIdentity)
    push: PushPolicy = field(default_factory=PushPolicy)


@dataclass(frozen=True)
class SupervisePolicy:
    """Tool calls that wait for a human, and how long the human has."""

    tools: tuple[str, ...]   # Claude Code permission-rule patterns, e.g. "Bash(git push:*)"
    timeout: int = 300       # seconds; no decision by then means deny
    max_pending: int = 32    # requests waiting for a human at once; more get 429
    max_requests_per_minute: int = 60  # new requests in any 60 s; more get 429
