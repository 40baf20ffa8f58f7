"""The docker backend: an --internal network shared by guest and bundle, an egress network only the
bundle joins, and the guest in a network namespace it does not own.

The namespace belongs to a holder container, as a Kubernetes pod's pause container holds the pod's:
it alone has NET_ADMIN, applies the fence (bottle_tasks/templates/guest-fence*.rules.j2) every time it starts,
before it does anything else, and then only sleeps. The guest joins it (`--network container:`) with no
capabilities. So a restart of the guest (by hand or by the engine) never runs unfenced: the fence lives
with the namespace, not with the guest process; a holder that cannot apply it exits, and the guest
cannot start without it. After an engine restart the holder comes back fenced (restart policy) and the
guest stays down until `doit start`.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from bottle_tasks.backends.base import Guest
from bottle_tasks.backends.host_subnets import HostSubnets, subnets_in_use
from bottle_tasks.backends.bundle import DockerBundle, content_digest, digest_of, mount_args
from bottle_tasks.docker_cli import Docker, labels_of
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import FINGERPRINT_LABEL
from bottle_tasks.plan import GUEST_USER, GUEST_WORKSPACE, Bridge, NetworkPlan, Plan
from bottle_tasks.render import TEMPLATES_DIR, render
from bottle_tasks.runner import Result
from bottle_tasks.settings import Settings
from bottle_tasks.spec import AgentSpec
from bottle_tasks.subnets import bottle_subnet, explicit_subnet, pool_blocks


FENCE_TIMEOUT = 30.0
FENCE_TEMPLATES = ("guest-fence.rules.j2", "guest-fence6.rules.j2")     # IPv4, IPv6
FENCE_MARK = "/run/bottle-fenced"
HOLDER_SCRIPT = ('trap "exit 0" TERM INT; '
                 'printf "%s\\n" "$BOTTLE_FENCE_V4" | iptables-restore && '
                 'printf "%s\\n" "$BOTTLE_FENCE_V6" | ip6tables-restore && '
                 f'touch {FENCE_MARK} && while :; do sleep 86400 & wait $!; done')
# The holder's health is its fence, not the bundle image's check (which needs the daemons it never runs).
HOLDER_HEALTH = ("--health-cmd", f"test -e {FENCE_MARK}", "--health-interval", "5s",
                 "--health-timeout", "2s", "--health-retries", "1", "--health-start-period", "0s")


class DockerBackend(DockerBundle):
    name = "docker"

    @staticmethod
    def network_names(slug: str) -> tuple[str, str]:
        return f"bottle-{slug}-internal", f"bottle-{slug}-egress"

    @classmethod
    def host_facts(cls, slug: str, docker: Docker) -> HostSubnets:
        facts = subnets_in_use(cls.network_names(slug), docker)
        # The bottle's block is the /23 its internal /24 opens.
        block = ipaddress.ip_network(facts.own[0]).supernet(new_prefix=23) if facts.own else None
        return replace(facts, current=str(block) if block else None)

    @classmethod
    def plan_network(cls, slug: str, spec: AgentSpec, settings: Settings, host_facts: Any) -> NetworkPlan:
        note = problem = ""
        if spec.subnet:
            block = explicit_subnet(spec.subnet)
        else:
            facts = host_facts or HostSubnets()
            try:
                block, note = bottle_subnet(slug, settings.subnet_pool, facts.taken, facts.current)
            except BottleError as exc:   # the plan still loads (clean, list); preflight refuses to start
                block, problem = pool_blocks(slug, settings.subnet_pool)[0], str(exc)
        internal, egress = block.subnets(new_prefix=24)
        gateways = (str(internal.network_address + 1), str(egress.network_address + 1))
        names = cls.network_names(slug)
        return NetworkPlan(
            bridges=(Bridge(names[0], str(internal), gateways[0], internal=True),
                     Bridge(names[1], str(egress), gateways[1], internal=False)),
            bundle_ip=str(internal.network_address + 2),
            guest_ip=str(internal.network_address + 3),
            note=note, problem=problem,
        )

    @staticmethod
    def netns_holder(plan: Plan) -> str:
        return f"bottle-{plan.slug}-guestnet"

    def watch_names(self, plan: Plan) -> tuple[str, ...]:
        return (*super().watch_names(plan), self.netns_holder(plan))

    def preflight(self, plan: Plan) -> None:
        self.check_network_preconditions(plan, (plan.guest.name, plan.bundle.name, self.netns_holder(plan)))

    # ---- the namespace holder: the fence ------------------------------------------------------

    def holder_fingerprint(self, plan: Plan) -> str:
        # The rules are a function of the network, the guest ports and the templates: hash those, so a
        # probe of an unchanged start renders nothing (jinja2 stays unimported).
        return digest_of(self.docker.image_id(plan.bundle_image.tag), plan.network, plan.bundle.guest_ports,
                         HOLDER_SCRIPT, HOLDER_HEALTH,
                         *(content_digest(TEMPLATES_DIR / template) for template in FENCE_TEMPLATES))

    @staticmethod
    def fence_rules(plan: Plan) -> tuple[str, str]:
        v4, v6 = FENCE_TEMPLATES
        return render(v4, plan), render(v6, plan)

    def holder_create_argv(self, plan: Plan) -> list[str]:
        net = plan.network
        rules_v4, rules_v6 = self.fence_rules(plan)
        # The rules travel in the holder's own config (they hold no secret), so every start of it,
        # whoever starts it, applies them before anything can use the namespace.
        return ["create", "--name", self.netns_holder(plan), *plan.label_args("fence"),
                "--label", f"{FINGERPRINT_LABEL}={self.holder_fingerprint(plan)}",
                "--network", net.guest_side.name, "--ip", net.guest_ip,
                # Names the guest looks up go to the bundle's sink, never to the host's resolver.
                "--dns", net.bundle_ip, "--sysctl", "net.ipv6.conf.all.disable_ipv6=1",
                "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                "--security-opt", "no-new-privileges", "--restart", "unless-stopped",
                "--memory", "32m", "--pids-limit", "16",
                # /run is fresh at every start, so the mark says this namespace is fenced, not an earlier one.
                "--tmpfs", "/run:size=64k", *HOLDER_HEALTH,
                "--env", f"BOTTLE_FENCE_V4={rules_v4}", "--env", f"BOTTLE_FENCE_V6={rules_v6}",
                "--entrypoint", "/bin/sh", plan.bundle_image.tag, "-c", HOLDER_SCRIPT]

    def holder_ready(self, plan: Plan) -> bool:
        return self.running_with(self.netns_holder(plan), self.holder_fingerprint(plan))

    def start_holder(self, plan: Plan) -> None:
        """(Re)create the holder and wait until it has applied the fence; on failure remove it."""
        name = self.netns_holder(plan)
        if self.docker.ensure_owned("container", name, plan.slug, plan.state_dir) is not None:
            self.docker("rm", "-f", name)
        try:
            self.docker(*self.holder_create_argv(plan))
            self.docker("start", name)
            deadline = time.monotonic() + FENCE_TIMEOUT
            while self.docker("exec", name, "test", "-e", FENCE_MARK, check=False).returncode != 0:
                state = (self.docker.inspect("container", name, fresh=True) or {}).get("State", {})
                if not state.get("Running") or time.monotonic() > deadline:
                    logs = self.docker.query("logs", "--tail", "20", name, check=False)
                    raise BottleError(f"the guest's fence could not be applied in {name} (state: {state.get('Status')}); "
                                      f"the guest was not started.\n{logs.stdout}{logs.stderr}")
                time.sleep(0.05)
        except BaseException:
            self.docker("rm", "-f", name, check=False)
            raise

    # ---- the guest ------------------------------------------------------------------------------

    def guest_fingerprint(self, plan: Plan) -> str:
        return digest_of(self.docker.image_id(plan.agent_image.tag), plan.guest, plan.network,
                         content_digest(plan.guest.env_file.host_path))

    def guest_ready(self, plan: Plan) -> bool:
        holder = self.docker.inspect("container", self.netns_holder(plan))
        guest = self.docker.inspect("container", plan.guest.name)
        # The guest must sit in the current holder's namespace; a recreated holder strands it.
        in_holder = bool(holder and guest and guest["HostConfig"].get("NetworkMode") == f"container:{holder['Id']}")
        return in_holder and self.holder_ready(plan) and self.running_with(plan.guest.name, self.guest_fingerprint(plan))

    def guest_create_argv(self, plan: Plan) -> list[str]:
        g = plan.guest
        limits: list[str] = ["--pids-limit", str(g.pids)]
        if g.cpus:
            limits += ["--cpus", str(g.cpus)]
        if g.memory:
            limits += ["--memory", g.memory]
        return ["create", "--name", g.name, *plan.label_args("guest"),
                "--label", f"{FINGERPRINT_LABEL}={self.guest_fingerprint(plan)}",
                # The holder's namespace (its address, DNS, fence); the guest cannot change it.
                "--network", f"container:{self.netns_holder(plan)}",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--env-file", str(g.env_file.host_path), "--workdir", GUEST_WORKSPACE,
                *limits, *mount_args(g.mounts), plan.agent_image.tag, "sleep", "infinity"]

    def start_guest(self, plan: Plan) -> None:
        name = plan.guest.name
        if self.docker.ensure_owned("container", name, plan.slug, plan.state_dir) is not None:
            self.docker("rm", "-f", name)
        if not self.holder_ready(plan):
            self.start_holder(plan)
        if plan.guest.workspace_volume:
            self.ensure_workspace_volume(plan)
        try:
            self.docker(*self.guest_create_argv(plan))
            self.docker("start", name)
        except BaseException:
            self.docker("rm", "-f", name, check=False)
            raise

    def ensure_workspace_volume(self, plan: Plan) -> None:
        """The workspace volume, labelled with the bottle, so clean and leak checks find it by label
        (docker would make it unlabelled on first mount). One made before volumes were labelled holds
        the bottle's work and is used as it is; one labelled for another bottle is refused."""
        name = plan.guest.workspace_volume
        found = self.docker.inspect("volume", name)
        if found is None:
            self.docker("volume", "create", *plan.label_args("workspace"), name)
        elif labels_of(found):
            self.docker.ensure_owned("volume", name, plan.slug, plan.state_dir)

    def remove_guest(self, plan: Plan) -> None:
        self.docker.remove_containers([plan.guest.name, self.netns_holder(plan)])

    def fence_epoch(self, plan: Plan) -> str | None:
        """The fence lives in the holder's namespace, which a restart of the holder replaces: its start
        time. The guest's own restarts keep the namespace, and with it the fence."""
        obj = self.docker.inspect("container", self.netns_holder(plan))
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
