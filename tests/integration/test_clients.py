"""The guest's clients trust the bottle CA and use the proxy: curl, python, node and git, each over
HTTPS to a routed host. A client that did not trust the CA would fail the TLS handshake."""

from __future__ import annotations

import subprocess
import sys

from bottle_tasks.settings import ROOT

NODE_VIA_CONNECT = r"""
const http = require("http"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
const req = http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT", path: "upstream.test:443"});
req.on("connect", (res, socket) => {
  if (res.statusCode !== 200) { console.error("CONNECT " + res.statusCode); process.exit(2); }
  // No `ca` option: trust comes from NODE_EXTRA_CA_CERTS, as it does for any node program in the guest.
  const t = tls.connect({socket, servername: "upstream.test"}, () => {
    t.write("GET /from-node HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n");
  });
  let body = ""; t.on("data", d => body += d); t.on("end", () => { console.log(body.split("\r\n")[0]); });
  t.on("error", e => { console.error("TLS: " + e.message); process.exit(3); });
});
req.end();
"""


def test_curl_python_node_and_git_trust_the_bottle_ca(bottle_a):
    curl = bottle_a.exec("curl", "-sS", "-m", "10", "https://upstream.test/from-curl")
    assert curl.returncode == 0 and "/from-curl" in curl.stdout, curl.stderr
    python = bottle_a.exec("python3", "-c", "import urllib.request as u; print(u.urlopen('https://upstream.test/from-python', timeout=10).status)")
    assert python.stdout.strip() == "200", python.stderr
    node = bottle_a.exec("node", "-e", NODE_VIA_CONNECT)
    assert node.returncode == 0 and node.stdout.startswith("HTTP/1.1 200"), node.stdout + node.stderr
    # The stand-in is no git server: git gets past TLS and fails on the smart-HTTP reply, never on trust.
    git = bottle_a.exec("git", "ls-remote", "https://upstream.test/repo.git")
    assert "SSL certificate problem" not in git.stderr and "unable to access" not in git.stderr, git.stderr
    arrived = [r.get("path", "") for r in bottle_a.upstream_log()]
    assert "/from-node" in arrived and any(p.startswith("/repo.git/info/refs") for p in arrived), arrived


def test_without_the_ca_the_same_client_is_refused(bottle_a):
    """The control: the TLS egress presents is the bottle CA's, so a client without it fails."""
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "--cacert", "/etc/ssl/certs/ca-certificates.crt.missing",
                         "https://upstream.test/no-ca")
    assert proc.returncode != 0
    proc = bottle_a.exec("sh", "-c", "SSL_CERT_FILE=/dev/null CURL_CA_BUNDLE=/dev/null curl -sS -m 10 https://upstream.test/no-ca")
    assert proc.returncode != 0 and "certificate" in proc.stderr.lower(), proc.stderr


def test_skills_and_prompt_land_in_the_guest(bottle_a):
    listing = bottle_a.exec("cat", "/home/agent/.claude/skills/probe-skill/SKILL.md")
    assert listing.returncode == 0 and "probe skill" in listing.stdout, listing.stderr
    prompt = bottle_a.exec("cat", "/home/agent/.claude-bottle/prompt.md")
    assert prompt.stdout == "You are a test agent."


def test_start_attaches_a_tty_when_interactive(bottle_a):
    """Under a pseudo-terminal `start` runs the agent with a TTY; piped (the other tests) it does not."""
    env = bottle_a.env
    proc = subprocess.run(["script", "-qec", f"{sys.executable} -m doit -f {ROOT}/dodo.py start agent=probe-a command=tty", "/dev/null"],
                          cwd=ROOT, env=env.env, capture_output=True, text=True, timeout=120)
    assert "/dev/pts/" in proc.stdout, proc.stdout + proc.stderr
    piped = env.doit("start", "agent=probe-a", "command=tty", check=False)
    assert "not a tty" in piped.stdout, piped.stdout


def test_reprovisioning_never_writes_as_root_through_a_link_the_agent_planted(bottle_a):
    """The agent points ~/.claude/skills at a root-owned place; the next provisioning must not write there."""
    planted = bottle_a.exec("sh", "-c", "rm -rf ~/.claude/skills && ln -s /usr/local/share ~/.claude/skills")
    assert planted.returncode == 0, planted.stderr
    skill = bottle_a.env.root / "agents" / "skills" / "probe-skill" / "SKILL.md"
    original = skill.read_text()
    try:
        skill.write_text(original + "A second line.\n")          # changed input: provisioning runs again
        bottle_a.env.doit("start", f"agent={bottle_a.agent}", "command=true")
        leaked = bottle_a.exec("test", "-e", "/usr/local/share/probe-skill", user="root")
        assert leaked.returncode != 0, "root copied the skill through the agent's link into /usr/local/share"
        assert bottle_a.exec("test", "-L", "/home/agent/.claude/skills").returncode != 0
        landed = bottle_a.exec("cat", "/home/agent/.claude/skills/probe-skill/SKILL.md")
        assert "A second line." in landed.stdout, landed.stderr
        # The agent can read its skill but not rewrite it.
        assert bottle_a.exec("sh", "-c", "echo x >> /home/agent/.claude/skills/probe-skill/SKILL.md").returncode != 0
    finally:
        skill.write_text(original)
        bottle_a.env.doit("start", f"agent={bottle_a.agent}", "command=true")
