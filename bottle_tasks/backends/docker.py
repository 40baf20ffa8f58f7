"""The docker backend: an --internal network shared by guest and bundle, an egress network only the
bundle joins, the guest fenced from outside its network namespace so only the bundle's front door
answers it."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from pathlib import Path

from bottle_tasks.docker_cli import by_label, docker, ensure_owned, image_id, inspect, network_subnets, rm_containers
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import DNS_PORT, EGRESS_PORT, GUEST_USER, GUEST_WORKSPACE, LABEL, Plan
from bottle_tasks.render import render

HEALTH_TIMEOUT = 60.0


# ---- networks ------------------------------------------------------------------------------

def networks_ready(plan: Plan) -> bool:
    net = plan.network
    for name, subnet in ((net.internal_name, net.internal_subnet), (net.egress_name, net.egress_subnet)):
        obj = inspect("network", name)
        if obj is None or obj.get("Labels", {}).get(f"{LABEL}.slug") != plan.slug:
            return False
        if [c.get("Subnet") for c in obj["IPAM"]["Config"]] != [subnet]:
            return False
    return True


def check_subnet_clash(plan: Plan) -> None:
    ours = {plan.network.internal_name, plan.network.egress_name}
    wanted = ipaddress.ip_network(plan.network.internal_subnet).supernet(new_prefix=23)
    for name, subnets in network_subnets().items():
        if name in ours:
            continue
        for subnet in subnets:
            if subnet.version == 4 and subnet.overlaps(wanted):
                raise BottleError(
                    f"bottle {plan.slug!r} needs subnet {wanted}, but docker network {name!r} already uses {subnet}. "
                    f"Set network.subnet in {plan.spec_path} to a free /23 (e.g. another 10.x.y.0/23), "
                    f"or remove that network, then start again.")


def check_names_free(plan: Plan) -> None:
    """Refuse to start when a container or network with one of our names belongs to someone else."""
    for kind, name in (("container", plan.guest.container), ("container", plan.bundle.container),
                       ("network", plan.network.internal_name), ("network", plan.network.egress_name)):
        ensure_owned(kind, name, plan)


def preflight(plan: Plan) -> None:
    check_names_free(plan)
    if not networks_ready(plan):
        check_subnet_clash(plan)


def create_networks(plan: Plan) -> None:
    net = plan.network
    check_subnet_clash(plan)
    created = []
    try:
        for name, subnet, gateway, internal in (
            (net.internal_name, net.internal_subnet, net.internal_gateway, True),
            (net.egress_name, net.egress_subnet, net.egress_gateway, False),
        ):
            existing = ensure_owned("network", name, plan)
            if existing is not None:
                if [c.get("Subnet") for c in existing["IPAM"]["Config"]] == [subnet]:
                    continue
                docker("network", "rm", name)
            docker("network", "create", "--driver", "bridge", *(["--internal"] if internal else []),
                   "--subnet", subnet, "--gateway", gateway, *plan.label_args(f"network-{'internal' if internal else 'egress'}"),
                   name)
            created.append(name)
    except BaseException:
        for name in created:
            docker("network", "rm", name, check=False)
        raise


def remove_networks(plan: Plan) -> None:
    for name in by_label("network", plan.slug_label):
        docker("network", "rm", name, check=False)


# ---- fingerprints: a container is current when its label matches what we would create now ---

def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _file_digest(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.exists() else "-"


def bundle_fingerprint(plan: Plan) -> str:
    return _digest(image_id(plan.bundle_image.tag), plan.bundle, plan.network,
                   _file_digest(plan.routes_file), _file_digest(plan.pipelock_file if plan.pipelock_enabled else None),
                   _file_digest(plan.ca_cert), _file_digest(plan.upstream_ca))


def guest_fingerprint(plan: Plan) -> str:
    return _digest(image_id(plan.agent_image.tag), plan.guest, plan.network, _file_digest(plan.guest_env_file))


def _running_with(container: str, fingerprint: str, need_healthy: bool = False) -> bool:
    obj = inspect("container", container)
    if obj is None or not obj["State"].get("Running"):
        return False
    if need_healthy and (obj["State"].get("Health") or {}).get("Status") != "healthy":
        return False
    return obj["Config"]["Labels"].get(f"{LABEL}.fingerprint") == fingerprint


def bundle_ready(plan: Plan) -> bool:
    return _running_with(plan.bundle.container, bundle_fingerprint(plan), need_healthy=True)


def guest_ready(plan: Plan) -> bool:
    return _running_with(plan.guest.container, guest_fingerprint(plan))


def _mount_args(mounts) -> list[str]:
    return [arg for mount in mounts for arg in ("--mount", mount.docker_arg())]


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
    mount_args = _mount_args(b.mounts)
    try:
        docker("create", "--name", b.container, *plan.label_args("bundle"),
               "--label", f"{LABEL}.fingerprint={bundle_fingerprint(plan)}",
               "--network", net.internal_name, "--ip", net.bundle_ip,
               "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "SETUID", "--cap-add", "SETGID",
               "--cap-add", "DAC_OVERRIDE",  # reads the 0600 CA key owned by the host user
               "--security-opt", "no-new-privileges", "--restart", "unless-stopped",
               *env_args, *mount_args, plan.bundle_image.tag, env=token_env)
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


# ---- guest -----------------------------------------------------------------------------------

def start_guest(plan: Plan) -> None:
    g, net = plan.guest, plan.network
    if ensure_owned("container", g.container, plan) is not None:
        docker("rm", "-f", g.container)
    limits: list[str] = ["--pids-limit", str(g.pids)]
    if g.cpus:
        limits += ["--cpus", str(g.cpus)]
    if g.memory:
        limits += ["--memory", g.memory]
    mount_args = _mount_args(g.mounts)
    try:
        docker("create", "--name", g.container, *plan.label_args("guest"),
               "--label", f"{LABEL}.fingerprint={guest_fingerprint(plan)}",
               "--network", net.internal_name, "--ip", net.guest_ip,
               # Names the guest looks up go to the bundle's sink, never to the host's resolver.
               "--dns", net.bundle_ip,
               "--sysctl", "net.ipv6.conf.all.disable_ipv6=1",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--env-file", str(plan.guest_env_file), "--workdir", GUEST_WORKSPACE,
               *limits, *mount_args, plan.agent_image.tag, "sleep", "infinity")
        docker("start", plan.guest.container)
        fence_guest(plan)
    except BaseException:
        docker("rm", "-f", g.container, check=False)
        raise


def fence_guest(plan: Plan) -> None:
    """Firewall the guest's network namespace from a sidecar that holds NET_ADMIN; the guest does not."""
    rules = render("guest-fence.rules.j2", plan)
    for tool, text in (("iptables-restore", rules), ("ip6tables-restore", render("guest-fence6.rules.j2", plan))):
        docker("run", "--rm", "-i", "--network", f"container:{plan.guest.container}",
               "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
               *plan.label_args("fence"), "--entrypoint", tool, plan.bundle_image.tag, input=text)


def exec_argv(plan: Plan, argv: list[str], *, user: str = GUEST_USER, tty: bool = False, interactive: bool = True) -> list[str]:
    flags = ["-i"] if interactive else []
    if tty:
        flags.append("-t")
    return ["docker", "exec", *flags, "-u", user, "-w", GUEST_WORKSPACE, plan.guest.container, *argv]


def exec_in_guest(plan: Plan, argv: list[str], *, user: str = GUEST_USER, input: str | None = None, check: bool = True):
    return docker(*exec_argv(plan, argv, user=user)[1:], input=input, check=check)


def copy_into_guest(plan: Plan, source: Path, dest: str) -> None:
    docker("cp", str(source), f"{plan.guest.container}:{dest}")


def remove_containers(plan: Plan) -> None:
    rm_containers(by_label("container", plan.slug_label))


def guest_started_at(plan: Plan) -> str | None:
    obj = inspect("container", plan.guest.container)
    return obj["State"].get("StartedAt") if obj and obj["State"].get("Running") else None


def guest_container_id(plan: Plan) -> str | None:
    obj = inspect("container", plan.guest.container)
    return obj["Id"] if obj and obj["State"].get("Running") else None


def describe(plan: Plan) -> str:
    return json.dumps({"guest": plan.guest.container, "bundle": plan.bundle.container,
                       "egress": f"{plan.network.bundle_ip}:{EGRESS_PORT}", "dns": f"{plan.network.bundle_ip}:{DNS_PORT}"})


class DockerGuest:
    """The backend-neutral guest handle provisioning uses: exec, copy, attach."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def exec(self, argv: list[str], *, user: str = GUEST_USER, input: str | None = None, check: bool = True):
        return exec_in_guest(self.plan, argv, user=user, input=input, check=check)

    def copy(self, source: Path, dest: str) -> None:
        copy_into_guest(self.plan, source, dest)

    def attach_argv(self, argv: list[str], tty: bool) -> list[str]:
        return exec_argv(self.plan, argv, tty=tty)

    def container_id(self) -> str | None:
        return guest_container_id(self.plan)
