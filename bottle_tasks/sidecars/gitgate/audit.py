"""git-gate's audit trail: every push decision and every forward attempt is one JSON line in
``audit_log`` and on stdout, scrubbed of token values and of anything that looks like a secret."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from bottle_tasks.sidecars import dlp
from bottle_tasks.sidecars.audit import AuditWriter
from bottle_tasks.sidecars.gitgate.hooks import read_spool
from bottle_tasks.sidecars.scrub import SecretScrubber


class AuditLog:
    """One JSON line per record: appended to the audit file (when audit=True) and printed on stdout."""

    def __init__(self, path: Path | None, out: TextIO, scrubber: SecretScrubber, stream: AuditWriter | None = None):
        self.path = path
        self.out = out
        self.scrubber = scrubber
        # The bottle's audit stream gets a line per push and forward, linking to this file's full record.
        self.stream = stream if stream is not None else AuditWriter.from_env("git-gate", scrubber=scrubber)
        self._lock = threading.Lock()
        self._relay_lock = threading.Lock()

    def emit(self, record: Mapping[str, Any], *, audit: bool = True) -> None:
        record = {"ts": round(time.time(), 3), **record}
        # Token values, then anything that looks like a secret (a ref name can carry one).
        line = dlp.redact(self.scrubber.text(json.dumps(record, ensure_ascii=True)))
        with self._lock:
            if audit and self.path is not None:
                try:
                    with open(self.path, "a", encoding="utf-8") as audit_file:
                        audit_file.write(line + "\n")
                except OSError as exc:
                    self.out.write(json.dumps({"event": "error", "reason": f"cannot write audit log: {exc}"}) + "\n")
            self.out.write(line + "\n")
            self.out.flush()
        if audit:
            event, decision, fields = stream_line(record)
            self.stream.emit(event, decision, **fields)

    def relay_spooled(self, directory: Path) -> None:
        """Move the records the hooks spooled in directory (their push records) into the log."""
        with self._relay_lock:  # two threads relaying at once would log a record twice
            for path, record in read_spool(directory):
                self.emit(record)  # keeps the hook's own "ts": when the push was decided
                path.unlink(missing_ok=True)


def stream_line(record: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A push or forward record as the audit stream's (event, decision, fields); git/audit.jsonl keeps it whole."""
    event = str(record.get("event", "push"))
    accepted = bool(record.get("accepted"))
    refs = [str(r.get("ref", "")) for r in record.get("refs", []) if isinstance(r, dict)]
    approval = record.get("approval") if isinstance(record.get("approval"), dict) else {}
    reason = str(record.get("reason", "")) or f"{event} of {', '.join(refs) or 'no refs'} {'accepted' if accepted else 'refused'}"
    code = "" if accepted else ("push_refused" if event == "push" else "forward_failed")
    return event, "allow" if accepted else "block", {
        "reason_code": code, "reason": reason, "request_id": str(approval.get("request") or ""),
        "detail": {"repo": str(record.get("repo", "")), "refs": refs, "record": "git/audit.jsonl"}}
