"""What a bottle's subnet must step around, gathered before planning: docker's networks, the host's
routes, and the claims of bottles being planned right now.

Two starts that plan at the same moment would both see the same free subnet; a claim closes that
window. load_plan reads the claims, plans and writes its own claim under one host-wide lock, so the
next planner steps around it. A claim lapses after CLAIM_TTL: by then its bottle's networks exist (and
docker's list holds their subnets), or the plan never got that far and its subnet is free again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bottle_tasks.docker_cli import Docker
from bottle_tasks.errors import BottleError

CLAIM_TTL = 900.0


@dataclass(frozen=True)
class HostSubnets:
    """What the bottle's networks must step around."""
    taken: tuple[ipaddress.IPv4Network, ...] = ()
    current: str | None = None          # the subnet the bottle already has (its networks, else its claim)
    own: tuple[str, ...] = ()           # the subnets of the bottle's own networks, in the order asked


def host_routes(table: Path = Path("/proc/net/route")) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, subnet) of the IPv4 routes on this host (Linux, main table), so a bridge never shadows the
    LAN or a VPN; the default route is no subnet."""
    routes: list[tuple[str, ipaddress.IPv4Network]] = []
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return routes
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        # the kernel prints each address as a host-order integer in hex
        dest, mask = (ipaddress.IPv4Address(int(f, 16).to_bytes(4, sys.byteorder)) for f in (fields[1], fields[7]))
        if int(mask):
            routes.append((fields[0], ipaddress.ip_network(f"{dest}/{mask}", strict=False)))
    return routes


def subnets_in_use(own_networks: tuple[str, ...], docker: Docker) -> HostSubnets:
    try:
        docker_nets = docker.network_subnets()
    except BottleError:
        # no engine, or it failed to list: preflight says so, and create_networks checks again before
        # it creates anything; the plan still loads for `doit list`, `logs` and `clean`
        docker_nets = {}
    own = tuple(next((str(s) for s in docker_nets.get(name, []) if s.version == 4), "") for name in own_networks)
    taken = [s for name, subnets in docker_nets.items() if name not in own_networks for s in subnets if s.version == 4]
    # docker's bridges (br-*, docker0) are in docker's own list; every other route is the host's
    taken += [net for iface, net in host_routes() if not iface.startswith(("br-", "docker"))]
    return HostSubnets(tuple(taken), None, own if all(own) else ())


# ---- claims --------------------------------------------------------------------------------------

def claims_dir(cache_dir: Path) -> Path:
    return cache_dir / "subnets"


def with_claims(facts: HostSubnets, cache_dir: Path, slug: str, now: float | None = None) -> HostSubnets:
    """facts plus the fresh claims of other bottles (taken) and this bottle's own (current, when it has
    no networks yet)."""
    now = time.time() if now is None else now
    taken, mine = list(facts.taken), None
    try:
        entries = list(os.scandir(claims_dir(cache_dir)))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if not entry.name.endswith(".json") or not entry.is_file(follow_symlinks=False):
            continue
        try:
            claim = json.loads(Path(entry.path).read_text())
            subnets = [ipaddress.ip_network(s) for s in claim["subnets"]]
            fresh = now - float(claim["time"]) < CLAIM_TTL
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if entry.name == f"{slug}.json":
            mine = str(subnets[0]) if subnets else None
        elif fresh:
            taken += subnets
    return HostSubnets(tuple(taken), facts.current or mine, facts.own)


def write_claim(cache_dir: Path, slug: str, subnets: tuple[str, ...], now: float | None = None) -> None:
    directory = claims_dir(cache_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / f".{slug}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"subnets": list(subnets), "time": time.time() if now is None else now}))
    tmp.replace(directory / f"{slug}.json")


def drop_claim(cache_dir: Path, slug: str) -> None:
    (claims_dir(cache_dir) / f"{slug}.json").unlink(missing_ok=True)
