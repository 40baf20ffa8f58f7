"""The real client: `claude -p` in the guest completes one turn against a stand-in Messages API the
test owns, reached as api.anthropic.com through egress. This proves CA trust, the proxy env, the
placeholder and the token injection with the real agent binary."""

from __future__ import annotations

from tests.integration.conftest import FAKE_TOKEN
from tests.integration.upstream.server import MESSAGE_TEXT


def test_claude_print_mode_completes_a_turn(bottle_a):
    proc = bottle_a.env.doit("start", "agent=probe-a", "command=claude -p 'Say hello.'", timeout=300)
    assert MESSAGE_TEXT in proc.stdout, proc.stdout + proc.stderr
    calls = [r for r in bottle_a.upstream_log() if r.get("path", "").startswith("/v1/messages")]
    assert calls, "claude never called the Messages API"
    headers = {k.lower(): v for k, v in calls[-1]["headers"].items()}
    assert headers["x-api-key"] == FAKE_TOKEN
    assert "Say hello." in calls[-1]["body"]
    # The agent file's prompt reached claude through the provisioned prompt file.
    assert "You are a test agent." in calls[-1]["body"]
