"""Invariant 8: bad input gets a clear error that says what to do, and leaves nothing behind."""

from __future__ import annotations

import ipaddress

from bottle_tasks.labels import LABEL
from tests.integration.conftest import docker


def _leftovers(slug: str) -> list[str]:
    label = f"label={LABEL}.slug={slug}"
    containers = docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split()
    networks = docker("network", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()
    return containers + networks


def _failed_start(bottle_env, agent: str, **extra_env):
    proc = bottle_env.doit("start", f"agent={agent}", "command=true", check=False, extra_env=extra_env)
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    return out


def test_malformed_agent_file(bottle_env):
    path = bottle_env.write_agent("bad-yaml", "routes:\n  - host: [unclosed\n")
    out = _failed_start(bottle_env, "bad-yaml")
    assert str(path) in out and "YAML syntax error" in out and "line" in out
    path = bottle_env.write_agent("bad-key", "routes:\n  - host: api.x.com\n    tokn: {}\n")
    out = _failed_start(bottle_env, "bad-key")
    assert f"{path}: routes[0]: unknown key 'tokn'" in out, out
    assert _leftovers("bad-yaml") == [] and _leftovers("bad-key") == []


def test_unknown_agent(bottle_env):
    out = _failed_start(bottle_env, "no-such-agent")
    assert "no-such-agent.yaml" in out and "no such agent file" in out


def test_missing_token_variable_names_it_and_never_a_value(bottle_env):
    bottle_env.write_agent("needs-token", """
        routes:
          - host: api.example.test
            token: {env: BOTTLE_TEST_MISSING_TOKEN, header: authorization, format: "Bearer {value}"}
    """)
    def argv_lines() -> list[str]:   # no docker command yet, no log yet
        return bottle_env.argv_log.read_text().splitlines() if bottle_env.argv_log.exists() else []

    mark = len(argv_lines())
    out = _failed_start(bottle_env, "needs-token")
    # The check costs nothing: this agent's image was never built, and still no build ran.
    builds = [line for line in argv_lines()[mark:] if line.startswith("build")]
    assert builds == [], builds
    assert "BOTTLE_TEST_MISSING_TOKEN is not set in the host environment" in out
    assert "export BOTTLE_TEST_MISSING_TOKEN=" in out
    assert _leftovers("needs-token") == []


def test_docker_not_reachable(bottle_env, tmp_path):
    bottle_env.write_agent("no-docker", "routes: []\n")
    out = _failed_start(bottle_env, "no-docker", DOCKER_HOST=f"unix://{tmp_path}/nowhere.sock")
    assert "Docker is not reachable" in out and "nowhere.sock" in out and "start the Docker engine" in out
    assert _leftovers("no-docker") == []


def test_name_already_in_use(bottle_env):
    bottle_env.write_agent("squatted", "routes: []\n")
    plan = bottle_env.plan("squatted")
    docker("run", "-d", "--name", plan.bundle.name, "--label", "test.squatter=1",
           "--entrypoint", "sleep", "claude-bottle-test/upstream:latest", "300")
    try:
        out = _failed_start(bottle_env, "squatted")
        assert f"docker container '{plan.bundle.name}' already exists" in out
        assert f"docker container rm {plan.bundle.name}" in out
        assert _leftovers("squatted") == []
        # The squatter is untouched.
        assert docker("inspect", "-f", "{{.State.Running}}", plan.bundle.name).stdout.strip() == "true"
    finally:
        docker("rm", "-f", plan.bundle.name, check=False)


def test_subnet_clash(bottle_env):
    """A subnet in use: the allocator steps around it and says where the bottle went; a subnet the agent
    file pins cannot move, so that start fails with the fix and leaves nothing."""
    bottle_env.write_agent("clashing", "routes: []\n")
    plan = bottle_env.plan("clashing")
    first = ipaddress.ip_network(plan.network.guest_side.subnet).supernet(new_prefix=23)
    squatter = "bottle-test-squatter-net"
    overlapping = str(ipaddress.ip_network(plan.network.guest_side.subnet).subnets(new_prefix=25).__next__())
    docker("network", "create", "--subnet", overlapping, squatter)
    try:
        moved = bottle_env.doit("start", "agent=clashing", "command=true")
        assert f"subnet {first} is in use; bottle 'clashing' uses " in moved.stdout + moved.stderr
        subnet = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}",
                        plan.network.guest_side.name).stdout.strip()
        assert not ipaddress.ip_network(subnet).overlaps(ipaddress.ip_network(overlapping))
        bottle_env.doit("clean", "agent=clashing", "purge=1")
        bottle_env.write_agent("clashing-pinned", f"routes: []\nnetwork: {{subnet: {first}}}\n")
        out = _failed_start(bottle_env, "clashing-pinned")
        assert f"docker network {squatter!r} already uses {overlapping}" in out, out
        assert "network.subnet" in out and "clashing-pinned.yaml" in out
        assert _leftovers("clashing-pinned") == []
    finally:
        bottle_env.doit("clean", "agent=clashing", "purge=1", check=False)
        docker("network", "rm", squatter, check=False)
