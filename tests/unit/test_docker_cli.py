"""The docker client: argv shapes, the per-run inspect cache and its invalidation, ownership, daemon-down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bottle_tasks.docker_cli import Docker, DockerUnreachable
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import SLUG_LABEL, STATE_LABEL
from tests.unit.fakes import FakeRunner

GUEST = {"Name": "/bottle-x-guest", "State": {"Running": True}, "Config": {"Labels": {}}, "Id": "c1"}
IMAGE = {"RepoTags": ["claude-bottle/agent:x"], "Id": "sha256:abc"}


def _inspect_all(argv):
    objects = {"bottle-x-guest": GUEST, "claude-bottle/agent:x": IMAGE}
    return 0, json.dumps([objects[n] for n in argv[2:] if n in objects]), ""


def test_watched_names_are_inspected_once_for_the_whole_run():
    runner = FakeRunner({("docker", "inspect"): _inspect_all})
    docker = Docker(runner)
    docker.watch("bottle-x-guest", "bottle-x-bundle", "claude-bottle/agent:x")
    assert docker.inspect("container", "bottle-x-guest")["Id"] == "c1"
    assert docker.inspect("container", "bottle-x-bundle") is None
    assert docker.image_id("claude-bottle/agent:x") == "sha256:abc"
    # Kinds are told apart: an image is not a container.
    assert docker.inspect("container", "claude-bottle/agent:x") is None
    assert runner.calls == [["docker", "inspect", "bottle-x-guest", "bottle-x-bundle", "claude-bottle/agent:x"]]


def test_a_command_through_the_client_drops_the_cache_and_a_query_keeps_it():
    runner = FakeRunner({("docker", "inspect"): _inspect_all})
    docker = Docker(runner)
    docker.watch("bottle-x-guest")
    docker.inspect("container", "bottle-x-guest")
    docker.query("logs", "bottle-x-guest")
    docker.inspect("container", "bottle-x-guest")
    assert len(runner.commands("docker", "inspect")) == 1
    docker("rm", "-f", "bottle-x-guest")
    docker.inspect("container", "bottle-x-guest")
    assert len(runner.commands("docker", "inspect")) == 2


def test_fresh_and_unwatched_inspects_ask_the_engine_each_time():
    runner = FakeRunner({("docker", "container", "inspect"): (0, json.dumps([GUEST]), ""),
                         ("docker", "network", "inspect"): (1, "", "Error: No such network: n")})
    docker = Docker(runner)
    docker.watch("bottle-x-guest")
    assert docker.inspect("container", "bottle-x-guest", fresh=True)["Id"] == "c1"
    assert docker.inspect("container", "bottle-x-guest", fresh=True)["Id"] == "c1"
    assert docker.inspect("network", "n") is None
    assert runner.calls == [["docker", "container", "inspect", "bottle-x-guest"]] * 2 + [["docker", "network", "inspect", "n"]]


def test_an_engine_that_does_not_answer_is_named_with_the_fix():
    down = (1, "", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?")
    docker = Docker(FakeRunner({("docker",): down}))
    with pytest.raises(DockerUnreachable, match="start the Docker engine"):
        docker("ps")
    with pytest.raises(DockerUnreachable):
        docker.query("ps", check=False)


def test_label_selection_argv():
    runner = FakeRunner({("docker", "ps"): (0, "a\nb\n", ""), ("docker", "network", "ls"): (0, "n1\n", "")})
    docker = Docker(runner)
    assert docker.by_label("container", "dev.claude-bottle.slug=x") == ["a", "b"]
    assert docker.by_label("network", "dev.claude-bottle.slug=x") == ["n1"]
    assert runner.calls == [
        ["docker", "ps", "-a", "--filter", "label=dev.claude-bottle.slug=x", "--format", "{{.Names}}"],
        ["docker", "network", "ls", "--filter", "label=dev.claude-bottle.slug=x", "--format", "{{.Name}}"]]


@pytest.mark.parametrize("labels,refused", [
    ({SLUG_LABEL: "x", STATE_LABEL: "/state/x"}, False),
    ({SLUG_LABEL: "x", STATE_LABEL: "/elsewhere/x"}, True),       # another checkout's bottle of the same name
    ({}, True),                                                  # not ours at all
])
def test_ownership_is_slug_and_state_dir(labels, refused):
    obj = {**GUEST, "Config": {"Labels": labels}}
    docker = Docker(FakeRunner({("docker", "container", "inspect"): (0, json.dumps([obj]), "")}))
    if refused:
        with pytest.raises(BottleError, match=r"docker container 'bottle-x-guest' already exists.*docker container rm bottle-x-guest"):
            docker.ensure_owned("container", "bottle-x-guest", "x", Path("/state/x"))
    else:
        assert docker.ensure_owned("container", "bottle-x-guest", "x", Path("/state/x"))["Id"] == "c1"


def test_a_network_removed_between_ls_and_inspect_is_listed_again():
    attempts = []

    def inspect(argv):
        attempts.append(argv)
        if len(attempts) == 1:
            return 1, "", "Error: No such network: gone"
        return 0, json.dumps([{"Name": "kept", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24"}]}}]), ""

    docker = Docker(FakeRunner({("docker", "network", "ls"): (0, "id1\nid2\n", ""),
                                ("docker", "network", "inspect"): inspect}))
    assert {k: [str(s) for s in v] for k, v in docker.network_subnets().items()} == {"kept": ["10.1.0.0/24"]}
    assert len(attempts) == 2
