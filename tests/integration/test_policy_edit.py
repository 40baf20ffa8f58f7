"""Invariant 9: the running bottle enforces the agent file as it is now. A bottle is started, its push
branches, supervise timeout and supervised tools are edited, and the next `doit start` must enforce the
new policy in the bundle (git-gate, supervise) and in the guest (the hook's rules)."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.integration.conftest import GIT_TOKEN, Env, _bottle, _seed_upstream, _teardown, docker
from tests.integration.test_git import _guest_git, _upstream_git, approving_pushes
from tests.integration.test_supervise import _finish, _hook, _pending_id

AGENT = "probe-edit"
POLICY = """
routes:
  - host: api.anthropic.com
    private_network: true
    token: {{env: ANTHROPIC_API_KEY, header: x-api-key}}
git:
  user: {{name: Probe Agent, email: probe@bottle.test}}
  repos:
    - name: app
      url: https://git.test/git/app.git
      identity: {{token_env: BOTTLE_TEST_GIT_TOKEN}}
      push: {{branches: {branches}}}
supervise:
  tools: {tools}
  timeout: {timeout}
"""


def _write(env: Env, branches: list[str], tools: list[str], timeout: int) -> None:
    env.write_agent(AGENT, textwrap.dedent(POLICY).format(branches=branches, tools=tools, timeout=timeout))


@pytest.fixture(scope="module")
def edited(bottle_env):
    """The bottle as first started (loose policy), and what the guest saw of it, then the edit and a new start."""
    env = Env(root=bottle_env.root, env={**bottle_env.env, "BOTTLE_TEST_GIT_TOKEN": GIT_TOKEN}, argv_log=bottle_env.argv_log)
    _write(env, branches=["bottle/probe-edit/*", "feature/*"], tools=["Bash(git push:*)"], timeout=30)
    bottle = _bottle(env, AGENT, before_start=lambda b: _seed_upstream(b.upstream))
    try:
        bundle_before = docker("inspect", "-f", "{{.Id}}", bottle.plan.bundle.name).stdout.strip()
        with approving_pushes(bottle):  # Bash(git push:*): git-gate holds every push for a human
            loose = _guest_git(bottle, "git checkout -qb feature/one && git commit -q --allow-empty -m one "
                                       "&& git push -q origin feature/one 2>&1")
        _write(env, branches=["bottle/probe-edit/*"], tools=["Bash(git push:*)", "Bash(npm publish:*)"], timeout=5)
        env.doit("start", f"agent={AGENT}", "command=true")
        yield bottle, bundle_before, loose
    finally:
        _teardown(bottle)


def test_the_loose_policy_held_before_the_edit(edited):
    bottle, _, loose = edited
    assert loose.returncode == 0, loose.stdout + loose.stderr


def test_an_edit_recreates_the_bundle(edited):
    bottle, bundle_before, _ = edited
    assert docker("inspect", "-f", "{{.Id}}", bottle.plan.bundle.name).stdout.strip() != bundle_before


def test_a_push_the_new_branch_rules_forbid_is_rejected(edited):
    bottle, _, _ = edited
    proc = _guest_git(bottle, "git checkout -qb feature/two && git commit -q --allow-empty -m two "
                              "&& git push origin feature/two 2>&1")
    assert proc.returncode != 0 and "branch not allowed (allowed: bottle/probe-edit/*)" in proc.stdout, proc.stdout
    assert _upstream_git(bottle, "rev-parse", "--verify", "--quiet", "refs/heads/feature/two").strip() == ""
    with approving_pushes(bottle):
        allowed = _guest_git(bottle, "git checkout -qb bottle/probe-edit/ok && git commit -q --allow-empty -m ok "
                                     "&& git push -q origin bottle/probe-edit/ok 2>&1")
    assert allowed.returncode == 0, allowed.stdout


def test_the_new_timeout_applies(edited):
    bottle, _, _ = edited
    # The guest's hook asks with the new timeout, and no decision within it means deny.
    hook = _hook(bottle, "git push origin timeout-check")
    out, err = _finish(hook, 60)
    assert hook.returncode == 2 and "within 5 s" in err, (hook.returncode, err)
    # The bundle's own default (a request that names no timeout) is the new one too.
    post = ("import json, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open(u.Request("
            f"'{bottle.plan.supervise.url}/v1/requests', json.dumps({{'tool': 'Bash', 'input': {{}}}}).encode(), "
            "{'Content-Type': 'application/json'})); print(r.read().decode())")
    created = bottle.exec("python3", "-c", post)
    assert created.returncode == 0, created.stderr
    request = json.loads((bottle.plan.supervise.state_dir / "requests" / f"{json.loads(created.stdout)['id']}.json").read_text())
    assert request["timeout_seconds"] == 5, request


def test_a_newly_supervised_tool_call_waits_for_a_human(edited):
    bottle, _, _ = edited
    hook = _hook(bottle, "npm publish --access public")
    request_id = _pending_id(bottle, "npm publish", hook)
    assert hook.poll() is None, "the newly supervised call did not wait for a decision"
    bottle.env.doit("approve", f"agent={AGENT}", f"id={request_id}", "reason=release day")
    out, err = _finish(hook, 30)
    assert hook.returncode == 0, err
