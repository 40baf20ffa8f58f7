"""Agent files: the example is valid, and malformed files fail with file, key, problem and fix."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from bottle_tasks.spec import SCHEMA_PATH, SpecError, load_spec
from bottle_tasks.settings import ROOT

import json


def write(tmp_path: Path, text: str, name: str = "agent-x") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_example_agent_is_valid_against_loader_and_schema():
    spec = load_spec(ROOT / "agents" / "example.yaml")
    assert spec.name == "example"
    hosts = [r.host for r in spec.routes]
    assert hosts == ["api.anthropic.com", "registry.npmjs.org"]
    assert spec.token_slots[0].env == "ANTHROPIC_API_KEY"
    assert spec.token_slots[0].header == "x-api-key"
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((ROOT / "agents" / "example.yaml").read_text()), schema)


def test_empty_file_is_a_valid_agent_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, ""))
    assert spec.command == ("claude",)
    assert spec.routes == ()


def test_route_ports_and_body_limit(tmp_path):
    spec = load_spec(write(tmp_path, "routes:\n  - host: a.com\n  - host: b.com\n    ports: [8443]\n"
                                     "    max_body_bytes: 1048576\n"))
    default, custom = spec.routes
    assert default.ports == (443, 80) and default.max_body_bytes == 32 << 20
    assert custom.ports == (8443,) and custom.max_body_bytes == 1 << 20


def test_prompt_file_and_skills_resolve_relative_to_the_agent_file(tmp_path):
    (tmp_path / "p.md").write_text("be careful")
    (tmp_path / "skills" / "s1").mkdir(parents=True)
    spec = load_spec(write(tmp_path, "prompt_file: p.md\nskills: [skills/s1]\n"))
    assert spec.prompt == "be careful"
    assert spec.skills == ((tmp_path / "skills" / "s1").resolve(),)


MALFORMED = [
    # (file text, key the message must name, words the message must contain)
    ("routes: [\n  - host: a\n", "line", "YAML syntax error"),
    ("- just\n- a list\n", "", "not a mapping"),
    ("promtp: hi\n", "", "unknown key 'promtp'"),
    ("routes:\n  - methods: [GET]\n", "routes[0]", "'host' is required"),
    ("routes:\n  - host: https://api.x.com/\n", "routes[0].host", "bare host name"),
    ("routes:\n  - host: a.com\n    methods: [get]\n", "routes[0].methods[0]", "Upper-case HTTP methods"),
    ("routes:\n  - host: a.com\n    token: {env: 'MY KEY', header: x-api-key}\n", "routes[0].token.env", "never the value"),
    ("routes:\n  - host: a.com\n    token: {env: K}\n", "routes[0].token", "'header' is required"),
    ("routes:\n  - host: a.com\n    token: {env: K, header: x, format: 'Bearer'}\n", "routes[0].token.format", "{value}"),
    ("routes:\n  - host: a.com\n  - host: A.com\n", "routes[1].host", "already routed"),
    ("routes:\n  - host: a.com\n    ports: [0]\n", "routes[0].ports[0]", "port numbers (1 to 65535)"),
    ("routes:\n  - host: a.com\n    ports: [443, 443]\n", "routes[0].ports", "port numbers"),
    ("routes:\n  - host: a.com\n    max_body_bytes: 32m\n", "routes[0].max_body_bytes", "whole number of bytes"),
    ("command: claude -p hi\n", "command", "as a list"),
    ("backend: podman\n", "backend", "docker or smolmachines"),
    ("resources: {memory: lots}\n", "resources.memory", "512m"),
    ("prompt: a\nprompt_file: b.md\n", "prompt_file", "Keep only one"),
    ("prompt_file: missing.md\n", "prompt_file", "cannot read"),
    ("skills: [nope]\n", "skills[0]", "not a directory"),
    ("env: {GOOD: 1}\n", "env.GOOD", "quote numbers"),
    ("network: {subnet: 10.0.0.0/24}\n", "network.subnet", "/23"),
    ("workspace: {host_path: /does/not/exist}\n", "workspace.host_path", "not a directory"),
]


@pytest.mark.parametrize("text,key,words", MALFORMED, ids=[m[1] or m[2] for m in MALFORMED])
def test_malformed_agent_file_names_file_key_and_fix(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert key in message, message
    assert words in message, message
    assert "Traceback" not in message


def test_bad_file_name_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="Rename the file"):
        load_spec(write(tmp_path, "", name="Bad_Name"))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(SpecError, match="no such agent file"):
        load_spec(tmp_path / "ghost.yaml")


def test_validated_text_skips_the_schema_pass_but_a_change_does_not(tmp_path):
    cache = tmp_path / "cache"
    path = write(tmp_path, "routes: [{host: a.com}]\n")
    first = load_spec(path, cache_dir=cache)
    assert len(list((cache / "validated-specs").iterdir())) == 1
    assert load_spec(path, cache_dir=cache) == first
    path.write_text("routes: [{host: a.com, methods: [get]}]\n")
    with pytest.raises(SpecError, match="methods"):
        load_spec(path, cache_dir=cache)


def test_git_and_supervise_sections(tmp_path):
    key = tmp_path / "deploy_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    spec = load_spec(write(tmp_path, """
git:
  user: {name: Agent, email: agent@example.com}
  repos:
    - name: app
      url: https://git.example.com/org/app.git
      identity: {token_env: GIT_TOKEN}
    - name: lib
      url: git@git.example.com:org/lib.git
      identity: {ssh_key: deploy_key}
      push: {branches: ["feature/*"], tags: true}
supervise:
  tools: ["Bash(git push:*)", WebFetch]
  timeout: 60
"""))
    app, lib = spec.git_repos
    assert app.identity.kind == "token" and app.identity.token_env == "GIT_TOKEN" and app.push.branches == ()
    assert lib.identity.kind == "ssh" and lib.identity.ssh_key == str(key.resolve()) and lib.push.tags and not lib.push.force
    assert spec.git_user.email == "agent@example.com"
    assert spec.supervise.tools == ("Bash(git push:*)", "WebFetch") and spec.supervise.timeout == 60


GIT_MALFORMED = [
    ("git: {repos: [{name: App, url: https://x/y.git}]}\n", "git.repos[0].name", "Lower-case"),
    ("git: {repos: [{name: a, url: ftp://x/y}]}\n", "git.repos[0].url", "https://"),
    ("git: {repos: [{name: a, url: https://x/a.git}, {name: a, url: https://x/b.git}]}\n", "git.repos[1].name", "already used"),
    ("git: {repos: [{name: a, url: https://x/a.git, identity: {token_env: T, ssh_key: k}}]}\n", "git.repos[0].identity", "Keep only one"),
    ("git: {repos: [{name: a, url: https://x/a.git, push: {force: maybe}}]}\n", "git.repos[0].push.force", "true or false"),
    ("git: {user: {name: A, email: nope}}\n", "git.user.email", "agent@example.com"),
    ("supervise: {tools: []}\n", "supervise.tools", "Rules like"),
    ("supervise: {tools: [Bash], timeout: 0}\n", "supervise.timeout", "1 to 3600"),
]


@pytest.mark.parametrize("text,key,words", GIT_MALFORMED, ids=[m[1] for m in GIT_MALFORMED])
def test_malformed_git_and_supervise(tmp_path, text, key, words):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert key in str(info.value) and words in str(info.value), str(info.value)
