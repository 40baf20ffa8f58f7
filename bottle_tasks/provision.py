"""Provisioning, backend-neutral: CA trust, the prompt file, skills, git clones, the supervise hook.
Runs against the backend's Guest handle (exec and copy)."""

from __future__ import annotations

import shlex
from pathlib import Path

from bottle_tasks.backends.base import Guest
from bottle_tasks.plan import (
    GUEST_CA_BUNDLE, GUEST_CA_PATH, GUEST_SKILLS_DIR, GUEST_SKILLS_STORE, GUEST_SUPERVISE_DIR, GUEST_SUPERVISE_HOOK, GUEST_WORKSPACE, Plan,
)

SUPERVISE_HOOK_SOURCE = Path(__file__).parent / "guest" / "supervise_hook.py"


def provision_ca(plan: Plan, guest: Guest) -> None:
    guest.copy(plan.ca_cert, GUEST_CA_PATH)
    guest.exec(["sh", "-c", f"chmod 644 {GUEST_CA_PATH} && update-ca-certificates >/dev/null"], user="root")


def provision_prompt(plan: Plan, guest: Guest) -> None:
    target = plan.prompt_file.target
    guest.exec(["mkdir", "-p", str(Path(target).parent)])
    # Through stdin as the agent user: the file ends up owned by the agent, mode 0600.
    guest.exec(["sh", "-c", f"umask 077 && cat > {shlex.quote(target)}"], input=plan.prompt)


def provision_skills(plan: Plan, guest: Guest) -> None:
    """Root copies each skill into a root-owned store the agent cannot touch; the agent then links them
    into ~/.claude/skills with its own rights. Root never writes through a path the agent controls (the
    agent may have made ~/.claude/skills a link to anywhere), and the agent cannot rewrite a skill."""
    if not plan.skills:
        return
    guest.exec(["mkdir", "-p", GUEST_SKILLS_STORE], user="root")
    stored = []
    for skill in plan.skills:
        target = f"{GUEST_SKILLS_STORE}/{skill.name}"
        guest.exec(["rm", "-rf", target], user="root")
        guest.copy(skill, target)
        stored.append(target)
    guest.exec(["chmod", "-R", "a+rX,go-w", *stored], user="root")     # readable by the agent, never writable
    link = ('set -e; d="$1"; shift; if [ -L "$d" ] || [ ! -d "$d" ]; then rm -f "$d"; mkdir -p "$d"; fi; '
            'for s in "$@"; do rm -rf "$d/${s##*/}" 2>/dev/null || true; ln -sfn "$s" "$d/${s##*/}"; done')
    guest.exec(["sh", "-c", link, "sh", GUEST_SKILLS_DIR, *stored])


def provision(plan: Plan, guest: Guest) -> None:
    provision_ca(plan, guest)
    provision_prompt(plan, guest)
    provision_skills(plan, guest)
    provision_git(plan, guest)
    provision_supervise(plan, guest)


def provision_git(plan: Plan, guest: Guest) -> None:
    """Clone each repo from git-gate into the workspace (once: the workspace keeps work) and point it there."""
    if not plan.git:
        return
    git = plan.git
    settings = [
        ("user.name", git.user.name), ("user.email", git.user.email),
        # git-gate is plain HTTP on the internal network: straight to the bundle, not through egress.
        (f"http.{git.url}/.proxy", ""),
        ("http.sslCAInfo", GUEST_CA_BUNDLE),
    ]
    for key, value in settings:
        guest.exec(["git", "config", "--global", key, value])
    for repo in git.repos:
        url = f"{git.url}/{repo.name}.git"
        path = f"{GUEST_WORKSPACE}/{repo.name}"
        script = (f'if [ -d {shlex.quote(path)}/.git ]; then git -C {shlex.quote(path)} remote set-url origin {shlex.quote(url)}; '
                  f'else git clone --quiet {shlex.quote(url)} {shlex.quote(path)}; fi')
        guest.exec(["sh", "-c", script])


def provision_supervise(plan: Plan, guest: Guest) -> None:
    """Install the PreToolUse hook as root-owned policy the agent cannot edit or switch off."""
    if not plan.supervise:
        return
    files = (plan.supervise.guest_config, plan.supervise.claude_settings)
    guest.exec(["mkdir", "-p", GUEST_SUPERVISE_DIR, *(str(Path(f.target).parent) for f in files)], user="root")
    guest.copy(SUPERVISE_HOOK_SOURCE, GUEST_SUPERVISE_HOOK)
    for file in files:
        guest.copy(file.host_path, file.target)
    guest.exec(["chmod", "0644", GUEST_SUPERVISE_HOOK, *(f.target for f in files)], user="root")
