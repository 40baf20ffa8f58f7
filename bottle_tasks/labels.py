"""The label every bottle resource carries: cleanup and leak checks select by it, as testcontainers does."""

from __future__ import annotations

from typing import Iterable

LABEL = "dev.claude-bottle"
SLUG_LABEL = f"{LABEL}.slug"
AGENT_LABEL = f"{LABEL}.agent"
INSTANCE_LABEL = f"{LABEL}.instance"   # "" for the agent's default bottle
STATE_LABEL = f"{LABEL}.state"
ROLE_LABEL = f"{LABEL}.role"
FINGERPRINT_LABEL = f"{LABEL}.fingerprint"


def label_args(labels: Iterable[tuple[str, str]], role: str) -> list[str]:
    """`--label k=v` for the bottle's labels plus its role (guest, bundle, network-internal, ...)."""
    args: list[str] = []
    for key, value in (*labels, (ROLE_LABEL, role)):
        args += ["--label", f"{key}={value}"]
    return args
