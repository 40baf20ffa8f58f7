"""Render config files from the Jinja templates in bottle_tasks/templates/. Python never builds YAML by hand.

Every template sees the plan and the same context: the bundle's ports and paths, the guest's paths,
and the scan API token (minted once per bottle, in its state dir).
"""

from __future__ import annotations

import secrets
from functools import cache
from pathlib import Path
from typing import Iterable

from bottle_tasks import bundle_plan, plan as plan_module
from bottle_tasks.bundle_plan import ConfigFile
from bottle_tasks.contract import LAN_CIDRS, namespace_root
from bottle_tasks.plan import Plan
from bottle_tasks.settings import package_dir
from bottle_tasks.sidecars.files import atomic_write

TEMPLATES_DIR = package_dir("templates")


@cache
def _environment():
    import jinja2  # imported on first render: an up-to-date start never renders

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # The bundle's ports and paths, and the guest's paths, by their Python names (EGRESS_PORT, GUEST_...).
    for module in (bundle_plan, plan_module):
        env.globals.update({k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, (str, int))})
    env.globals["LAN_CIDRS"] = LAN_CIDRS
    env.filters["namespace_root"] = namespace_root  # {{ plan.agent | namespace_root }}: bottle/<agent>/
    return env


def scan_token(plan: Plan) -> str:
    """The bundle-internal bearer token between egress and pipelock's scan API; stable per bottle."""
    path = plan.state_dir / "pipelock-scan-token"
    if not path.exists():
        write_atomic(path, secrets.token_urlsafe(32), mode=0o600)
    return path.read_text().strip()


def render(template: str, plan: Plan, **extra: object) -> str:
    return render_template(template, plan=plan, **extra)


def render_template(template: str, **context: object) -> str:
    return _environment().get_template(template).render(**context)


def render_files(files: Iterable[ConfigFile], plan: Plan) -> None:
    """Each file from its template, with the same context (the scan token read once)."""
    extra = {"scan_token": scan_token(plan)} if plan.pipelock_enabled else {}
    for file in files:
        write_atomic(file.host_path, render(file.template, plan, **extra), mode=file.mode)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file and rename, so an interrupted run never leaves half a file."""
    atomic_write(path, text, mode=mode)
