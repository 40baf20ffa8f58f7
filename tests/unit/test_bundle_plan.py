"""The bundle is built from one list: every file it reads is rendered, mounted and fingerprinted from the
same records, init's table names exactly the planned daemons, and the contract doc shows that list."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bottle_tasks import bundle_plan, contract_doc
from bottle_tasks.backends.docker import DockerBackend
from bottle_tasks.ca import mint_ca
from bottle_tasks.docker_cli import Docker
from bottle_tasks.plan import make_plan
from bottle_tasks.render import render
from bottle_tasks.settings import Settings
from bottle_tasks.spec import load_spec
from bottle_tasks.tasks.bottle import render_configs
from tests.unit.fakes import FakeRunner

EVERYTHING = """
routes:
  - host: api.anthropic.com
    token: {env: ANTHROPIC_API_KEY, header: x-api-key}
git:
  repos:
    - name: app
      url: https://git.example.com/org/app.git
      identity: {token_env: GIT_TOKEN}
    - name: lib
      url: git@git.example.com:org/lib.git
      identity: {ssh_key: deploy_key}
supervise:
  tools: ["Bash(git push:*)"]
  timeout: 30
"""


@pytest.fixture
def plan(tmp_path):
    """Every daemon on (pipelock, git-gate with an ssh key, supervise), an upstream CA, all files rendered."""
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "deploy_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nkey\n")
    (agents / "full.yaml").write_text(textwrap.dedent(EVERYTHING))
    (tmp_path / "upstream-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nca\n")
    settings = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
                                  "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), "BOTTLE_PIPELOCK_BIN": "/usr/bin/pipelock",
                                  "BOTTLE_UPSTREAM_CA_CERTS": str(tmp_path / "upstream-ca.pem")})
    plan = make_plan(load_spec(agents / "full.yaml"), settings)
    render_configs(plan)
    mint_ca(plan.ca_cert, plan.ca_key, "test CA")
    return plan


def _backend():
    return DockerBackend(Docker(FakeRunner({("docker", "image", "inspect"): (0, json.dumps([{"Id": "sha256:b"}]), "")})))


def _mounted_files(argv: list[str]) -> list[Path]:
    """Every host file behind a read-only bind mount of the bundle's `docker create`."""
    files = []
    for flag, value in zip(argv, argv[1:]):
        if flag != "--mount":
            continue
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        if fields["type"] == "bind" and "readonly" in value:
            source = Path(fields["source"])
            files += sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    return files


def test_every_daemon_of_the_plan_is_present(plan):
    assert plan.bundle.daemon_names == ("audit", "egress", "pipelock", "dns", "git-gate", "supervise")


def test_a_change_to_any_file_the_bundle_reads_changes_its_fingerprint(plan):
    backend = _backend()
    files = _mounted_files(backend.bundle_create_argv(plan))
    rendered = {f.host_path for f in plan.rendered_files}
    # The mounts cover every rendered bundle file, the CA, the upstream CA and the ssh key.
    assert {f.host_path for f in plan.bundle.files if f.rendered} <= set(files) and rendered & set(files)
    assert {plan.ca_cert, plan.ca_key, plan.upstream_ca} <= set(files)
    assert any(p.name == "deploy_key" for p in files)
    before = backend.bundle_fingerprint(plan)
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            assert backend.bundle_fingerprint(plan) != before, f"editing {path} left the bundle fingerprint as it was"
        finally:
            path.write_bytes(original)
    assert backend.bundle_fingerprint(plan) == before


def test_the_render_task_writes_every_file_the_bundle_mounts_from_a_template(plan):
    for file in plan.bundle.files:
        if file.rendered:
            assert file in plan.rendered_files and file.host_path.is_file()
            assert oct(file.host_path.stat().st_mode & 0o777) == oct(file.mode)


def test_inits_table_is_rendered_from_the_same_records(plan):
    table = json.loads((plan.state_dir / "config" / "daemons.json").read_text())
    assert sorted(table) == sorted(plan.bundle.daemon_names)
    assert dict(plan.bundle.env)["BUNDLE_DAEMONS"] == ",".join(plan.bundle.daemon_names)
    assert dict(plan.bundle.env)["BOTTLE_DAEMON_TABLE"] == bundle_plan.DAEMON_TABLE
    mounted = {f.target for f in plan.bundle.files}
    for daemon in plan.bundle.daemons:
        entry = table[daemon.name]
        assert entry["command"] == list(daemon.command)
        assert entry["probe"] == ({daemon.probe[0]: daemon.probe[1]} if daemon.probe else None)
        assert entry["secrets"] == list(daemon.secrets)
        # Every file a daemon is told to read is mounted (or optional: the upstream CA only when set).
        for arg in daemon.command:
            if arg.startswith(bundle_plan.CONFIG_DIR + "/"):
                assert arg in mounted, f"{daemon.name} reads {arg}, which is not mounted"


def test_the_guest_fence_admits_exactly_the_daemons_guest_ports(plan):
    rules = render("guest-fence.rules.j2", plan)
    accepted = [line for line in rules.splitlines() if line.startswith(f"-A OUTPUT -d {plan.network.bundle_ip}/32")]
    assert accepted == [f"-A OUTPUT -d {plan.network.bundle_ip}/32 -p {proto} --dport {port} -j ACCEPT"
                        for proto, port in plan.bundle.guest_ports]
    assert {port for _, port in plan.bundle.guest_ports} == {8080, 53, 8081, 8082}


def test_the_contract_doc_shows_the_list_as_it_is():
    assert contract_doc.main(["--check"]) == 0, "docs/bundle-contract.md is stale: run python -m bottle_tasks.contract_doc"


def test_each_daemon_is_given_only_the_secrets_it_uses(plan):
    secrets = {d.name: d.secrets for d in plan.bundle.daemons}
    assert secrets == {"audit": (), "egress": ("ANTHROPIC_API_KEY",), "pipelock": (), "dns": (), "git-gate": ("GIT_TOKEN",),
                       "supervise": ()}
    assert not any(key in plan.bundle.secret_env_names for key, _ in plan.bundle.env)


def test_the_state_dir_is_the_host_users_alone(tmp_path):
    """CA key, tool input and mirrors live there: 0700 even under a 022 umask, and an existing 0755 dir
    from an earlier version is narrowed."""
    import os

    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "plain.yaml").write_text("routes: []\n")
    settings = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
                                  "BOTTLE_CACHE_DIR": str(tmp_path / "cache")})
    plan = make_plan(load_spec(agents / "plain.yaml"), settings)
    old = os.umask(0o022)
    try:
        plan.state_dir.mkdir(parents=True, mode=0o755)
        render_configs(plan)
    finally:
        os.umask(old)
    assert oct(plan.state_dir.stat().st_mode & 0o777) == "0o700"
