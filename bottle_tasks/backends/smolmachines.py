"""The smolmachines backend's building blocks (the guest lifecycle is not wired into tasks yet).

The guest is a smolvm microVM created from the agent's pack with an egress policy that admits only
the bundle. smolvm 0.8.x dropped `--allow-cidr` for `create --from`, and no smolvm output shows a
machine's CIDRs, so after every start the fence is verified from the machine's stored record
(smolvm's state DB, reference/smolvm-1.9.md §3a) before anything runs in the guest.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping

from bottle_tasks.errors import BottleError

RESERVED_THIRD_OCTET = 17          # 192.168.17.x is a common home and Docker Desktop range


def bridge_subnet(slug: str, taken: Iterable[ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, str]:
    """The per-bottle bridge: 192.168.<hash>.0/24 from the slug, skipping .17. A subnet already in use
    moves to the next candidate, deterministically; the note says so (empty when nothing moved)."""
    taken = list(taken)
    start = int.from_bytes(hashlib.sha256(slug.encode()).digest()[:4], "big") % 254 + 1
    first = None
    for offset in range(254):
        octet = (start - 1 + offset) % 254 + 1
        if octet == RESERVED_THIRD_OCTET:
            continue
        candidate = ipaddress.ip_network(f"192.168.{octet}.0/24")
        first = first or candidate
        if not any(candidate.overlaps(t) for t in taken):
            note = "" if candidate == first else f"subnet {first} is in use; bottle {slug!r} uses {candidate} instead"
            return candidate, note
    raise BottleError(f"no free /24 in 192.168.0.0/16 for bottle {slug!r}; remove unused docker networks")


def bundle_address(subnet: ipaddress.IPv4Network) -> tuple[str, str]:
    """(gateway, bundle ip): .1 and .2, as the seed pinned them."""
    return str(subnet.network_address + 1), str(subnet.network_address + 2)


def machine_create_argv(smolvm: str, name: str, pack_stub: Path, bundle_ip: str, env: Mapping[str, str]) -> list[str]:
    """`machine create` in the 1.9.x syntax: the name is a flag, `--from` the pack's sidecar, the only
    allowed destination the bundle, DNS pointed at the bundle's sink. Never `--smolfile` or `--image`
    with `--from` (they conflict), never `--net-backend tsi` (TSI does not enforce egress)."""
    argv = [smolvm, "machine", "create", "--name", name, "--from", f"{pack_stub}.smolmachine",
            "--allow-cidr", f"{bundle_ip}/32", "--dns", bundle_ip]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    return argv


def state_db(data_dir: str | None = None) -> Path:
    """smolvm's state DB: SMOLVM_DATA_DIR re-roots HOME; otherwise XDG data home."""
    if data_dir or os.environ.get("SMOLVM_DATA_DIR"):
        return Path(data_dir or os.environ["SMOLVM_DATA_DIR"]) / ".local/share/smolvm/server/smolvm.db"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(base) / "smolvm/server/smolvm.db"


def machine_record(name: str, db: Path) -> dict:
    if not db.exists():
        raise BottleError(f"smolvm's state DB {db} does not exist; cannot verify machine {name!r}")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT CAST(data AS TEXT) FROM vms WHERE name=?", (name,)).fetchone()
    if row is None:
        raise BottleError(f"machine {name!r} is not in smolvm's state DB {db}")
    return json.loads(row[0])


def verify_fence(name: str, record: Mapping, bundle_ip: str) -> None:
    """The stored egress policy must be exactly the bundle; anything else aborts the start."""
    cidrs = record.get("allowed_cidrs")
    if not record.get("network") or cidrs != [f"{bundle_ip}/32"]:
        raise BottleError(
            f"machine {name!r} is not fenced: smolvm stored network={record.get('network')!r}, "
            f"allowed_cidrs={cidrs!r}, but the bottle needs exactly ['{bundle_ip}/32']. The guest was not used; "
            "check the smolvm version (>= 1.8.0 keeps --allow-cidr for create --from).")
