"""The gate repo's receive hooks and the spool directories they hand work to the daemon through.

git runs ``<name>.git/git-gate/hooks/{pre,post}-receive`` (written by the gate at start where they differ), which
run ``python -m bottle_tasks.sidecars.gitgate pre-receive|post-receive --repo <name>``:

- pre-receive applies the push policy (``policy``); a push it accepts for a repo with ``push.approve``
  then waits for a human (``approval``); it prints one ``git-gate: rejected <ref>: <reason>`` line per
  reason and spools the push record in ``events/``;
- post-receive spools every accepted ref update in ``queue/`` for the forwarder.

Each gate has its own repos (``<state_dir>/<name>.git``: refs, config, hooks); only their objects are
shared with the agent's other gates (``shared``). The hook scripts name no path: the gate's
receive-pack names its python, config and pipelock config in its environment (``gate_environment``:
set by the gate's CGI environment, which the guest cannot add to). Without them a hook refuses the push.
From the config the hook takes this gate's policy and its spools, ``<state_dir>/spool/<name>/``.

The hooks cannot reach the daemon's stdout (git relays hook output to the client), hence the spools:
one JSON file per record, named so that names sort in write order.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from bottle_tasks.contract import GitRepo
from bottle_tasks.sidecars import dlp
from bottle_tasks.sidecars.files import atomic_write
from bottle_tasks.sidecars.gitgate.config import (
    DEFAULT_PIPELOCK_CONFIG, GateConfig, GitGateConfigError, load_config,
)
from bottle_tasks.sidecars.gitgate.approval import Verdict, hold_push
from bottle_tasks.sidecars.gitgate.git import is_ancestor
from bottle_tasks.sidecars.gitgate.policy import RefDecision, evaluate_push, parse_ref_updates, pipelock_scanner
from bottle_tasks.sidecars.gitgate.scan import SecretScanner

MIRROR_STATE_DIR = "git-gate"  # inside each <name>.git: hooks/ (and, before spools, queue/)
SPOOL_DIR = "spool"            # inside state_dir, this gate's alone: <name>/queue/, <name>/events/
HOOKS = ("pre-receive", "post-receive")
# What a gate's receive-pack tells the hooks it runs (gate_environment).
PYTHON_ENV = "GIT_GATE_PYTHON"
CONFIG_ENV = "GIT_GATE_CONFIG"
PIPELOCK_CONFIG_ENV = "GIT_GATE_PIPELOCK_CONFIG"


@dataclass(frozen=True)
class MirrorPaths:
    root: Path     # <state_dir>/<name>.git: this gate's repo (refs, config, hooks, the objects its guest pushed)
    objects: Path  # <mirrors_dir>/<name>.objects: the objects fetched from the upstream, shared by the agent's gates
    spool: Path    # <state_dir>/spool/<name>: this gate's

    @classmethod
    def of(cls, config: GateConfig, repo: GitRepo) -> MirrorPaths:
        return cls(config.state_dir / f"{repo.name}.git", config.mirrors_dir / f"{repo.name}.objects",
                   config.state_dir / SPOOL_DIR / repo.name)

    @property
    def hooks(self) -> Path:
        return self.root / MIRROR_STATE_DIR / "hooks"

    @property
    def legacy_queue(self) -> Path:
        """Where a mirror kept its queue before the spools."""
        return self.root / MIRROR_STATE_DIR / "queue"

    @property
    def queue(self) -> Path:
        return self.spool / "queue"

    @property
    def events(self) -> Path:
        return self.spool / "events"


# ---------------------------------------------------------------------------------------------
# spool directories: the hooks write, the daemon reads


def write_spool(directory: Path, record: Mapping[str, Any]) -> Path:
    """One JSON file, named so that names sort in write order; readers never see half a file."""
    name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
    return atomic_write(directory / name, json.dumps(record) + "\n")


def read_spool(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".json") and not name.startswith("."))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        try:
            entries.append((directory / name, json.loads((directory / name).read_text())))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
    return entries


def queued_refs(paths: MirrorPaths) -> dict[str, str]:
    """The refs this gate's queue holds, each with the value last pushed to it."""
    return {str(entry.get("ref")): str(entry.get("new")) for _path, entry in read_spool(paths.queue)}


# ---------------------------------------------------------------------------------------------
# hook entry points


def hook_pre_receive(config: GateConfig, repo: GitRepo, stdin: str, stderr: TextIO, *,
                     environ: Mapping[str, str] = os.environ,
                     pipelock_config: Path = Path(DEFAULT_PIPELOCK_CONFIG),
                     hold: Callable[..., Verdict] = hold_push) -> int:
    """The policy, then (repo.push.approve) a human: a push the policy accepts waits for the decision."""
    paths = MirrorPaths.of(config, repo)
    updates = parse_ref_updates(stdin)
    scanner = SecretScanner(pipelock_scanner(config, environ, pipelock_config))
    decisions = evaluate_push(repo.push, updates, paths.root, scanner, environ)
    verdict = None
    if repo.push.approve and decisions and all(d.accepted for d in decisions):
        if config.supervise is None:  # config.py refuses this; never forward unapproved
            verdict = Verdict("error", reason="git-gate.yaml names no supervise queue")
        else:
            verdict = hold(config.supervise, repo.name, updates, paths.root, stderr, environ)
        if verdict.approved:
            stderr.write(f"git-gate: {verdict.message()}\n")
        else:
            decisions = [RefDecision(d.update, (verdict.message(),)) for d in decisions]
    rejected = [d for d in decisions if not d.accepted]
    for decision in rejected:
        for reason in decision.reasons:
            stderr.write(f"git-gate: rejected {decision.update.ref}: {reason}\n")
    stderr.flush()
    reasons = [f"{d.update.ref}: {reason}" for d in rejected for reason in d.reasons]
    record: dict[str, Any] = {
        "ts": round(time.time(), 3), "event": "push", "repo": repo.name,
        "refs": [{**d.update.as_record(), "reasons": list(d.reasons)} for d in decisions],
        "accepted": not rejected, "reason": "; ".join(reasons),
    }
    if verdict is not None:
        record["approval"] = {"status": verdict.status, "request": verdict.request_id, "by": verdict.by,
                              "reason": verdict.reason}
    write_spool(paths.events, record)
    return 1 if rejected else 0


def hook_post_receive(config: GateConfig, repo: GitRepo, stdin: str, stderr: TextIO, *,
                      environ: Mapping[str, str] = os.environ) -> int:
    paths = MirrorPaths.of(config, repo)
    for update in parse_ref_updates(stdin):
        rewrite = (not update.created and not update.deleted
                   and (update.ref.startswith("refs/tags/") or not is_ancestor(paths.root, update.old, update.new, environ)))
        write_spool(paths.queue, {**update.as_record(), "force": rewrite, "queued_at": round(time.time(), 3)})
        stderr.write(f"git-gate: accepted {update.ref}; forwarding it to the upstream\n")
    stderr.flush()
    return 0


def hook_main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    hook = argv[0]
    parser = argparse.ArgumentParser(prog=f"python -m bottle_tasks.sidecars.gitgate {hook}")
    parser.add_argument("--config", type=Path, help=f"default ${CONFIG_ENV}, which the gate sets")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--pipelock-config", type=Path,
                        help=f"default ${PIPELOCK_CONFIG_ENV}, else {DEFAULT_PIPELOCK_CONFIG}")
    args = parser.parse_args(list(argv[1:]))
    try:
        config_path = args.config or environ.get(CONFIG_ENV)
        if not config_path:  # no gate ran this receive-pack: nothing says whose policy applies
            raise GitGateConfigError(f"{CONFIG_ENV} is not set; git-gate sets it for the pushes it serves")
        pipelock_config = Path(args.pipelock_config or environ.get(PIPELOCK_CONFIG_ENV) or DEFAULT_PIPELOCK_CONFIG)
        config = load_config(config_path)
        repo = config.repo(args.repo)
        if repo is None:
            raise GitGateConfigError(f"{config_path}: repos: no repo named {args.repo!r}")
        stdin = sys.stdin.read()
        if hook == "pre-receive":
            return hook_pre_receive(config, repo, stdin, sys.stderr, pipelock_config=pipelock_config)
        return hook_post_receive(config, repo, stdin, sys.stderr)
    except Exception as exc:  # fail closed, and never with a traceback that could quote content
        sys.stderr.write(f"git-gate: {hook} failed ({type(exc).__name__}: {dlp.redact(str(exc))[:300]}); "
                         f"{'push rejected' if hook == 'pre-receive' else 'the push is in the mirror but not queued'}\n")
        return 1


def hook_script(repo: str, hook: str) -> str:
    """The hook's text: it names no path, the gate serving the push names python and config."""
    return (
        "#!/bin/sh\n"
        "# Written by git-gate at start where it differs (bottle_tasks/sidecars/gitgate/hooks.py); edits are lost.\n"
        "# The gate serving the push names python and config in the environment.\n"
        f'exec "${{{PYTHON_ENV}:?git-gate: no gate environment; push refused}}" '
        f"-m bottle_tasks.sidecars.gitgate {hook} --repo {shlex.quote(repo)}\n"
    )


def gate_environment(python: str, package_root: Path, config_path: Path, pipelock_config: Path) -> dict[str, str]:
    """What the hooks a gate's receive-pack runs need to know of that gate (they inherit it from git)."""
    return {PYTHON_ENV: python, "PYTHONPATH": str(package_root), CONFIG_ENV: str(config_path),
            PIPELOCK_CONFIG_ENV: str(pipelock_config)}
