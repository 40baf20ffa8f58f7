"""Subnet arithmetic for bottles: pure functions of the slug and what is already taken."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Iterable

from bottle_tasks.errors import BottleError

# Never routed around the proxy, and common on home routers: bottles never take it.
RESERVED_SUBNETS = (ipaddress.ip_network("192.168.17.0/24"),)


def _slug_hash(slug: str) -> int:
    return int.from_bytes(hashlib.sha256(slug.encode()).digest()[:4], "big")


def explicit_subnet(value: str) -> ipaddress.IPv4Network:
    """The agent file's network.subnet; host bits set is an error that says what to write."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        fixed = ipaddress.ip_network(value, strict=False)
        raise BottleError(f"network.subnet {value!r} has host bits set; write {fixed}") from None


def pool_blocks(slug: str, pool: str) -> list[ipaddress.IPv4Network]:
    """The pool's /23s, starting at the slug's hash, skipping the reserved ones."""
    pool_net = ipaddress.ip_network(pool)
    if pool_net.prefixlen > 23:
        raise BottleError(f"BOTTLE_SUBNET_POOL {pool} is smaller than a /23; use a /16 such as 10.243.0.0/16")
    blocks = list(pool_net.subnets(new_prefix=23))
    start = _slug_hash(slug) % len(blocks)
    ordered = (blocks[(start + offset) % len(blocks)] for offset in range(len(blocks)))
    return [b for b in ordered if not any(b.overlaps(r) for r in RESERVED_SUBNETS)]


def bottle_subnet(slug: str, pool: str, taken: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
                  current: str | None = None) -> tuple[ipaddress.IPv4Network, str]:
    """A /23 for the bottle (docker: its internal and egress /24s) from the pool: the slug's first
    choice, stepping around subnets in use, deterministically."""
    candidates = pool_blocks(slug, pool)
    if not candidates:
        raise BottleError(f"BOTTLE_SUBNET_POOL {pool} has no usable /23")
    return pick_subnet(slug, candidates, taken, current, f"BOTTLE_SUBNET_POOL {pool}")


def bridge_candidates(slug: str) -> list[ipaddress.IPv4Network]:
    """192.168.<hash>.0/24 first, then the following /24s, skipping the reserved ones."""
    start = _slug_hash(slug) % 254 + 1
    octets = ((start - 1 + offset) % 254 + 1 for offset in range(254))
    return [ipaddress.ip_network(f"192.168.{o}.0/24") for o in octets
            if not any(ipaddress.ip_network(f"192.168.{o}.0/24").overlaps(r) for r in RESERVED_SUBNETS)]


def bridge_subnet(slug: str, taken: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                  current: str | None = None) -> tuple[ipaddress.IPv4Network, str]:
    """A /24 bridge from the slug, stepping around subnets in use (smolmachines)."""
    return pick_subnet(slug, bridge_candidates(slug), taken, current, "192.168.0.0/16")


def pick_subnet(slug: str, candidates: list[ipaddress.IPv4Network],
                taken: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], current: str | None,
                space: str) -> tuple[ipaddress.IPv4Network, str]:
    """The first candidate nothing taken overlaps; the note says why it is not the first choice (empty
    when it is). A subnet the bottle already has keeps it while nothing else overlaps it."""
    taken = [t for t in taken if t.version == 4]
    if current and not any(ipaddress.ip_network(current).overlaps(t) for t in taken):
        chosen = ipaddress.ip_network(current)
        return chosen, "" if chosen == candidates[0] else (
            f"bottle {slug!r} keeps its subnet {chosen} (first choice {candidates[0]} was in use when it was made)")
    for candidate in candidates:
        if not any(candidate.overlaps(t) for t in taken):
            note = "" if candidate == candidates[0] else (
                f"subnet {candidates[0]} is in use; bottle {slug!r} uses {candidate} instead")
            return candidate, note
    raise BottleError(f"no free subnet in {space} for bottle {slug!r}; remove unused docker networks or bottles")
