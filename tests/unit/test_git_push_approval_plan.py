"""The host side of git-gate's server-side approval and push size limit: the agent file's keys
(git.repos[].push.approve, git.max_push_bytes), how the plan turns a supervise rule about git push
into approval, what the bundle mounts for it, and the rendered git-gate.yaml read back by git-gate
(with its shared mirrors apart from the bottle's own state, and the bottle's branch namespace)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bottle_tasks.bundle_plan import GIT_DIR, GIT_MIRRORS_DIR, SUPERVISE_DIR
from bottle_tasks.contract import DEFAULT_MAX_PUSH_BYTES, namespace_root
from bottle_tasks.plan import covers_git_push, make_plan
from bottle_tasks.render import render
from bottle_tasks.settings import Settings
from bottle_tasks.sidecars.gitgate.config import parse_config
from bottle_tasks.spec import SpecError, load_spec

import yaml

GIT = """
git:
  repos:
    - name: app
      url: https://git.example.com/org/app.git
      identity: {token_env: GIT_TOKEN}
"""


def _plan(tmp_path: Path, text: str):
    path = tmp_path / "agents" / "held.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    settings = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
                                  "BOTTLE_CACHE_DIR": str(tmp_path / "cache")})
    return make_plan(load_spec(path), settings)


@pytest.mark.parametrize("rule", ["Bash(git push:*)", "Bash(git push*)", "Bash(git:*)", "Bash", "*",
                                  "Bash(git  push origin main)", "Bash(*push*)"])
def test_a_rule_about_git_push_covers_every_push(rule):
    assert covers_git_push(rule)


@pytest.mark.parametrize("rule", ["WebFetch", "Bash(npm publish)", "Bash(git status:*)", "Read(/etc/*)", "Bash(("])
def test_rules_about_other_things_do_not(rule):
    assert not covers_git_push(rule)


def test_supervising_git_push_holds_every_push_in_git_gate_whatever_the_guest_hook_sees(tmp_path):
    """`git -C dir push`, `\\git push`, `bash -c "git push"` slip past Bash(git push:*) in the guest;
    the rule now also turns on approval in git-gate, which every push passes."""
    plan = _plan(tmp_path, GIT + 'supervise: {tools: ["Bash(git push:*)"], timeout: 45}\n')
    assert [r.push.approve for r in plan.git.repos] == [True]
    assert plan.git.approval_timeout == 45
    git_gate = next(d for d in plan.bundle.daemons if d.name == "git-gate")
    supervise = next(d for d in plan.bundle.daemons if d.name == "supervise")
    assert [s.target for s in git_gate.state] == [GIT_DIR, GIT_MIRRORS_DIR, SUPERVISE_DIR]
    assert git_gate.state[2] == supervise.state[0]  # the same host dir doit approve decides in
    targets = [m.target for m in plan.bundle.mounts]
    assert targets.count(SUPERVISE_DIR) == 1, "docker refuses two mounts at one target"

    config = parse_config(yaml.safe_load(render("git-gate.yaml.j2", plan)))
    assert config.repos[0].push.approve
    assert config.supervise is not None
    assert (str(config.supervise.state_dir), config.supervise.timeout_seconds) == (SUPERVISE_DIR, 45)
    assert config.max_push_bytes == DEFAULT_MAX_PUSH_BYTES


def test_explicit_approve_holds_pushes_under_a_supervise_section_that_names_other_tools(tmp_path):
    plan = _plan(tmp_path, GIT + "      push: {approve: true}\nsupervise: {tools: [WebFetch]}\n")
    assert plan.git.repos[0].push.approve and plan.git.approval_timeout == 300


def test_without_a_push_rule_nothing_is_held_and_git_gate_mounts_only_its_mirrors(tmp_path):
    plan = _plan(tmp_path, GIT + "supervise: {tools: [WebFetch]}\n")
    assert not plan.git.repos[0].push.approve and plan.git.approval_timeout is None
    git_gate = next(d for d in plan.bundle.daemons if d.name == "git-gate")
    assert [s.target for s in git_gate.state] == [GIT_DIR, GIT_MIRRORS_DIR]
    config = parse_config(yaml.safe_load(render("git-gate.yaml.j2", plan)))
    assert config.supervise is None and not config.repos[0].push.approve


def test_approve_without_a_supervise_section_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SpecError) as caught:
        _plan(tmp_path, GIT + "      push: {approve: true}\n")
    assert "git.repos[0].push.approve" in str(caught.value) and "supervise" in str(caught.value)


def test_max_push_bytes_reaches_git_gate(tmp_path):
    plan = _plan(tmp_path, GIT.replace("git:\n", "git:\n  max_push_bytes: 5242880\n"))
    assert plan.git.max_push_bytes == 5242880
    assert parse_config(yaml.safe_load(render("git-gate.yaml.j2", plan))).max_push_bytes == 5242880


@pytest.mark.parametrize("text,key,words", [
    (GIT.replace("git:\n", "git:\n  max_push_bytes: 10\n"), "git.max_push_bytes", "1048576"),
    (GIT + "      push: {approve: sometimes}\n", "git.repos[0].push.approve", "true or false"),
])
def test_malformed_push_limits_name_the_key(tmp_path, text, key, words):
    with pytest.raises(SpecError) as caught:
        _plan(tmp_path, text)
    assert key in str(caught.value) and words in str(caught.value), str(caught.value)


class _WithInstance:
    """A plan with an instance name (Plan.instance, until the plan has it)."""

    def __init__(self, plan, instance: str):
        self._plan, self.instance = plan, instance

    def __getattr__(self, name):
        return getattr(self._plan, name)


def test_the_rendered_config_splits_mirrors_from_state_and_names_the_namespace(tmp_path):
    plan = _plan(tmp_path, GIT + '      push: {branches: ["*"]}\n')
    config = parse_config(yaml.safe_load(render("git-gate.yaml.j2", plan)))
    assert (str(config.mirrors_dir), str(config.state_dir)) == (GIT_MIRRORS_DIR, GIT_DIR)
    assert str(config.audit_log) == f"{GIT_DIR}/audit.jsonl"  # the audit records link git/audit.jsonl
    push = config.repos[0].push
    assert (push.namespace_root, push.instance) == (namespace_root("held"), "") == ("bottle/held/", "")
    assert push.branch_refusal("bottle/held/x/fix").startswith("branch bottle/held/x/fix is instance x's")

    named = parse_config(yaml.safe_load(render("git-gate.yaml.j2", _WithInstance(plan, "x")))).repos[0].push
    assert named.instance == "x"
    assert named.branch_refusal("bottle/held/x/fix") == ""
    assert named.branch_refusal("bottle/held/fix").startswith("branch bottle/held/fix is the default instance's")
