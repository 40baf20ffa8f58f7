"""Provisioning against a recording guest: what lands where, as whom, and through which channel."""

from __future__ import annotations

from pathlib import Path

from bottle_tasks.backends.base import Guest
from bottle_tasks.plan import (
    GUEST_CA_PATH, GUEST_CLAUDE_MANAGED_SETTINGS, GUEST_PROMPT_PATH, GUEST_SUPERVISE_CONFIG, GUEST_SUPERVISE_HOOK,
)
from bottle_tasks.provision import SUPERVISE_HOOK_SOURCE, provision
from bottle_tasks.runner import Result
from tests.unit.test_bundle_plan import plan  # noqa: F401  (the fixture: git, supervise, all files rendered)


class RecordingGuest(Guest):
    def __init__(self) -> None:
        self.execs: list[tuple[list[str], str, str | None]] = []   # (argv, user, stdin)
        self.copies: list[tuple[Path, str]] = []

    def exec_argv(self, argv, *, user="agent", tty=False, env=None):
        return ["guest", user, *argv]

    def exec(self, argv, *, user="agent", input=None, check=True):
        self.execs.append((list(argv), user, input))
        return Result(tuple(argv), 0, "", "")

    def copy(self, source, dest):
        self.copies.append((Path(source), dest))

    def attach_argv(self, argv, tty):
        return self.exec_argv(argv, tty=tty)

    def identity(self):
        return "guest-1"


def test_ca_prompt_git_and_supervise_land_where_and_as_whom_they_should(plan):  # noqa: F811
    guest = RecordingGuest()
    provision(plan, guest)
    copies = dict((dest, source) for source, dest in guest.copies)
    # The CA is copied, then trusted by root.
    assert copies[GUEST_CA_PATH] == plan.ca_cert
    assert any(user == "root" and "update-ca-certificates" in " ".join(argv) for argv, user, _ in guest.execs)
    # The prompt travels on stdin, written by the agent itself with a 077 umask; no host file of it is copied.
    (prompt,) = [(argv, user, stdin) for argv, user, stdin in guest.execs if stdin is not None]
    assert prompt[1] == "agent" and prompt[2] == plan.prompt and GUEST_PROMPT_PATH in prompt[0][-1]
    assert "umask 077" in prompt[0][-1] and GUEST_PROMPT_PATH not in copies
    # Each repo is cloned (or re-pointed) from git-gate, as the agent.
    clones = [argv[-1] for argv, user, _ in guest.execs if argv[:2] == ["sh", "-c"] and "git clone" in argv[-1]]
    assert len(clones) == len(plan.git.repos) and all(user == "agent" for argv, user, _ in guest.execs if "git clone" in " ".join(argv))
    assert all(f"{plan.git.url}/{repo.name}.git" in c for repo, c in zip(plan.git.repos, clones))
    # The supervise hook and its config are root's, 0644, in the managed-settings places.
    assert copies[GUEST_SUPERVISE_HOOK] == SUPERVISE_HOOK_SOURCE
    assert copies[GUEST_SUPERVISE_CONFIG] == plan.supervise.guest_config.host_path
    assert copies[GUEST_CLAUDE_MANAGED_SETTINGS] == plan.supervise.claude_settings.host_path
    (chmod,) = [(argv, user) for argv, user, _ in guest.execs if argv[0] == "chmod"]
    assert chmod == (["chmod", "0644", GUEST_SUPERVISE_HOOK, GUEST_SUPERVISE_CONFIG, GUEST_CLAUDE_MANAGED_SETTINGS], "root")


def test_an_agent_without_git_or_supervise_gets_neither(tmp_path):
    from bottle_tasks.plan import make_plan
    from bottle_tasks.settings import ROOT
    from bottle_tasks.spec import load_spec
    from tests.unit.test_plan import settings

    plain = make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path))
    guest = RecordingGuest()
    provision(plain, guest)
    assert not any("git" in " ".join(argv) for argv, _, _ in guest.execs)
    assert [dest for _, dest in guest.copies] == [GUEST_CA_PATH]


def test_root_never_writes_into_the_agents_home(tmp_path):
    """The agent may have made any path under its home a link to /etc; so root's copies and commands
    stay in root-owned places, and what lands in the agent's home is done with the agent's rights."""
    from bottle_tasks.plan import GUEST_HOME, GUEST_SKILLS_DIR, GUEST_SKILLS_STORE, make_plan
    from bottle_tasks.settings import ROOT
    from bottle_tasks.spec import load_spec
    from tests.unit.test_plan import settings

    skill = tmp_path / "agents" / "skills" / "review"
    skill.mkdir(parents=True)
    (skill / "SKILL.md").write_text("---\nname: review\n---\n")
    (tmp_path / "agents" / "skilled.yaml").write_text("skills: [skills/review]\n")
    plan = make_plan(load_spec(tmp_path / "agents" / "skilled.yaml"), settings(tmp_path))
    guest = RecordingGuest()
    provision(plan, guest)
    # docker cp (and smolvm cp) write as root: only ever into root-owned paths.
    assert guest.copies and all(not dest.startswith(GUEST_HOME) for _, dest in guest.copies), guest.copies
    assert (skill, f"{GUEST_SKILLS_STORE}/review") in guest.copies
    for argv, user, _ in guest.execs:
        if user == "root":
            assert not any(GUEST_HOME in arg for arg in argv), f"root ran {argv} on the agent's home"
    (link,) = [argv for argv, user, _ in guest.execs if GUEST_SKILLS_DIR in argv]
    assert link[-2:] == [GUEST_SKILLS_DIR, f"{GUEST_SKILLS_STORE}/review"]
    assert all(user == "agent" for argv, user, _ in guest.execs if GUEST_SKILLS_DIR in argv)
