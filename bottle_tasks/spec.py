"""Agent files: load agents/<name>.yaml, validate it against the JSON Schema, return an AgentSpec.

Errors name the file, the key and the problem, and end with what to do (the schema's x-hint).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from bottle_tasks.contract import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PUSH_BYTES, DEFAULT_ROUTE_PORTS, GitIdentity, GitRepo, PushPolicy, Route, SupervisePolicy, TokenSlot
from bottle_tasks.errors import BottleError

SCHEMA_PATH = Path(__file__).parent / "schema" / "agent.schema.json"
AGENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")
DEFAULT_COMMAND = ("claude",)


class SpecError(BottleError):
    def __init__(self, path: Path, key: str, problem: str, hint: str = "") -> None:
        self.path, self.key, self.problem, self.hint = path, key, problem, hint
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {problem}" + (f". {hint}" if hint else ""))


@dataclass(frozen=True)
class GitUser:
    name: str = "claude-bottle agent"
    email: str = "agent@claude-bottle.invalid"


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None
    memory: str | None = None
    pids: int = 512
    bundle_memory: str | None = None     # resources.bundle: None means sized from the bundle's daemons
    bundle_pids: int | None = None


@dataclass(frozen=True)
class AgentSpec:
    name: str
    path: Path
    description: str = ""
    prompt: str = ""
    skills: tuple[Path, ...] = ()
    command: tuple[str, ...] = DEFAULT_COMMAND
    routes: tuple[Route, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    backend: str | None = None
    resources: Resources = field(default_factory=Resources)
    workspace_host_path: Path | None = None
    subnet: str | None = None
    git_user: GitUser = field(default_factory=GitUser)
    git_repos: tuple[GitRepo, ...] = ()
    git_max_push_bytes: int = DEFAULT_MAX_PUSH_BYTES
    supervise: SupervisePolicy | None = None
    unknown_hosts: str = "deny"          # network.unknown_hosts: deny, ask or learn
    unknown_private_network: bool = False  # network.unknown_private_network: ask/learn hosts may resolve privately

    @property
    def token_slots(self) -> tuple[TokenSlot, ...]:
        return tuple(r.token for r in self.routes if r.token is not None)


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def route_schema() -> dict[str, Any]:
    """The schema of one of the agent file's routes (what `doit policy` prints must satisfy it)."""
    return _schema()["$defs"]["route"]


def _validated_marker(cache_dir: Path | None, text: str) -> Path | None:
    """A file whose existence says this exact text passed this exact schema before."""
    if cache_dir is None:
        return None
    digest = hashlib.sha256(SCHEMA_PATH.read_bytes() + b"\0" + text.encode()).hexdigest()
    return cache_dir / "validated-specs" / digest


def _key_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _hint_for(error) -> str:
    # The innermost schema that carries a hint explains what to write instead.
    for schema in (error.schema, *[s for s in _schemas_along(error)]):
        if isinstance(schema, dict) and "x-hint" in schema:
            return schema["x-hint"]
    return ""


def _schemas_along(error):
    root = _schema()
    node: Any = root
    chain = [root]
    for part in error.absolute_schema_path:
        if isinstance(node, dict) and "$ref" in node and part not in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        chain.append(node)
    return reversed(chain)


def _problem(error) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown key {', '.join(map(repr, extra))}"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        return f"{error.instance!r} is not valid here"
    return error.message


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise SpecError(path, "", "no such agent file", "Create it, or pick one of the files in agents/") from None
    except OSError as exc:
        raise SpecError(path, "", f"cannot read the file ({exc.strerror})", "Check its permissions") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(path, where, f"YAML syntax error: {problem}", "Fix the YAML at that position") from None


def _relative(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def load_spec(path: Path | str, cache_dir: Path | None = None) -> AgentSpec:
    """Load and validate an agent file. With cache_dir, a text that validated before skips the
    JSON Schema pass (jsonschema is the slowest import of an up-to-date start)."""
    path = Path(path)
    name = path.stem
    if not AGENT_NAME.match(name):
        raise SpecError(
            path, "", f"agent name {name!r} (the file name) is not usable",
            "Rename the file to lower-case letters, digits and dashes, 2 to 32 characters, starting with a letter",
        )
    text = _read_text(path)
    data = _parse_yaml(path, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(path, "", f"the file holds a {type(data).__name__}, not a mapping", "Write key: value pairs at the top level")
    marker = _validated_marker(cache_dir, text)
    if marker is None or not marker.exists():
        _validate(path, data)
    spec = _build(path, name, data)
    if marker is not None and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return spec


def _validate(path: Path, data: dict[str, Any]) -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise SpecError(path, _key_path(first.absolute_path), _problem(first), _hint_for(first))


def _build(path: Path, name: str, data: dict[str, Any]) -> AgentSpec:
    base = path.parent
    if "prompt" in data and "prompt_file" in data:
        raise SpecError(path, "prompt_file", "both prompt and prompt_file are set", "Keep only one of them")
    prompt = data.get("prompt", "")
    if "prompt_file" in data:
        prompt_path = _relative(base, data["prompt_file"])
        try:
            prompt = prompt_path.read_text()
        except OSError:
            raise SpecError(path, "prompt_file", f"cannot read {prompt_path}", "Give an existing file, relative to the agent file") from None
    skills = []
    for i, skill in enumerate(data.get("skills", [])):
        skill_dir = _relative(base, skill)
        if not skill_dir.is_dir():
            raise SpecError(path, f"skills[{i}]", f"{skill_dir} is not a directory", "Give an existing skill directory, relative to the agent file")
        skills.append(skill_dir.resolve())
    routes = []
    seen_hosts: dict[str, int] = {}
    for i, raw in enumerate(data.get("routes", [])):
        host = raw["host"].lower()
        if host in seen_hosts:
            raise SpecError(path, f"routes[{i}].host", f"{host} is already routed by routes[{seen_hosts[host]}]", "Merge the two routes into one")
        seen_hosts[host] = i
        token = None
        if "token" in raw:
            t = raw["token"]
            token = TokenSlot(env=t["env"], header=t["header"].lower(), format=t.get("format", "{value}"))
        routes.append(Route(
            host=host,
            methods=tuple(raw.get("methods", ())),
            paths=tuple(raw.get("paths", ())),
            private_network=bool(raw.get("private_network", False)),
            token=token,
            ports=tuple(raw.get("ports", DEFAULT_ROUTE_PORTS)),
            max_body_bytes=raw.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
            dlp=raw.get("dlp", ""),
            responses=raw.get("responses", ""),
        ))
    git_user, git_repos = _git(path, data.get("git", {}))
    supervise = None
    if "supervise" in data and data["supervise"].get("tools"):
        supervise = SupervisePolicy(tools=tuple(data["supervise"]["tools"]), timeout=data["supervise"].get("timeout", 300))
    for i, repo in enumerate(git_repos):
        if repo.push.approve and supervise is None:
            raise SpecError(path, f"git.repos[{i}].push.approve", "a push waiting for approval needs a supervise section",
                            'Add supervise: {tools: ["Bash(git push:*)"]}; doit approve then decides')
    backend = data.get("backend")
    if backend is not None:
        from bottle_tasks.backends import BACKENDS

        if backend not in BACKENDS:
            raise SpecError(path, "backend", f"{backend!r} is not a backend", f"Use {' or '.join(BACKENDS)}")
    res = data.get("resources", {})
    workspace = data.get("workspace", {})
    host_path = None
    if "host_path" in workspace:
        host_path = _relative(base, workspace["host_path"]).resolve()
        if not host_path.is_dir():
            raise SpecError(path, "workspace.host_path", f"{host_path} is not a directory", "Create it first, or remove workspace.host_path to use a volume")
    return AgentSpec(
        name=name,
        path=path.resolve(),
        description=data.get("description", ""),
        prompt=prompt,
        skills=tuple(skills),
        command=tuple(data.get("command", DEFAULT_COMMAND)),
        routes=tuple(routes),
        env=tuple(sorted(data.get("env", {}).items())),
        backend=backend,
        resources=Resources(cpus=res.get("cpus"), memory=res.get("memory"), pids=res.get("pids", 512),
                            bundle_memory=res.get("bundle", {}).get("memory"), bundle_pids=res.get("bundle", {}).get("pids")),
        workspace_host_path=host_path,
        subnet=data.get("network", {}).get("subnet"),
        unknown_hosts=data.get("network", {}).get("unknown_hosts", "deny"),
        unknown_private_network=data.get("network", {}).get("unknown_private_network", False),
        git_user=git_user,
        git_repos=git_repos,
        git_max_push_bytes=data.get("git", {}).get("max_push_bytes", DEFAULT_MAX_PUSH_BYTES),
        supervise=supervise,
    )


def _git(path: Path, raw: dict[str, Any]) -> tuple[GitUser, tuple[GitRepo, ...]]:
    user = GitUser(**raw["user"]) if "user" in raw else GitUser()
    repos, seen = [], {}
    for i, repo in enumerate(raw.get("repos", [])):
        key = f"git.repos[{i}]"
        if repo["name"] in seen:
            raise SpecError(path, f"{key}.name", f"{repo['name']!r} is already used by git.repos[{seen[repo['name']]}]", "Give each repo its own name")
        seen[repo["name"]] = i
        identity = repo.get("identity", {})
        if "ssh_key" in identity and "token_env" in identity:
            raise SpecError(path, f"{key}.identity", "both ssh_key and token_env are set", "Keep only one of them")
        ssh_key = None
        if "ssh_key" in identity:
            ssh_key = _relative(path.parent, identity["ssh_key"]).resolve()
            if not ssh_key.is_file():
                raise SpecError(path, f"{key}.identity.ssh_key", f"{ssh_key} is not a file", "Give the path of an existing private key")
            if not repo["url"].startswith("ssh://") and "@" not in repo["url"].split("/")[0]:
                raise SpecError(path, f"{key}.identity.ssh_key", "an SSH key needs an ssh:// or user@host:path url", "Use token_env for https:// urls")
        push = repo.get("push", {})
        if ssh_key:
            kind = "ssh"
        elif "token_env" in identity:
            kind = "token"
        else:
            kind = "none"
        repos.append(GitRepo(
            name=repo["name"], url=repo["url"],
            identity=GitIdentity(kind=kind, token_env=identity.get("token_env", ""),
                                 username=identity.get("username", "x-access-token"),
                                 ssh_key=str(ssh_key) if ssh_key else ""),
            push=PushPolicy(branches=tuple(push.get("branches", ())), force=push.get("force", False),
                            delete=push.get("delete", False), tags=push.get("tags", False),
                            approve=push.get("approve", False)),
        ))
    return user, tuple(repos)
