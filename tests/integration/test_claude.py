"""The real client: `claude -p` in the guest completes one turn against a stand-in Messages API the
test owns, reached as api.anthropic.com through egress. This proves CA trust, the proxy env, the
placeholder and the token injection with the real agent binary."""

from __future__ import annotations

import secrets

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


def test_a_key_the_agent_reads_is_redacted_from_the_conversation_and_the_turn_completes(bottle_a):
    """The agent reads a workspace file that holds a key. The next Messages API request carries the
    file's content as a tool result: it reaches the stand-in with the key redacted, not blocked, and
    claude finishes its turn (the stand-in echoes the tool result back as the answer)."""
    key = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    marker = secrets.token_hex(4)
    bottle_a.exec("sh", "-c", f"printf 'AWS_ACCESS_KEY_ID={key}\\nmarker={marker}\\n' > /workspace/creds-{marker}.env",
                  check=True)
    command = f"claude -p 'RUN_BASH: cat /workspace/creds-{marker}.env' --dangerously-skip-permissions"
    proc = bottle_a.env.doit("start", "agent=probe-a", f"command={command}", timeout=300)
    assert "tool result:" in proc.stdout and marker in proc.stdout, proc.stdout + proc.stderr
    assert "[REDACTED:aws_access_key_id]" in proc.stdout
    calls = [r for r in bottle_a.upstream_log() if r.get("path", "").startswith("/v1/messages") and marker in r["body"]]
    assert calls, "the tool result never reached the Messages API"
    assert all(key not in call["body"] for call in calls)
    assert "[REDACTED:aws_access_key_id]" in calls[-1]["body"]
    assert key not in bottle_a.bundle_log()
    assert '"dlp_redacted"' in bottle_a.bundle_log()
