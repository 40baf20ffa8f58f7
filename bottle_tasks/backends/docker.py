"""The docker backend: an --internal network shared by guest and bundle, an egress network only the
bundle joins, the guest a container fenced from outside its network namespace so only the bundle's
guest ports answer it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from bottle_tasks.backends.base import Guest
from bottle_tasks.backends.bundle import DockerBundle, content_digest, digest_of, mount_args
from bottle_tasks.docker_cli import Docker
from bottle_tasks.labels import FINGERPRINT_LABEL
from bottle_tasks.plan import GUEST_USER, GUEST_WORKSPACE, Bridge, NetworkPlan, Plan
from bottle_tasks.render import render
from bottle_tasks.runner import Result
from bottle_tasks.settings import Settings
from bottle_tasks.spec import AgentSpec
from bottle_tasks.subnets import bottle_subnet


class DockerBackend(DockerBundle):
    name = "docker"

    @classmethod
    def plan_network(cls, slug: str, spec: AgentSpec, settings: Settings, host_facts: Any) -> NetworkPlan:
        internal, egress = bottle_subnet(slug, settings.subnet_pool, spec.subnet).subnets(new_prefix=24)
        gateways = (str(internal.network_address + 1), str(egress.network_address + 1))
        return NetworkPlan(
            bridges=(Bridge(f"bottle-{slug}-internal", str(internal), gateways[0], internal=True),
                     Bridge(f"bottle-{slug}-egress", str(egress), gateways[1], internal=False)),
            bundle_ip=str(internal.network_address + 2),
            guest_ip=str(internal.network_address + 3),
        )

    def preflight(self, plan: Plan) -> None:
        self.check_network_preconditions(plan, (plan.guest.name, plan.bundle.name))

    def guest_fingerprint(self, plan: Plan) -> str:
        return digest_of(self.docker.image_id(plan.agent_image.tag), plan.guest, plan.network,
                         content_digest(plan.guest.env_file.host_path))

    def guest_ready(self, plan: Plan) -> bool:
        return self.running_with(plan.guest.name, self.guest_fingerprint(plan))

    def guest_create_argv(self, plan: Plan) -> list[str]:
        g, net = plan.guest, plan.network
        limits: list[str] = ["--pids-limit", str(g.pids)]
        if g.cpus:
            limits += ["--cpus", str(g.cpus)]
        if g.memory:
            limits += ["--memory", g.memory]
        return ["create", "--name", g.name, *plan.label_args("guest"),
                "--label", f"{FINGERPRINT_LABEL}={self.guest_fingerprint(plan)}",
                "--network", net.guest_side.name, "--ip", net.guest_ip,
                # Names the guest looks up go to the bundle's sink, never to the host's resolver.
                "--dns", net.bundle_ip,
                "--sysctl", "net.ipv6.conf.all.disable_ipv6=1",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--env-file", str(g.env_file.host_path), "--workdir", GUEST_WORKSPACE,
                *limits, *mount_args(g.mounts), plan.agent_image.tag, "sleep", "infinity"]

    def start_guest(self, plan: Plan) -> None:
        name = plan.guest.name
        if self.docker.ensure_owned("container", name, plan.slug, plan.state_dir) is not None:
            self.docker("rm", "-f", name)
        try:
            self.docker(*self.guest_create_argv(plan))
            self.docker("start", name)
            self.fence_guest(plan)
        except BaseException:
            self.docker("rm", "-f", name, check=False)
            raise

    def fence_argvs(self, plan: Plan) -> list[tuple[list[str], str]]:
        """(argv, rules on stdin) for each firewall: a sidecar with NET_ADMIN in the guest's namespace;
        the guest itself holds no capabilities."""
        out = []
        for tool, template in (("iptables-restore", "guest-fence.rules.j2"), ("ip6tables-restore", "guest-fence6.rules.j2")):
            argv = ["run", "--rm", "-i", "--network", f"container:{plan.guest.name}",
                    "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                    *plan.label_args("fence"), "--entrypoint", tool, plan.bundle_image.tag]
            out.append((argv, render(template, plan)))
        return out

    def fence_guest(self, plan: Plan) -> None:
        for argv, rules in self.fence_argvs(plan):
            self.docker(*argv, input=rules)

    def remove_guest(self, plan: Plan) -> None:
        self.docker.remove_containers([plan.guest.name])

    def fence_epoch(self, plan: Plan) -> str | None:
        """The fence lives in the container's network namespace, which a restart replaces: the start time."""
        obj = self.docker.inspect("container", plan.guest.name)
        return obj["State"].get("StartedAt") if obj and obj["State"].get("Running") else None

    def guest(self, plan: Plan) -> "DockerGuest":
        return DockerGuest(plan, self.docker)


class DockerGuest(Guest):
    def __init__(self, plan: Plan, docker: Docker) -> None:
        self.plan = plan
        self.docker = docker

    def exec_argv(self, argv: list[str], *, user: str = GUEST_USER, tty: bool = False,
                  env: Mapping[str, str] | None = None) -> list[str]:
        flags = ["-i", *(["-t"] if tty else [])]
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        workdir = "/" if user == "root" else GUEST_WORKSPACE     # root never runs from the agent-writable workspace
        return [self.docker.binary, "exec", *flags, "-u", user, "-w", workdir, *env_args, self.plan.guest.name, *argv]

    def exec(self, argv: list[str], *, user: str = GUEST_USER, input: str | None = None, check: bool = True) -> Result:
        return self.docker(*self.exec_argv(argv, user=user)[1:], input=input, check=check)

    def copy(self, source: Path, dest: str) -> None:
        self.docker("cp", str(source), f"{self.plan.guest.name}:{dest}")

    def attach_argv(self, argv: list[str], tty: bool) -> list[str]:
        return self.exec_argv(argv, tty=tty)

    def identity(self) -> str | None:
        obj = self.docker.inspect("container", self.plan.guest.name)
        return obj["Id"] if obj and obj["State"].get("Running") else None
