"""What both backends share: the bottle's docker networks and the sidecar bundle container.

The bundle is a docker container in either backend; only the guest differs (a container fenced from
outside its namespace, or a smolvm microVM whose egress policy admits only the bundle).
"""

from __future__ import annotations

import hashlib
import ipaddress
import sys
import time
from pathlib import Path

from bottle_tasks.docker_cli import by_label, docker, ensure_owned, image_id, inspect, network_subnets, rm_containers
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import LABEL, Bridge, Plan

HEALTH_TIMEOUT = 60.0


# ---- networks ------------------------------------------------------------------------------

def _on_its_subnet(obj: dict, bridge: Bridge) -> bool:
    return [c.get("Subnet") for c in obj["IPAM"]["Config"]] == [bridge.subnet]


def networks_ready(plan: Plan) -> bool:
    for bridge in plan.network.bridges:
        obj = inspect("network", bridge.name)
        if obj is None or obj.get("Labels", {}).get(f"{LABEL}.slug") != plan.slug or not _on_its_subnet(obj, bridge):
            return False
    return True


def check_subnet_clash(plan: Plan) -> None:
    ours = {bridge.name for bridge in plan.network.bridges}
    in_use = network_subnets()
    for bridge in plan.network.bridges:
        wanted = ipaddress.ip_network(bridge.subnet)
        for name, subnets in in_use.items():
            if name in ours:
                continue
            for subnet in subnets:
                if subnet.version == 4 and subnet.overlaps(wanted):
                    raise BottleError(
                        f"bottle {plan.slug!r} needs subnet {wanted}, but docker network {name!r} already uses {subnet}. "
                        f"Set network.subnet in {plan.spec_path} to a free one (e.g. another 10.x.y.0/23), "
                        f"or remove that network, then start again.")


def check_names_free(plan: Plan, containers: tuple[str, ...]) -> None:
    """Refuse to start when a container or network with one of our names belongs to someone else."""
    for kind, name in (*(("container", c) for c in containers), *(("network", b.name) for b in plan.network.bridges)):
        ensure_owned(kind, name, plan)


def create_networks(plan: Plan) -> None:
    check_subnet_clash(plan)
    if plan.network.note:
        print(f"claude-bottle: {plan.network.note}", file=sys.stderr)
    created = []
    try:
        for bridge in plan.network.bridges:
            existing = ensure_owned("network", bridge.name, plan)
            if existing is not None:
                if _on_its_subnet(existing, bridge):
                    continue
                docker("network", "rm", bridge.name)
            docker("network", "create", "--driver", "bridge", *(["--internal"] if bridge.internal else []),
                   "--subnet", bridge.subnet, "--gateway", bridge.gateway,
                   *(["--ip-range", bridge.ip_range] if bridge.ip_range else []),
                   *plan.label_args(f"network-{'internal' if bridge.internal else 'bridge'}"), bridge.name)
            created.append(bridge.name)
    except BaseException:
        for name in created:
            docker("network", "rm", name, check=False)
        raise


def remove_networks(plan: Plan) -> None:
    for name in by_label("network", plan.slug_label):
        docker("network", "rm", name, check=False)


# ---- fingerprints: a container is current when its label matches what we would create now ---

def digest_of(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def file_digest(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.exists() else "-"


def bundle_fingerprint(plan: Plan) -> str:
    return digest_of(image_id(plan.bundle_image.tag), plan.bundle, plan.network,
                   file_digest(plan.routes_file), file_digest(plan.pipelock_file if plan.pipelock_enabled else None),
                   file_digest(plan.ca_cert), file_digest(plan.upstream_ca))


def running_with(container: str, fingerprint: str, need_healthy: bool = False) -> bool:
    obj = inspect("container", container)
    if obj is None or not obj["State"].get("Running"):
        return False
    if need_healthy and (obj["State"].get("Health") or {}).get("Status") != "healthy":
        return False
    return obj["Config"]["Labels"].get(f"{LABEL}.fingerprint") == fingerprint


def bundle_ready(plan: Plan) -> bool:
    return running_with(plan.bundle.container, bundle_fingerprint(plan), need_healthy=True)


# ---- bundle ----------------------------------------------------------------------------------

def start_bundle(plan: Plan, token_env: dict[str, str]) -> None:
    """(Re)create the bundle and wait until it is healthy; on any failure remove it again."""
    b, net = plan.bundle, plan.network
    if ensure_owned("container", b.container, plan) is not None:
        docker("rm", "-f", b.container)
    env_args: list[str] = []
    for key, value in b.env:
        env_args += ["--env", f"{key}={value}"]
    for name in b.secret_env_names:
        env_args += ["--env", name]          # value comes from our environment, never argv
    try:
        docker("create", "--name", b.container, *plan.label_args("bundle"),
               "--label", f"{LABEL}.fingerprint={bundle_fingerprint(plan)}",
               "--network", net.internal_name, "--ip", net.bundle_ip,
               "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "SETUID", "--cap-add", "SETGID",
               "--cap-add", "DAC_OVERRIDE",  # reads the 0600 CA key owned by the host user
               "--security-opt", "no-new-privileges", "--restart", "unless-stopped",
               *env_args, *mount_args(b.mounts), plan.bundle_image.tag, env=token_env)
        if net.egress_name != net.internal_name:
            docker("network", "connect", net.egress_name, b.container)
        docker("start", b.container)
        wait_healthy(b.container)
    except BaseException:
        docker("rm", "-f", b.container, check=False)
        raise


def wait_healthy(container: str, timeout: float = HEALTH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        obj = inspect("container", container)
        state = (obj or {}).get("State", {})
        status = (state.get("Health") or {}).get("Status")
        if status == "healthy":
            return
        if not state.get("Running") or time.monotonic() > deadline:
            logs = docker("logs", "--tail", "30", container, check=False)
            raise BottleError(
                f"container {container} did not become healthy (state: {state.get('Status')}, health: {status}).\n"
                f"Last log lines:\n{logs.stdout}{logs.stderr}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def mount_args(mounts) -> list[str]:
    return [arg for mount in mounts for arg in ("--mount", mount.docker_arg())]


def remove_bundle(plan: Plan) -> None:
    rm_containers([plan.bundle.container])
