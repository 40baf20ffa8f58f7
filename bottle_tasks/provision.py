"""Provisioning, backend-neutral: CA trust, the prompt file, skills. Runs against a guest handle
with exec/copy (DockerGuest today, the smolvm guest later)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Protocol

from bottle_tasks.plan import GUEST_CA_PATH, GUEST_PROMPT_PATH, GUEST_SKILLS_DIR, Plan


class Guest(Protocol):
    def exec(self, argv: list[str], *, user: str = ..., input: str | None = ..., check: bool = ...): ...
    def copy(self, source: Path, dest: str) -> None: ...


def provision_ca(plan: Plan, guest: Guest) -> None:
    guest.copy(plan.ca_cert, GUEST_CA_PATH)
    guest.exec(["sh", "-c", f"chmod 644 {GUEST_CA_PATH} && update-ca-certificates >/dev/null"], user="root")


def provision_prompt(plan: Plan, guest: Guest) -> None:
    target_dir = str(Path(GUEST_PROMPT_PATH).parent)
    guest.exec(["mkdir", "-p", target_dir])
    # Through stdin as the agent user: the file ends up owned by the agent, mode 0600.
    guest.exec(["sh", "-c", f"umask 077 && cat > {shlex.quote(GUEST_PROMPT_PATH)}"], input=plan.prompt)


def provision_skills(plan: Plan, guest: Guest) -> None:
    if not plan.skills:
        return
    guest.exec(["mkdir", "-p", GUEST_SKILLS_DIR])
    for skill in plan.skills:
        dest = f"{GUEST_SKILLS_DIR}/{skill.name}"
        guest.exec(["rm", "-rf", dest])
        # docker cp leaves the copy root-owned: readable by the agent, not rewritable by it.
        guest.copy(skill, dest)


def provision(plan: Plan, guest: Guest) -> None:
    provision_ca(plan, guest)
    provision_prompt(plan, guest)
    provision_skills(plan, guest)
