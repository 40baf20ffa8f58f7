"""The smolmachines backend: the bundle on a per-bottle docker bridge (pinned at .2), the guest a smolvm
microVM created from the agent's pack, whose egress policy admits only the bundle.

smolvm 0.8.x dropped `--allow-cidr` for `create --from`, and no smolvm output shows a machine's CIDRs,
so after every start the fence is checked twice before anything runs in the guest: the stored policy
(smolvm's state DB, reference/smolvm-1.9.md §3a) and a canary dial from inside the guest to an address
the bottle owns outside the allowlist.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import sqlite3
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from bottle_tasks.backends.base import Guest
from bottle_tasks.backends.bundle import DockerBundle, content_digest, digest_of
from bottle_tasks.backends.host_subnets import HostSubnets, subnets_in_use
from bottle_tasks.bundle_plan import EGRESS_PORT
from bottle_tasks.docker_cli import Docker, refuse_unless_owned
from bottle_tasks.errors import BottleError
from bottle_tasks.labels import FINGERPRINT_LABEL, ROLE_LABEL
from bottle_tasks.plan import GUEST_AGENT_UID, GUEST_USER, GUEST_WORKSPACE, Bridge, ImagePlan, NetworkPlan, Plan
from bottle_tasks.runner import CommandError, Result, ToolMissing, run
from bottle_tasks.settings import Settings
from bottle_tasks.spec import AgentSpec
from bottle_tasks.subnets import bridge_candidates, bridge_subnet, explicit_subnet

MIN_SMOLVM = (1, 9, 0)   # 1.8.0 keeps --allow-cidr for create --from (PR #892); 1.9.0 brings cp into the workload
CANARY_TIMEOUT = 1.0     # a blocked dial must time out; an open one completes in milliseconds
# The guest's own address on smolvm's virtio-net gateway (reference/smolvm-1.9.md §6).
GUEST_IP = "100.96.0.2"


# ---- smolvm itself ---------------------------------------------------------------------------

def smolvm_version(smolvm: str) -> tuple[int, int, int]:
    out = run([smolvm, "--version"]).stdout.strip()
    match = re.match(r"^smolvm (\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise BottleError(f"cannot read the smolvm version from {out!r} ({smolvm} --version)")
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


def require_smolvm(smolvm: str) -> None:
    version = smolvm_version(smolvm)
    shown = ".".join(map(str, version))
    if version < (1, 8, 0):
        raise BottleError(
            f"smolvm {shown} is older than 1.8.0: its `machine create --from` silently drops --allow-cidr, so the "
            "guest would run unfenced. Install smolvm 1.9.0 or newer (or set BOTTLE_SMOLVM_BIN).")
    if version < MIN_SMOLVM:
        raise BottleError(
            f"smolvm {shown} is older than 1.9.0: its `machine cp` has no --mode and does not copy into an image "
            "machine's workload, so the CA, prompt and skills would not land. Install smolvm 1.9.0 or newer "
            "(or set BOTTLE_SMOLVM_BIN).")


def _not_found(result: Result, name: str) -> bool:
    """smolvm's own words for an unknown machine, not any 'not found' (a missing launcher says that too)."""
    return f"vm not found: {name}" in result.stderr or f"machine '{name}' not found" in result.stderr


class Smolvm:
    """The smolvm CLI for one run: `machine status` answers are cached per machine until a command
    through this client (create, start, delete, exec, cp) may have changed them."""

    def __init__(self, binary: str, runner: Callable[..., Result] = run) -> None:
        self.binary = binary
        self._run = runner
        self._status: dict[str, dict | None] = {}

    def __call__(self, *args: str, check: bool = True, input: str | None = None, timeout: float | None = None) -> Result:
        self._status.clear()
        return self._run([self.binary, *args], check=check, input=input, timeout=timeout)

    def status(self, name: str) -> dict | None:
        """`machine status --json`, or None when there is no such machine."""
        if name not in self._status:
            result = self._run([self.binary, "machine", "status", "--name", name, "--json"], check=False)
            if result.ok:
                try:
                    self._status[name] = json.loads(result.stdout)
                except ValueError:
                    raise BottleError(f"smolvm machine status --name {name} --json printed no JSON: "
                                      f"{result.stdout[:200]!r}") from None
            elif _not_found(result, name):
                self._status[name] = None
            else:
                raise CommandError(result.argv, result.returncode, result.stderr)
        return self._status[name]

    def machines(self) -> list[dict]:
        """`machine ls --json`: every machine smolvm knows, in one call (doit status asks for all bottles at once)."""
        result = self._run([self.binary, "machine", "ls", "--json"], check=False, timeout=60)
        if not result.ok:
            raise CommandError(result.argv, result.returncode, result.stderr)
        try:
            listed = json.loads(result.stdout)
        except ValueError:
            listed = None
        if not isinstance(listed, list):
            raise BottleError(f"{self.binary} machine ls --json printed no JSON list: {result.stdout[:200]!r}")
        return [machine for machine in listed if isinstance(machine, dict)]

    def delete(self, name: str) -> None:
        result = self("machine", "delete", "--name", name, "-f", check=False)
        if not result.ok and not _not_found(result, name):
            raise CommandError(result.argv, result.returncode, result.stderr)


# ---- the image pipeline: docker save -> throwaway registry -> crane push -> smolvm pack ----------

@dataclass(frozen=True)
class SmolPackPipeline:
    """How the agent image becomes a smolvm pack (tasks/smol_images.py runs it)."""
    registry_image: ImagePlan
    registry_container: str
    registry_port_file: Path           # the host port docker picked, for this run only
    repository: str                    # <registry>/<repository>:<digest tag>
    tarball_dir: Path                  # per-digest docker save output; removed once pushed
    packs_dir: Path                    # <packs_dir>/<digest16> (+ .smolmachine), cached across runs
    smolvm: str
    crane: str


def image_digest(plan: Plan) -> str:
    iid = plan.agent_image.iid_file
    if not iid.exists():
        raise BottleError(f"no digest for {plan.agent_image.tag} yet ({iid}); run doit image_build:{plan.agent} first")
    return iid.read_text().strip()


def digest_key(digest: str) -> str:
    return digest.split(":", 1)[-1][:16]


def pack_path(plan: Plan, digest: str) -> Path:
    """The pack stub; smolvm writes the sidecar next to it as <stub>.smolmachine."""
    return plan.image_pipeline.packs_dir / digest_key(digest)


def current_pack(plan: Plan) -> Path:
    stub = pack_path(plan, image_digest(plan))
    if not stub.with_name(stub.name + ".smolmachine").exists():
        raise BottleError(f"no pack for {plan.agent_image.tag} yet ({stub}.smolmachine); run doit smol_pack:{plan.slug}")
    return stub


# ---- networks: one bridge, chosen around what the host already uses -----------------------------

def bridge_name(slug: str) -> str:
    return f"bottle-{slug}-bridge"


def bridge_network(slug: str, subnet: ipaddress.IPv4Network, note: str = "", problem: str = "") -> NetworkPlan:
    gateway, bundle_ip = str(subnet.network_address + 1), str(subnet.network_address + 2)
    # Dynamic addresses come from the upper half, so nothing else ever takes the bundle's .2.
    ip_range = str(list(subnet.subnets(new_prefix=subnet.prefixlen + 1))[1])
    return NetworkPlan(bridges=(Bridge(bridge_name(slug), str(subnet), gateway, internal=False, ip_range=ip_range),),
                       bundle_ip=bundle_ip, guest_ip=GUEST_IP, note=note, problem=problem)


# ---- the machine ---------------------------------------------------------------------------------

def machine_create_argv(smolvm: str, name: str, pack_stub: Path, bundle_ip: str, env: Mapping[str, str], *,
                        labels: Mapping[str, str] | None = None, cpus: int | None = None, mem_mib: int | None = None,
                        volumes: Iterable[str] = ()) -> list[str]:
    """`machine create` in the 1.9.x syntax: the name is a flag, `--from` the pack's sidecar, the only
    allowed destination the bundle, DNS pointed at the bundle's sink. Never `--smolfile` or `--image`
    with `--from` (they conflict), never `--net-backend tsi` (TSI does not enforce egress)."""
    argv = [smolvm, "machine", "create", "--name", name, "--from", f"{pack_stub}.smolmachine",
            "--allow-cidr", f"{bundle_ip}/32", "--dns", bundle_ip]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    if cpus:
        argv += ["--cpus", str(cpus)]
    if mem_mib:
        argv += ["--mem", str(mem_mib)]
    for volume in volumes:
        argv += ["-v", volume]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    return argv


def memory_mib(memory: str | None) -> int | None:
    """docker-style sizes (512m, 4g, 1024k, bytes) in MiB, at least 64 (smolvm's floor)."""
    if not memory:
        return None
    match = re.fullmatch(r"(\d+)([bkmg]?)b?", memory.strip().lower())
    if not match:
        raise BottleError(f"resources.memory {memory!r} is not a size like 512m or 4g")
    scale = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[match.group(2)]
    return max(64, int(match.group(1)) * scale // 1024 ** 2)


def machine_epoch(status: Mapping) -> str:
    """A running machine's boot, from its `status --json` / `ls --json` object: its creation and its process."""
    return f"{status.get('created_at')}:{status.get('pid')}"


def delete_command(plan: Plan) -> str:
    return f"smolvm machine delete --name {plan.guest.name} -f"


def ensure_machine_owned(plan: Plan, status: Mapping) -> None:
    refuse_unless_owned(status.get("labels") or {}, plan.slug, plan.state_dir, f"smolvm machine {plan.guest.name!r}",
                        delete_command(plan))


def prepare_workspace(plan: Plan) -> list[str]:
    volumes = []
    for mount in plan.guest.mounts:
        path = Path(mount.source)
        if ":" in str(path):
            raise BottleError(f"{plan.spec_path}: workspace {path}: smolvm's -v reads ':' as a separator; use a path without ':'")
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            if os.geteuid() == 0:     # the agent (uid 1000 in the guest) must own its new workspace
                os.chown(path, GUEST_AGENT_UID, GUEST_AGENT_UID)
        volumes.append(f"{path}:{mount.target}" + (":ro" if mount.readonly else ""))
    return volumes


def docker_desktop(docker: Docker) -> bool:
    """The seed's test: Docker Desktop names itself in OperatingSystem; a native engine gives the host OS."""
    return "Docker Desktop" in docker.query("info", "--format", "{{.OperatingSystem}}").stdout


class SmolmachinesBackend(DockerBundle):
    name = "smolmachines"
    # smolvm's exec has no --user: the image defaults to root, and each command drops to the agent.
    agent_build_args = (("EXEC_USER", "root"),)
    task_module = "bottle_tasks.tasks.smol_images"      # docker save -> registry -> crane push -> smolvm pack

    def __init__(self, docker: Docker, smolvm: Smolvm | None = None) -> None:
        super().__init__(docker)
        self._smolvm = smolvm

    def smolvm(self, plan: Plan) -> Smolvm:
        if self._smolvm is None:
            self._smolvm = Smolvm(plan.image_pipeline.smolvm)
        return self._smolvm

    # ---- planning ----------------------------------------------------------------------------

    @classmethod
    def host_facts(cls, slug: str, docker: Docker) -> HostSubnets:
        facts = subnets_in_use((bridge_name(slug),), docker)
        return replace(facts, current=facts.own[0] if facts.own else None)

    @classmethod
    def plan_network(cls, slug: str, spec: AgentSpec, settings: Settings, host_facts: Any) -> NetworkPlan:
        if spec.subnet:
            explicit = explicit_subnet(spec.subnet)
            if explicit.prefixlen > 24:
                raise BottleError(f"{spec.path}: network.subnet {spec.subnet} is smaller than a /24; the smolmachines "
                                  "bridge needs a /24 (e.g. 192.168.77.0/24)")
            return bridge_network(slug, next(explicit.subnets(new_prefix=24)))
        facts = host_facts or HostSubnets()
        try:
            return bridge_network(slug, *bridge_subnet(slug, facts.taken, facts.current))
        except BottleError as exc:   # the plan still loads (clean, list); preflight refuses to start
            return bridge_network(slug, bridge_candidates(slug)[0], problem=str(exc))

    @classmethod
    def default_workspace(cls, state_dir: Path) -> Path:
        # A microVM mounts host directories only.
        return state_dir / "workspace"

    @classmethod
    def image_pipeline(cls, slug: str, settings: Settings, cache_dir: Path,
                       build_args: tuple[tuple[str, str], ...]) -> SmolPackPipeline:
        images_cache = settings.cache_dir / "images"
        registry = ImagePlan(
            kind="registry",
            tag=f"{settings.image_prefix}/registry:latest",
            dockerfile_dir=settings.images_dir / "registry",
            context_dir=images_cache / "registry-context",
            iid_file=images_cache / f"{settings.image_prefix.replace('/', '_')}_registry.iid",
            build_args=build_args,
        )
        return SmolPackPipeline(
            registry_image=registry, registry_container=f"bottle-{slug}-registry",
            registry_port_file=cache_dir / "registry.port", repository=f"claude-bottle/agent-{slug}",
            tarball_dir=cache_dir / "image-tarballs", packs_dir=settings.cache_dir / "smolmachines",
            smolvm=settings.smolvm_bin, crane=settings.crane_bin)

    @classmethod
    def guest_image_task(cls, plan: Plan) -> str:
        return f"smol_pack:{plan.slug}"

    # ---- the bottle --------------------------------------------------------------------------

    def preflight(self, plan: Plan) -> None:
        self.check_network_preconditions(plan, (plan.bundle.name,))
        require_smolvm(plan.image_pipeline.smolvm)
        if docker_desktop(self.docker):
            raise BottleError(
                f"{plan.spec_path}: backend smolmachines needs the bundle's bridge ({plan.network.guest_side.subnet}) "
                "routed from this host, and Docker Desktop keeps container networks inside its own VM. Use a native "
                "Docker engine, or backend: docker (BOTTLE_BACKEND=docker).")
        status = self.smolvm(plan).status(plan.guest.name)
        if status is not None:
            ensure_machine_owned(plan, status)

    def guest_fingerprint(self, plan: Plan) -> str:
        return digest_of(image_digest(plan), plan.guest, plan.network, content_digest(plan.guest.env_file.host_path))

    def machine_labels(self, plan: Plan) -> dict[str, str]:
        return {**dict(plan.labels), ROLE_LABEL: "guest", FINGERPRINT_LABEL: self.guest_fingerprint(plan)}

    def start_guest(self, plan: Plan) -> None:
        """(Re)create the machine from the current pack, start it, and prove the fence; on any failure delete it."""
        smolvm, g = self.smolvm(plan), plan.guest
        status = smolvm.status(g.name)
        if status is not None:
            ensure_machine_owned(plan, status)
            smolvm.delete(g.name)
        argv = machine_create_argv(
            plan.image_pipeline.smolvm, g.name, current_pack(plan), plan.network.bundle_ip, dict(g.env),
            labels=self.machine_labels(plan), cpus=math.ceil(g.cpus) if g.cpus else None, mem_mib=memory_mib(g.memory),
            volumes=prepare_workspace(plan))      # no -w: create --from ignores it; every exec passes its own
        smolvm(*argv[1:])       # a failure here (a name taken meanwhile) leaves whatever exists alone
        try:
            # The stored policy is checked before the machine first boots, then proved from inside.
            check_stored_policy(plan)
            smolvm("machine", "start", "--name", g.name, timeout=300)
            check_stored_policy(plan)
            self.canary(plan)
        except BaseException as failure:
            try:
                smolvm.delete(g.name)
            except BottleError as cleanup:
                raise BottleError(f"{failure}\nThe machine could not be deleted afterwards: {cleanup}") from failure
            raise

    def guest_ready(self, plan: Plan) -> bool:
        status = self.smolvm(plan).status(plan.guest.name)
        if status is None or status.get("state") != "running":
            return False
        if (status.get("labels") or {}).get(FINGERPRINT_LABEL) != self.guest_fingerprint(plan):
            return False
        check_stored_policy(plan)
        return True

    def fence_epoch(self, plan: Plan) -> str | None:
        """The boot the fence was proved on: the machine (its creation time) and its process. A machine started
        by anything but the guest task is recreated and proved again, as a restarted docker guest is."""
        status = self.smolvm(plan).status(plan.guest.name)
        if not status or status.get("state") != "running":
            return None
        return machine_epoch(status)

    def remove_guest(self, plan: Plan) -> None:
        # Without smolvm, clean stops here: the bundle and the bridge stay until the machine is gone, so its
        # allowlist can never point at an address a later bottle's bundle takes over.
        try:
            self.smolvm(plan).delete(plan.guest.name)
        except ToolMissing as exc:
            raise BottleError(
                f"cannot delete machine {plan.guest.name}: {exc}. Install smolvm or set BOTTLE_SMOLVM_BIN, or "
                f"delete it yourself ({delete_command(plan)}), then clean again; "
                "the bundle and the bridge stay until then.") from None

    def remove_all(self, plan: Plan) -> None:
        self.remove_guest(plan)
        super().remove_all(plan)

    def guest(self, plan: Plan) -> "SmolGuest":
        return SmolGuest(plan, self.smolvm(plan))

    def canary(self, plan: Plan) -> None:
        """From inside the guest: the bundle's front door must answer (the probe works), and a listener the
        bottle owns on its bridge gateway, outside the allowlist, must not. The policy smolvm stored is its
        claim; this is the proof."""
        gateway = plan.network.guest_side.gateway
        name = plan.guest.name
        with socket.socket() as listener:
            try:
                listener.bind((gateway, 0))
            except OSError as exc:
                raise BottleError(f"cannot open the fence canary's listener on the bridge gateway {gateway}: {exc}") from None
            listener.listen(4)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            # -I and cwd /: nothing the agent left in /workspace (a json.py, say) is imported by root here.
            result = self.guest(plan).exec(
                ["python3", "-I", "-c", CANARY_SCRIPT, plan.network.bundle_ip, str(EGRESS_PORT), gateway, str(port),
                 str(CANARY_TIMEOUT)], user="root", check=False, timeout=120)
            try:
                front_door, outside = json.loads(result.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise BottleError(f"the fence canary could not run in machine {name!r} "
                                  f"(exit {result.returncode}): {result.stderr.strip()[-300:]}") from None
            try:
                listener.accept()[0].close()
                arrived = True
            except BlockingIOError:
                arrived = False
        if front_door != "connected":
            raise BottleError(f"the fence canary could not reach the bundle at {plan.network.bundle_ip}:{EGRESS_PORT} "
                              f"from machine {name!r} ({front_door}); the guest was not used.")
        if outside == "connected" or arrived:
            raise BottleError(
                f"machine {name!r} is not fenced: from inside it reached {gateway}:{port}, which is outside "
                f"its allowlist ({plan.network.bundle_ip}/32). smolvm is not enforcing the egress policy; the guest was "
                "deleted and not used.")


# ---- the fence, checked from outside --------------------------------------------------------------

def state_db(data_dir: str | None = None, platform: str = sys.platform) -> Path:
    """smolvm's state DB (reference/smolvm-1.9.md §3a): dirs::data_local_dir()/smolvm/server/smolvm.db, where
    SMOLVM_DATA_DIR re-roots HOME; macOS keeps it in Library/Application Support."""
    root = data_dir or os.environ.get("SMOLVM_DATA_DIR")
    if platform == "darwin":
        local = Path(root or Path.home()) / "Library/Application Support"
    elif root:
        local = Path(root) / ".local/share"
    else:
        local = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")
    return local / "smolvm/server/smolvm.db"


def machine_record(name: str, db: Path) -> dict:
    if not db.exists():
        raise BottleError(f"smolvm's state DB {db} does not exist; cannot verify machine {name!r}")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT CAST(data AS TEXT) FROM vms WHERE name=?", (name,)).fetchone()
        finally:
            conn.close()
        record = json.loads(row[0]) if row else None
    except (sqlite3.Error, ValueError) as exc:
        raise BottleError(f"cannot read machine {name!r} from smolvm's state DB {db}: {exc}") from None
    if record is None:
        raise BottleError(f"machine {name!r} is not in smolvm's state DB {db}")
    return record


def check_stored_policy(plan: Plan) -> None:
    """The machine's egress policy as smolvm stored it must be the bundle's address and nothing else."""
    verify_fence(plan.guest.name, machine_record(plan.guest.name, state_db()), plan.network.bundle_ip)


def verify_fence(name: str, record: Mapping, bundle_ip: str) -> None:
    """The stored egress policy must be exactly the bundle; anything else aborts the start. TSI enforces no
    policy, --allow-host names are re-resolved into the allowlist at every boot, and a published port lets
    traffic in past the policy: each of those fails the check too."""
    cidrs = record.get("allowed_cidrs")
    extra = {key: record.get(key) for key in ("dns_filter_hosts", "ports") if record.get(key)}
    if record.get("network_backend") == "tsi":
        extra["network_backend"] = "tsi"
    if not record.get("network") or cidrs != [f"{bundle_ip}/32"] or extra:
        raise BottleError(
            f"machine {name!r} is not fenced: smolvm stored network={record.get('network')!r}, "
            f"allowed_cidrs={cidrs!r}{''.join(f', {k}={v!r}' for k, v in extra.items())}, but the bottle needs exactly "
            f"['{bundle_ip}/32'] and nothing else. The guest was not used; check the smolvm version "
            "(>= 1.8.0 keeps --allow-cidr for create --from).")


CANARY_SCRIPT = r'''
import json, socket, sys
def dial(host, port, timeout):
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps([dial(sys.argv[1], sys.argv[2], 10), dial(sys.argv[3], sys.argv[4], float(sys.argv[5]))]))
'''


# ---- the guest handle ----------------------------------------------------------------------------

class SmolGuest(Guest):
    """exec, copy, attach through `smolvm machine exec/cp`. exec has no user flag; the smolmachines image
    runs as root and drops to the agent with runuser."""

    def __init__(self, plan: Plan, smolvm: Smolvm) -> None:
        self.plan = plan
        self.smolvm = smolvm

    def exec_argv(self, argv: list[str], *, user: str = GUEST_USER, tty: bool = False,
                  env: Mapping[str, str] | None = None, stdin: bool = True) -> list[str]:
        # Root's commands run from /, never from the agent-writable workspace.
        workdir = "/" if user == "root" else GUEST_WORKSPACE
        flags = [*(["-i"] if stdin or tty else []), *(["-t"] if tty else []), "-w", workdir]
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        as_user = [] if user == "root" else ["runuser", "-u", user, "--"]
        return [self.smolvm.binary, "machine", "exec", "--name", self.plan.guest.name, *flags, "--", *as_user, *argv]

    def exec(self, argv: list[str], *, user: str = GUEST_USER, input: str | None = None, check: bool = True,
             timeout: float | None = 600) -> Result:
        return self.smolvm(*self.exec_argv(argv, user=user, stdin=input is not None)[1:], input=input, check=check,
                           timeout=timeout)

    def copy(self, source: Path, dest: str) -> None:
        """smolvm copies single files: a directory is walked, root-owned like docker cp leaves it. A symlink
        becomes a symlink in the guest, as docker cp makes it; what it points to on the host never travels."""
        if source.is_file() and not source.is_symlink():
            self._copy_file(source, dest)
            return
        entries = sorted(source.rglob("*"))
        dirs = [dest] + [f"{dest}/{p.relative_to(source)}" for p in entries if p.is_dir() and not p.is_symlink()]
        self.exec(["mkdir", "-p", *dirs], user="root")
        for path in entries:
            target = f"{dest}/{path.relative_to(source)}"
            if path.is_symlink():
                self.exec(["ln", "-sfn", os.readlink(path), target], user="root")
            elif path.is_file() and not any(p.is_symlink() for p in path.relative_to(source).parents if str(p) != "."):
                self._copy_file(path, target)

    def _copy_file(self, source: Path, dest: str) -> None:
        if ":" in str(source):
            raise BottleError(f"{source}: smolvm cp reads a ':' in a host path as machine:path; rename it without ':'")
        self.smolvm("machine", "cp", "--mode", f"{source.stat().st_mode & 0o777:o}",
                    str(source), f"{self.plan.guest.name}:{dest}")

    def attach_argv(self, argv: list[str], tty: bool) -> list[str]:
        return self.exec_argv(argv, tty=tty, env=dict(self.plan.guest.env))

    def identity(self) -> str | None:
        status = self.smolvm.status(self.plan.guest.name)
        return str(status.get("created_at")) if status and status.get("state") == "running" else None
