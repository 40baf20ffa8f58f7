"""<state dir>/fence.json: when `start` last proved the guest's fence, and on which boot (the backend's
fence epoch), so `doit status` can tell a guest restarted outside doit since. It also says which backend
ran the guest and where its workspace is, so status needs no agent file to find them.

    {"proved_at": "2026-12-02T12:00:00.123Z", "epoch": "...", "backend": "docker",
     "guest": "bottle-example-guest", "workspace": {"volume": "bottle-example-workspace"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from bottle_tasks.plan import GUEST_WORKSPACE, Plan
from bottle_tasks.sidecars.audit import record_time, utc_stamp
from bottle_tasks.sidecars.files import atomic_write_json

FENCE_FILE = "fence.json"


def fence_document(plan: Plan, epoch: str | None, proved_at: float | None = None) -> dict[str, Any]:
    workspace = next(m for m in plan.guest.mounts if m.target == GUEST_WORKSPACE)
    return {"proved_at": utc_stamp(proved_at), "epoch": epoch, "backend": plan.backend, "guest": plan.guest.name,
            "workspace": {"volume": workspace.source} if workspace.volume else {"path": workspace.source}}


def write_fence(plan: Plan, epoch: str | None, proved_at: float | None = None) -> Path:
    return atomic_write_json(plan.state_dir / FENCE_FILE, fence_document(plan, epoch, proved_at), mode=0o600)


def forget_fence(plan: Plan) -> None:
    """The guest is gone (clean): no proof stands for it any more."""
    (plan.state_dir / FENCE_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class FenceRecord:
    proved_at: datetime
    epoch: str
    backend: str = ""
    workspace_path: str = ""
    workspace_volume: str = ""

    @classmethod
    def parse(cls, document: Any) -> "FenceRecord | None":
        """The record, or None when the document is not one (hand-edited, from another version)."""
        if not isinstance(document, Mapping):
            return None
        proved_at = record_time({"ts": document.get("proved_at")})
        if proved_at is None:
            return None
        workspace = document.get("workspace") if isinstance(document.get("workspace"), Mapping) else {}
        return cls(proved_at, str(document.get("epoch") or ""), str(document.get("backend") or ""),
                   str(workspace.get("path") or ""), str(workspace.get("volume") or ""))


def read_fence(state_dir: Path) -> FenceRecord | None:
    try:
        return FenceRecord.parse(json.loads((state_dir / FENCE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
