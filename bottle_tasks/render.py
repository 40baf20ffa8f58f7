"""Render config files from the Jinja templates in templates/. Python never builds YAML by hand."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from bottle_tasks.plan import (
    BUNDLE_GIT_DIR, BUNDLE_SUPERVISE_DIR, EGRESS_PORT, GIT_GATE_PORT, PIPELOCK_LISTEN, PIPELOCK_SCAN_LISTEN,
    SUPERVISE_PORT, Plan,
)
from bottle_tasks.settings import ROOT

TEMPLATES_DIR = ROOT / "templates"


@cache
def _environment():
    import jinja2  # imported on first render: an up-to-date start never renders

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, plan: Plan, **extra: object) -> str:
    return _environment().get_template(template).render(
        **extra,
        plan=plan,
        egress_port=EGRESS_PORT,
        git_gate_port=GIT_GATE_PORT,
        supervise_port=SUPERVISE_PORT,
        bundle_git_dir=BUNDLE_GIT_DIR,
        bundle_supervise_dir=BUNDLE_SUPERVISE_DIR,
        pipelock_listen=PIPELOCK_LISTEN,
        pipelock_scan_listen=PIPELOCK_SCAN_LISTEN,
    )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file and rename, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
