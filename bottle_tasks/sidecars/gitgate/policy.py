"""The push policy the pre-receive hook applies: every ref update against the repo's PushPolicy
(branch pattern, tags, deletion, force), and everything the push carries scanned for secrets
(``scan``: every place of every new commit and tag, and the ref names). Secrets are named by pattern
and place, never shown. A push that holds an object bigger than scan.MAX_SCAN_OBJECT_BYTES (git
would hold it whole to diff it; a pack of 1 MB can inflate to gigabytes), or more text than the
scan reads, is rejected: what cannot be scanned is not forwarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from bottle_tasks.contract import PushPolicy
from bottle_tasks.sidecars import pipelock_scan
from bottle_tasks.sidecars.configfile import pipelock_scan_token
from bottle_tasks.sidecars.gitgate.config import GateConfig
from bottle_tasks.sidecars.gitgate.git import is_ancestor, is_zero, run_git
from bottle_tasks.sidecars.gitgate.scan import (
    MAX_SCAN_OBJECT_BYTES, NewObjects, Place, ScanBudget, ScanRefused, SecretScanner, mib, new_objects, scan_push,
)

_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str

    @property
    def created(self) -> bool:
        return is_zero(self.old)

    @property
    def deleted(self) -> bool:
        return is_zero(self.new)

    def as_record(self) -> dict[str, str]:
        return {"ref": self.ref, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class RefDecision:
    update: RefUpdate
    reasons: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.reasons


def parse_ref_updates(text: str) -> list[RefUpdate]:
    """pre-/post-receive stdin: one ``<old> <new> <ref>`` per line."""
    updates = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not _OID.match(parts[0]) or not _OID.match(parts[1]):
            raise ValueError(f"unexpected ref update line: {line[:200]!r}")
        updates.append(RefUpdate(parts[0], parts[1], parts[2]))
    return updates


def evaluate_push(policy: PushPolicy, updates: Sequence[RefUpdate], repo_dir: Path, scanner: SecretScanner,
                  env: Mapping[str, str] | None = None, budget: ScanBudget | None = None) -> list[RefDecision]:
    """The push policy: one decision per ref update. Run inside pre-receive (env carries git's quarantine).
    The whole push is scanned at once: the refs share its commits, its budget and its scanner calls."""
    budget = budget if budget is not None else ScanBudget()
    judged = [_ref_reasons(policy, update, repo_dir, env) for update in updates]
    reasons = [why for why, _brings in judged]
    brought: dict[int, NewObjects] = {}
    findings: dict[Place, list[str]] = {}
    failure = ""
    try:
        for index, update in enumerate(updates):
            if judged[index][1]:
                objects = new_objects(repo_dir, update.new, budget, env)
                if objects.oversized:
                    reasons[index] += [f"{what} is larger than the {mib(MAX_SCAN_OBJECT_BYTES)} the secret scan "
                                       "reads; git-gate forwards nothing it has not scanned" for what in objects.oversized]
                else:
                    brought[index] = objects
        findings = scan_push(repo_dir, [update.ref for update in updates],
                             _union(objects.commits for objects in brought.values()),
                             _union(objects.tags for objects in brought.values()), scanner, budget, env)
    except ScanRefused as exc:
        failure = str(exc)
    except pipelock_scan.DlpUnavailable as exc:
        failure = f"secret scan unavailable ({exc}); try again later"
    except RuntimeError as exc:
        failure = f"secret scan failed ({exc})"
    placed: set[Place] = set()
    for index, update in enumerate(updates):
        if failure:  # every ref's name was in the scan
            reasons[index].append(failure)
            continue
        owned = {*brought[index].commits, *brought[index].tags} if index in brought else set()
        for place, names in findings.items():
            if place.kind == "ref" and place.owner == update.ref:
                reason = "the ref name looks like a secret"
            elif place.kind != "ref" and place.owner in owned:
                reason = f"secret in {place.describe()}: {', '.join(names)}"
            else:
                continue
            placed.add(place)
            if reason not in reasons[index]:
                reasons[index].append(reason)
    for place in findings.keys() - placed:  # found, but in no ref's objects: never let it pass
        for why in reasons:
            why.append(f"secret in the push: {', '.join(findings[place])}")
    return [RefDecision(update, tuple(why)) for update, why in zip(updates, reasons)]


def _ref_reasons(policy: PushPolicy, update: RefUpdate, repo_dir: Path,
                 env: Mapping[str, str] | None) -> tuple[list[str], bool]:
    """What the policy says of the ref update itself, and whether it brings commits to scan (it is no
    deletion, and its new value peels to a commit)."""
    reasons: list[str] = []
    is_tag = update.ref.startswith("refs/tags/")
    if update.ref.startswith("refs/heads/"):
        refusal = policy.branch_refusal(update.ref[len("refs/heads/"):])
        if refusal:
            reasons.append(refusal)
    elif is_tag:
        if not policy.tags:
            reasons.append("tags not allowed")
    else:
        reasons.append("ref not allowed (only refs/heads/* and refs/tags/*)")
    if update.deleted:
        if not policy.delete:
            reasons.append("deletion not allowed")
        return reasons, False
    if not update.created and not policy.force:
        if is_tag:
            reasons.append("moving an existing tag not allowed (force is off)")
        elif not is_ancestor(repo_dir, update.old, update.new, env):
            reasons.append("non-fast-forward update not allowed (force is off)")
    if run_git(["rev-parse", "--verify", "--quiet", f"{update.new}^{{commit}}"], cwd=repo_dir,
               env=env).returncode != 0:
        reasons.append("does not point to a commit")
        return reasons, False
    return reasons, True


def _union(lists: Iterable[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(oid for oids in lists for oid in oids))


def pipelock_scanner(config: GateConfig, environ: Mapping[str, str], pipelock_config: Path) -> pipelock_scan.PipelockClient | None:
    if not config.pipelock_scan_url:
        return None
    return pipelock_scan.PipelockClient(config.pipelock_scan_url, pipelock_scan_token(environ, pipelock_config))
