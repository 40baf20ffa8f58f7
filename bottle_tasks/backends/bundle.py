"""What the docker and smolmachines backends share: the bottle's docker networks and the sidecar bundle
container. Only the guest differs (a container fenced from outside its namespace, or a smolvm microVM
whose egress policy admits only the bundle).

A container is current when its fingerprint label matches what would be created now: the bundle's
fingerprint covers its image, its plan and the content of every file it reads (bundle_plan.py's list),
so an edited policy recreates it.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Mapping

from bottle_tasks.backends.base import Backend
from bottle_tasks.backends.host_subnets import drop_claim
from bottle_tasks.bundle_plan import SECRETS_FILE
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import FINGERPRINT_LABEL, SLUG_LABEL
from bottle_tasks.plan import Bridge, Mount, Plan

HEALTH_TIMEOUT = 60.0
# The bundle image's HEALTHCHECK command (images/bundle/Dockerfile), run by hand while docker has no
# verdict yet: docker's first check comes one interval after the start.
HEALTH_COMMAND = ("/opt/bottle/venv/bin/python", "-m", "bottle_tasks.sidecars.health")


def digest_of(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def content_digest(path: Path | None) -> str:
    """A file's bytes, or every file under a directory with its relative name; "-" when absent."""
    if path is None or not path.exists():
        return "-"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        h.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        h.update(file.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def secrets_archive(secrets: Mapping[str, str]) -> bytes:
    """A tar stream holding SECRETS_FILE (root, 0600) with the secret values by variable name."""
    data = json.dumps(dict(sorted(secrets.items()))).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(PurePosixPath(SECRETS_FILE).name)
        info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o600, 0, 0, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def mount_args(mounts: tuple[Mount, ...]) -> list[str]:
    return [arg for mount in mounts for arg in ("--mount", mount.docker_arg())]


def _on_its_subnet(obj: dict, bridge: Bridge) -> bool:
    return [c.get("Subnet") for c in obj["IPAM"]["Config"]] == [bridge.subnet]


class DockerBundle(Backend):
    """Networks and the bundle as docker objects; subclasses bring the guest."""

    # ---- networks ---------------------------------------------------------------------------

    def networks_ready(self, plan: Plan) -> bool:
        for bridge in plan.network.bridges:
            obj = self.docker.inspect("network", bridge.name)
            if obj is None or obj.get("Labels", {}).get(SLUG_LABEL) != plan.slug or not _on_its_subnet(obj, bridge):
                return False
        return True

    def check_subnet_clash(self, plan: Plan) -> None:
        ours = {bridge.name for bridge in plan.network.bridges}
        in_use = self.docker.network_subnets()
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

    def check_names_free(self, plan: Plan, containers: tuple[str, ...]) -> None:
        """Refuse to start when a container or network with one of our names belongs to someone else."""
        for kind, name in (*(("container", c) for c in containers), *(("network", b.name) for b in plan.network.bridges)):
            self.docker.ensure_owned(kind, name, plan.slug, plan.state_dir)

    def check_network_preconditions(self, plan: Plan, containers: tuple[str, ...]) -> None:
        if plan.network.problem:
            raise BottleError(f"{plan.spec_path}: {plan.network.problem}")
        self.check_names_free(plan, containers)
        if not self.networks_ready(plan):
            self.check_subnet_clash(plan)

    def create_networks(self, plan: Plan) -> None:
        self.check_subnet_clash(plan)
        subnets = ", ".join(f"{b.name} {b.subnet}" for b in plan.network.bridges)
        print(f"claude-bottle: bottle {plan.slug}: networks {subnets}" + (f" ({plan.network.note})" if plan.network.note else ""),
              file=sys.stderr)
        created = []
        try:
            for bridge in plan.network.bridges:
                existing = self.docker.ensure_owned("network", bridge.name, plan.slug, plan.state_dir)
                if existing is not None:
                    if _on_its_subnet(existing, bridge):
                        continue
                    self.docker("network", "rm", bridge.name)
                self.docker("network", "create", "--driver", "bridge", *(["--internal"] if bridge.internal else []),
                            "--subnet", bridge.subnet, "--gateway", bridge.gateway,
                            *(["--ip-range", bridge.ip_range] if bridge.ip_range else []),
                            *plan.label_args(f"network-{'internal' if bridge.internal else 'bridge'}"), bridge.name)
                created.append(bridge.name)
        except BaseException:
            for name in created:
                self.docker("network", "rm", name, check=False)
            raise

    def remove_networks(self, plan: Plan) -> None:
        for name in self.docker.by_label("network", plan.slug_label):
            self.docker("network", "rm", name, check=False)
        drop_claim(plan.cache_root, plan.slug)

    # ---- the bundle -------------------------------------------------------------------------

    def bundle_fingerprint(self, plan: Plan) -> str:
        return digest_of(self.docker.image_id(plan.bundle_image.tag), plan.bundle, plan.network,
                         *(content_digest(f.host_path) for f in plan.bundle.files))

    def running_with(self, container: str, fingerprint: str, need_healthy: bool = False) -> bool:
        obj = self.docker.inspect("container", container)
        if obj is None or not obj["State"].get("Running"):
            return False
        if obj["Config"]["Labels"].get(FINGERPRINT_LABEL) != fingerprint:
            return False
        return not need_healthy or self.healthy(container, obj)

    def healthy(self, container: str, obj: dict) -> bool:
        """docker's verdict, or while docker has none yet (the image's HEALTHCHECK runs every 10 s, so
        that many idle bundles cost little), the same check (HEALTH_COMMAND) run now."""
        status = (obj["State"].get("Health") or {}).get("Status")
        if status == "starting":
            return self.docker("exec", container, *HEALTH_COMMAND, check=False).returncode == 0
        return status == "healthy"

    def bundle_ready(self, plan: Plan) -> bool:
        return self.running_with(plan.bundle.name, self.bundle_fingerprint(plan), need_healthy=True)

    def bundle_create_argv(self, plan: Plan) -> list[str]:
        """`docker create` of the bundle. No secret is in it, not even by name: they go in as a file."""
        b, net = plan.bundle, plan.network
        env_args: list[str] = []
        for key, value in b.env:
            env_args += ["--env", f"{key}={value}"]
        return ["create", "--name", b.name, *plan.label_args("bundle"),
                "--label", f"{FINGERPRINT_LABEL}={self.bundle_fingerprint(plan)}",
                "--network", net.guest_side.name, "--ip", net.bundle_ip,
                "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "SETUID", "--cap-add", "SETGID",
                "--cap-add", "DAC_OVERRIDE",  # reads the 0600 CA key owned by the host user
                "--cap-add", "KILL",          # init stops daemons that dropped to another uid (dns, supervise)
                "--security-opt", "no-new-privileges", "--restart", "unless-stopped",
                # A flood the guest aims at a daemon meets the bundle's ceiling, not the host's.
                "--memory", f"{b.memory_mib}m", "--memory-swap", f"{b.memory_mib}m", "--pids-limit", str(b.pids),
                *env_args, *mount_args(b.mounts), plan.bundle_image.tag]

    def start_bundle(self, plan: Plan, secrets: Mapping[str, str]) -> None:
        """(Re)create the bundle and wait until it is healthy; on any failure remove it again."""
        name = plan.bundle.name
        if self.docker.ensure_owned("container", name, plan.slug, plan.state_dir) is not None:
            self.docker("rm", "-f", name)
        try:
            self.docker(*self.bundle_create_argv(plan))
            # Into the container's own filesystem before it first starts, on stdin (never argv, never
            # Config.Env); it survives restarts of the bundle, and init reads it.
            self.docker("cp", "-", f"{name}:{PurePosixPath(SECRETS_FILE).parent}", input=secrets_archive(secrets))
            for bridge in plan.network.bridges[1:]:
                self.docker("network", "connect", bridge.name, name)
            self.docker("start", name)
            self.wait_healthy(name)
        except BaseException:
            self.docker("rm", "-f", name, check=False)
            raise

    def wait_healthy(self, container: str, timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            obj = self.docker.inspect("container", container, fresh=True)
            state = (obj or {}).get("State", {})
            status = (state.get("Health") or {}).get("Status")
            if obj is not None and state.get("Running") and self.healthy(container, obj):
                return
            if not state.get("Running") or time.monotonic() > deadline:
                logs = self.docker.query("logs", "--tail", "30", container, check=False)
                raise BottleError(
                    f"container {container} did not become healthy (state: {state.get('Status')}, health: {status}).\n"
                    f"Last log lines:\n{logs.stdout}{logs.stderr}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def remove_bundle(self, plan: Plan) -> None:
        self.docker.remove_containers([plan.bundle.name])

    def remove_all(self, plan: Plan) -> None:
        self.docker.remove_containers(self.docker.by_label("container", plan.slug_label))
