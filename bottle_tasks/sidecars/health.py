"""The bundle's health check (the image HEALTHCHECK).

    python -m bottle_tasks.sidecars.health

Exits 0 only when ``$BOTTLE_RUN_DIR/status.json`` (written by the init supervisor) is fresh
and every selected daemon is running and ready; otherwise prints a one-line reason and
exits 1. The selection is ``BUNDLE_DAEMONS`` when set (the container's env, so a daemon the
init does not supervise counts as down), else the list init recorded.

``BOTTLE_STATUS_MAX_AGE`` (seconds, default 5) bounds how old status.json may be: a stale
file means init itself is wedged or gone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bottle_tasks.sidecars.daemon_table import parse_daemon_names

DEFAULT_RUN_DIR = "/run/bottle"
DEFAULT_MAX_AGE_S = 5.0


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def bundle_health(
    status: Mapping[str, Any] | None,
    selected: Sequence[str] | None,
    now: float,
    max_age_s: float = DEFAULT_MAX_AGE_S,
) -> tuple[bool, str]:
    """(healthy, one-line reason). selected=None means the names init recorded."""
    if status is None:
        return False, "no readable status.json yet (init not started or still starting)"
    age = now - float(status.get("updated_at", 0))
    if age > max_age_s:
        return False, f"status.json is stale ({age:.1f}s old > {max_age_s:g}s): init is not updating it"
    if status.get("stopping"):
        return False, "init is stopping"
    names = list(status.get("selected", [])) if selected is None else list(selected)
    daemons: Mapping[str, Any] = status.get("daemons", {})
    for name in names:
        daemon = daemons.get(name)
        if daemon is None:
            return False, f"{name}: not supervised by init"
        if not daemon.get("running"):
            return False, f"{name}: not running (last exit code {daemon.get('last_exit_code')}, restarts {daemon.get('restarts')})"
        if not daemon.get("ready"):
            return False, f"{name}: running (pid {daemon.get('pid')}) but not ready"
    if not names:
        return True, "healthy: no daemons selected"
    return True, f"healthy: {', '.join(names)} running and ready"


def main(env: Mapping[str, str] = os.environ) -> int:
    status_path = Path(env.get("BOTTLE_RUN_DIR", DEFAULT_RUN_DIR)) / "status.json"
    selected = parse_daemon_names(env["BUNDLE_DAEMONS"]) if "BUNDLE_DAEMONS" in env else None
    max_age_s = float(env.get("BOTTLE_STATUS_MAX_AGE", DEFAULT_MAX_AGE_S))
    healthy, reason = bundle_health(read_status(status_path), selected, time.time(), max_age_s)
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
