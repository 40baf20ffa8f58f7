"""Forwarding accepted pushes to the upstream.

The post-receive hook queues each accepted ref update (``<state_dir>/spool/<name>/queue/``, one JSON
file each: this gate's alone, so a gate forwards only the pushes that came through it). The forwarder
pushes them with the repo's identity, per ref in order, and retries a failed one with backoff; a new
push (``retry_now``) retries every failed one at once. Every attempt is one audit record (``event:
forward``). A ref in the queue is left alone by the gate's fetch until it is forwarded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bottle_tasks.contract import GitRepo
from bottle_tasks.sidecars.daemon import Backoff
from bottle_tasks.sidecars.gitgate.audit import AuditLog
from bottle_tasks.sidecars.gitgate.config import GateConfig
from bottle_tasks.sidecars.gitgate.git import git_error_line, is_zero, run_git
from bottle_tasks.sidecars.gitgate.hooks import MirrorPaths, read_spool

FORWARD_BACKOFF = Backoff(initial_s=0.5, cap_s=30.0)
IDLE_PASS_S = 5.0  # a pass at least this often: picks up entries a hook queued without a request ending here


@dataclass
class _RefRetry:
    failures: int = 0
    due: float = 0.0  # monotonic time of the next attempt


class Forwarder:
    """Drains every repo's queue into its upstream; ``run`` is the thread's loop."""

    def __init__(self, config: GateConfig, audit: AuditLog, upstream_env: Callable[[GitRepo], Mapping[str, str]],
                 backoff: Backoff = FORWARD_BACKOFF):
        self.config = config
        self.audit = audit
        self.upstream_env = upstream_env
        self.backoff = backoff
        self.retries: dict[tuple[str, str], _RefRetry] = {}
        self._wake = threading.Event()
        self._retry_now = threading.Event()
        self._stop = threading.Event()

    def forward(self, repo: GitRepo, entry: Mapping[str, Any], attempt: int) -> bool:
        ref, new = str(entry["ref"]), str(entry["new"])
        if is_zero(new):
            refspec = f":{ref}"
        else:
            refspec = f"{'+' if entry.get('force') and repo.push.force else ''}{new}:{ref}"
        paths = MirrorPaths.of(self.config, repo)
        result = run_git(["push", "--quiet", "--no-verify", "--porcelain", "--", repo.url, refspec],
                         cwd=paths.root, env=self.upstream_env(repo))
        ok = result.returncode == 0
        reason = ""
        if not ok:
            reason = git_error_line(result.stderr) or git_error_line(result.stdout) or f"git push exited {result.returncode}"
        self.audit.emit({"event": "forward", "repo": repo.name,
                         "refs": [{"ref": ref, "old": str(entry.get("old", "")), "new": new}],
                         "accepted": ok, "result": "ok" if ok else "failed", "reason": reason, "attempt": attempt,
                         "force": refspec.startswith("+")})
        return ok

    def forward_pending(self) -> float:
        """One pass over every queue: the oldest entry of each ref whose retry is due. Returns seconds to wait."""
        if self._retry_now.is_set():
            self._retry_now.clear()
            for retry in self.retries.values():
                retry.due = 0.0
        wait = IDLE_PASS_S
        for repo in self.config.repos:
            paths = MirrorPaths.of(self.config, repo)
            self.audit.relay_spooled(paths.events)
            done: set[str] = set()
            for path, entry in read_spool(paths.queue):
                ref = str(entry.get("ref"))
                if ref in done:
                    continue  # per ref in order: a later entry waits for the one before it
                retry = self.retries.setdefault((repo.name, ref), _RefRetry())
                now = time.monotonic()
                if retry.due > now:
                    wait = min(wait, retry.due - now)
                    done.add(ref)
                    continue
                if self.forward(repo, entry, retry.failures + 1):
                    path.unlink(missing_ok=True)
                    self.retries.pop((repo.name, ref), None)
                else:
                    retry.failures += 1
                    retry.due = time.monotonic() + self.backoff.delay(retry.failures)
                    wait = min(wait, self.backoff.delay(retry.failures))
                    done.add(ref)
                if self._stop.is_set():
                    return 0.0
        return wait

    def run(self) -> None:
        while not self._stop.is_set():
            wait = self.forward_pending()
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def retry_now(self) -> None:
        """A new push: retry every failed forward now, not when its backoff ends."""
        self._retry_now.set()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
