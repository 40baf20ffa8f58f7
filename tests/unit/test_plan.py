"""The plan is pure: same inputs, same plan; names, labels, addresses and env derive from the slug."""

import ipaddress
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from bottle_tasks.errors import BottleError
from bottle_tasks.backends.smolmachines import HostSubnets
from bottle_tasks.bundle_plan import EGRESS_PORT
from bottle_tasks.labels import LABEL
from bottle_tasks.plan import GUEST_PROMPT_PATH, hook_matcher, make_plan
from bottle_tasks.subnets import bottle_subnet, explicit_subnet
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.spec import load_spec


def settings(tmp_path: Path, **env) -> Settings:
    base = {"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
            "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), "BOTTLE_PIPELOCK_BIN": "/usr/bin/pipelock-test"}
    return Settings.from_env({**base, **env})


@pytest.fixture
def plan(tmp_path):
    return make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path))


def test_plan_is_frozen_and_deterministic(tmp_path, plan):
    again = make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path))
    assert again == plan
    with pytest.raises(FrozenInstanceError):
        plan.slug = "other"


def test_names_and_labels_derive_from_the_slug(plan, tmp_path):
    assert plan.slug == "example"
    assert plan.guest.name == "bottle-example-guest"
    assert plan.bundle.name == "bottle-example-bundle"
    assert plan.network.guest_side.name == "bottle-example-internal"
    assert plan.network.outbound.name == "bottle-example-egress"
    assert plan.guest.workspace_volume == "bottle-example-workspace"
    assert dict(plan.labels)[f"{LABEL}.slug"] == "example"
    assert dict(plan.labels)[f"{LABEL}.state"] == str(tmp_path / "state" / "example")
    assert plan.label_args("guest")[-1] == f"{LABEL}.role=guest"


def test_addresses_live_in_one_slug_derived_slash_23(plan):
    net = plan.network
    internal = ipaddress.ip_network(net.guest_side.subnet)
    egress = ipaddress.ip_network(net.outbound.subnet)
    assert internal.supernet(new_prefix=23) == egress.supernet(new_prefix=23)
    assert internal != egress
    assert ipaddress.ip_address(net.bundle_ip) == internal.network_address + 2
    assert ipaddress.ip_address(net.guest_ip) == internal.network_address + 3
    assert internal.subnet_of(ipaddress.ip_network("10.243.0.0/16"))


def test_subnets_differ_between_agents_and_skip_the_reserved_range():
    (a, _), (b, _) = bottle_subnet("alpha", "10.243.0.0/16"), bottle_subnet("beta", "10.243.0.0/16")
    assert a != b
    # A pool that is only the reserved /23 has nothing to offer.
    with pytest.raises(BottleError):
        bottle_subnet("x", "192.168.16.0/23")
    assert bottle_subnet("x", "192.168.16.0/22") == (ipaddress.ip_network("192.168.18.0/23"), "")


def test_the_pool_allocator_steps_around_every_subnet_in_use_and_says_which_it_chose():
    first, note = bottle_subnet("alpha", "10.243.0.0/16")
    assert note == ""
    # Every /23 but one taken (by docker networks, host routes or other bottles' claims): alpha gets that one.
    blocks = list(ipaddress.ip_network("10.243.0.0/16").subnets(new_prefix=23))
    free = blocks[77]
    chosen, note = bottle_subnet("alpha", "10.243.0.0/16", [b for b in blocks if b != free])
    assert chosen == free and f"subnet {first} is in use; bottle 'alpha' uses {free} instead" == note
    # A /24 inside a block takes the whole block out.
    taken = [ipaddress.ip_network(f"{first.network_address + 256}/24")]
    assert bottle_subnet("alpha", "10.243.0.0/16", taken)[0] != first
    # The bottle keeps the subnet it has while nothing else overlaps it.
    assert bottle_subnet("alpha", "10.243.0.0/16", [first], str(free)) == (
        free, f"bottle 'alpha' keeps its subnet {free} (first choice {first} was in use when it was made)")
    with pytest.raises(BottleError, match="no free subnet in BOTTLE_SUBNET_POOL 10.243.0.0/16"):
        bottle_subnet("alpha", "10.243.0.0/16", [ipaddress.ip_network("10.243.0.0/16")])


def test_explicit_subnet_wins_and_host_bits_are_refused():
    assert explicit_subnet("10.9.8.0/23") == ipaddress.ip_network("10.9.8.0/23")
    with pytest.raises(BottleError, match="write 10.9.8.0/23"):
        explicit_subnet("10.9.9.0/23")


def test_guest_env_points_every_client_at_egress_and_the_ca(plan):
    env = dict(plan.guest.env)
    proxy = f"http://{plan.network.bundle_ip}:{EGRESS_PORT}"
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        assert env[key] == proxy
    assert env["NO_PROXY"] == "" and env["no_proxy"] == ""
    for key in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO"):
        assert env[key]
    assert env["ANTHROPIC_API_KEY"] == "bottle-placeholder-ANTHROPIC_API_KEY"


def test_tokens_are_passed_to_the_bundle_by_name_only(plan):
    assert plan.bundle.secret_env_names == ("ANTHROPIC_API_KEY",)
    assert all(key != "ANTHROPIC_API_KEY" for key, _ in plan.bundle.env)


def test_claude_gets_the_prompt_file_appended(plan, tmp_path):
    assert plan.guest.command == ("claude", "--append-system-prompt-file", GUEST_PROMPT_PATH)
    spec = replace(load_spec(ROOT / "agents" / "example.yaml"), command=("bash", "-lc", "true"))
    assert make_plan(spec, settings(tmp_path)).guest.command == ("bash", "-lc", "true")


def test_pipelock_daemon_only_when_its_binary_is_known(tmp_path):
    spec = load_spec(ROOT / "agents" / "example.yaml")
    with_pl = make_plan(spec, settings(tmp_path))
    assert with_pl.bundle.daemon_names == ("audit", "egress", "pipelock", "dns")
    without = make_plan(spec, replace(settings(tmp_path), pipelock_bin=None))
    assert without.bundle.daemon_names == ("audit", "egress", "dns")
    assert not any(m.target.endswith("pipelock.yaml") for m in without.bundle.mounts)


def test_host_path_workspace_is_an_explicit_bind_mount(tmp_path):
    (tmp_path / "agents").mkdir()
    (tmp_path / "work").mkdir()
    path = tmp_path / "agents" / "dev.yaml"
    path.write_text("workspace: {host_path: ../work}\n")
    plan = make_plan(load_spec(path), settings(tmp_path))
    assert plan.guest.workspace_volume is None
    (mount,) = plan.guest.mounts
    assert mount.source == str((tmp_path / "work").resolve()) and not mount.readonly and not mount.volume


def test_paths_split_state_that_is_kept_from_cache_that_is_not(plan, tmp_path):
    assert plan.ca_key.is_relative_to(tmp_path / "state" / "example")
    assert plan.agent_image.iid_file.is_relative_to(tmp_path / "cache")
    assert plan.bundle_image.iid_file.is_relative_to(tmp_path / "cache")


def test_smolmachines_plan_one_bridge_bundle_at_2_and_a_root_exec_image(tmp_path):
    spec = load_spec(ROOT / "agents" / "example.yaml")
    taken = HostSubnets((ipaddress.ip_network("10.0.0.0/8"),))
    plan = make_plan(spec, settings(tmp_path, BOTTLE_BACKEND="smolmachines"), taken)
    assert plan == make_plan(spec, settings(tmp_path, BOTTLE_BACKEND="smolmachines"), taken)
    net = plan.network
    (bridge,) = net.bridges
    subnet = ipaddress.ip_network(bridge.subnet)
    assert bridge == net.guest_side == net.outbound and bridge.name == "bottle-example-bridge" and not bridge.internal
    assert subnet.subnet_of(ipaddress.ip_network("192.168.0.0/16")) and subnet.prefixlen == 24
    assert (net.guest_side.gateway, net.bundle_ip) == (str(subnet.network_address + 1), str(subnet.network_address + 2))
    # docker hands out dynamic addresses from the upper half only, never the bundle's pinned .2
    assert ipaddress.ip_address(net.bundle_ip) not in ipaddress.ip_network(bridge.ip_range)
    assert ipaddress.ip_network(bridge.ip_range).subnet_of(subnet)
    assert plan.bundle.egress_url == f"http://{net.bundle_ip}:{EGRESS_PORT}"
    assert ("EXEC_USER", "root") in plan.agent_image.build_args
    assert plan.guest.workspace_volume is None and plan.guest.mounts[0].source == str(plan.state_dir / "workspace")
    assert plan.image_pipeline is not None and plan.image_pipeline.packs_dir.is_relative_to(tmp_path / "cache")
    # Taking the first choice moves the bridge, and the plan says why.
    moved = make_plan(spec, settings(tmp_path, BOTTLE_BACKEND="smolmachines"), HostSubnets((*taken.taken, subnet)))
    assert moved.network.guest_side.subnet != bridge.subnet and bridge.subnet in moved.network.note


def test_docker_plan_keeps_two_bridges_and_the_agent_user(plan):
    assert [(b.name, b.internal) for b in plan.network.bridges] == [
        ("bottle-example-internal", True), ("bottle-example-egress", False)]
    assert not any(key == "EXEC_USER" for key, _ in plan.agent_image.build_args)


def test_hook_matcher_names_exactly_the_supervised_tools():
    assert hook_matcher(("Bash(git push:*)", "WebFetch", "Bash(npm publish)", "mcp__gh")) == "Bash|WebFetch|mcp__gh__.*"
    assert hook_matcher(("Read(~/x)", "*")) == "*"


def test_start_says_which_agent_file_it_read_and_where_each_host_token_goes(tmp_path):
    from bottle_tasks.tasks.bottle import agent_line

    path = tmp_path / "two-tokens.yaml"
    path.write_text("routes:\n"
                    "  - {host: api.anthropic.com, token: {env: ANTHROPIC_API_KEY, header: x-api-key}}\n"
                    "  - {host: api.github.com, token: {env: GH_TOKEN, header: authorization, format: 'Bearer {value}'}}\n"
                    "  - {host: registry.npmjs.org}\n")
    line = agent_line(make_plan(load_spec(path), settings(tmp_path)))
    assert line == (f"agent two-tokens: {path} (host tokens: ANTHROPIC_API_KEY -> api.anthropic.com, "
                    "GH_TOKEN -> api.github.com)")
    offline = tmp_path / "offline.yaml"
    offline.write_text("routes: []\n")
    assert agent_line(make_plan(load_spec(offline), settings(tmp_path))).endswith("(host tokens: none)")
