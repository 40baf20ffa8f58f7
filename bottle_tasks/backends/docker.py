"""The docker backend: an --internal network shared by guest and bundle, an egress network only the
bundle joins, the guest fenced from outside its network namespace so only the bundle's front door
answers it. backends/smolmachines.py has the same shape."""

from __future__ import annotations

from pathlib import Path

from bottle_tasks.backends.bundle import (  # noqa: F401  (the backend interface both modules expose)
    bundle_ready, check_names_free, check_subnet_clash, create_networks, digest_of, file_digest, mount_args,
    networks_ready, remove_bundle, remove_networks, running_with, start_bundle,
)
from bottle_tasks.docker_cli import by_label, docker, ensure_owned, image_id, inspect, rm_containers
from bottle_tasks.plan import GUEST_USER, GUEST_WORKSPACE, LABEL, Plan
from bottle_tasks.render import render


def preflight(plan: Plan) -> None:
    check_names_free(plan, (plan.guest.container, plan.bundle.container))
    if not networks_ready(plan):
        check_subnet_clash(plan)


def guest_fingerprint(plan: Plan) -> str:
    return digest_of(image_id(plan.agent_image.tag), plan.guest, plan.network, file_digest(plan.guest_env_file))


def guest_ready(plan: Plan) -> bool:
    return running_with(plan.guest.container, guest_fingerprint(plan))


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
    try:
        docker("create", "--name", g.container, *plan.label_args("guest"),
               "--label", f"{LABEL}.fingerprint={guest_fingerprint(plan)}",
               "--network", net.internal_name, "--ip", net.guest_ip,
               # Names the guest looks up go to the bundle's sink, never to the host's resolver.
               "--dns", net.bundle_ip,
               "--sysctl", "net.ipv6.conf.all.disable_ipv6=1",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--env-file", str(plan.guest_env_file), "--workdir", GUEST_WORKSPACE,
               *limits, *mount_args(g.mounts), plan.agent_image.tag, "sleep", "infinity")
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


def remove_guest(plan: Plan) -> None:
    rm_containers([plan.guest.container])


def remove_containers(plan: Plan) -> None:
    rm_containers(by_label("container", plan.slug_label))


def fence_epoch(plan: Plan) -> str | None:
    """What must not change between fencing and use: the fence lives in the container's network
    namespace, which a restart replaces, so it is the start time."""
    obj = inspect("container", plan.guest.container)
    return obj["State"].get("StartedAt") if obj and obj["State"].get("Running") else None


class DockerGuest:
    """The backend-neutral guest handle provisioning and start use: exec, copy, attach."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def exec_argv(self, argv: list[str], *, user: str = GUEST_USER, tty: bool = False,
                  env: dict[str, str] | None = None) -> list[str]:
        flags = ["-i", *(["-t"] if tty else [])]
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        workdir = "/" if user == "root" else GUEST_WORKSPACE     # root never runs from the agent-writable workspace
        return ["docker", "exec", *flags, "-u", user, "-w", workdir, *env_args, self.plan.guest.container, *argv]

    def exec(self, argv: list[str], *, user: str = GUEST_USER, input: str | None = None, check: bool = True):
        return docker(*self.exec_argv(argv, user=user)[1:], input=input, check=check)

    def copy(self, source: Path, dest: str) -> None:
        docker("cp", str(source), f"{self.plan.guest.container}:{dest}")

    def attach_argv(self, argv: list[str], tty: bool) -> list[str]:
        return self.exec_argv(argv, tty=tty)

    def identity(self) -> str | None:
        """Changes when the guest is replaced: provisioning is redone then."""
        obj = inspect("container", self.plan.guest.container)
        return obj["Id"] if obj and obj["State"].get("Running") else None


Guest = DockerGuest
