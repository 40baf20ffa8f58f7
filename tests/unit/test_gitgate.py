"""git-gate (the bottle_tasks.sidecars.gitgate package) with real git, all on 127.0.0.1 and temp paths.

An "upstream" bare repo is served by gitgate's own CGI server, subclassed to REQUIRE basic auth with a
fake token. The daemon runs as a subprocess with a temp config; a "guest" clone pushes to it.
Every "secret" here is generated in the test, never a real credential.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from tests.waiting import wait_for

from bottle_tasks.contract import GitIdentity, PushPolicy
from bottle_tasks.sidecars import dlp, pipelock_scan
from bottle_tasks.sidecars.gitgate.__main__ import main as gitgate_main
from bottle_tasks.sidecars.gitgate.config import GitGateConfigError, parse_config
from bottle_tasks.sidecars.gitgate.daemon import GUEST_REFRESH_INTERVAL_S, Gate, MissingTokenError
from bottle_tasks.sidecars.gitgate.hooks import hook_pre_receive, read_spool
from bottle_tasks.sidecars.gitgate import approval, scan
from bottle_tasks.sidecars.gitgate.policy import RefUpdate, evaluate_push
from bottle_tasks.sidecars.gitgate.scan import SecretScanner
from bottle_tasks.sidecars.gitgate.smart_http import GitCgiServer, HttpLimits
from bottle_tasks.sidecars.scrub import SecretScrubber
from bottle_tasks.sidecars.supervise_store import Store
from tests.unit.fakes import FakePipelock
from tests.unit.gitrepos import commit_file, git, one_commit_repo, rev

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fake-git-token-" + "".join(random.choices(string.ascii_letters + string.digits, k=24))
USERNAME = "x-access-token"
MAX_PUSH_BYTES = 2 * 1024 * 1024  # the daemon's receive.maxInputSize
HOLD_TIMEOUT_S = 120               # the "held" repo's pushes wait this long for a human


def fake_aws_key() -> str:
    return "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))


# ---------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AuthGitServer(GitCgiServer):
    """The upstream: smart HTTP that requires Basic auth with the fake token, and records what it saw."""

    expected = "Basic " + base64.b64encode(f"{USERNAME}:{TOKEN}".encode()).decode()

    def __init__(self, *args, **kwargs):
        self.seen_auth: list[str] = []
        super().__init__(*args, **kwargs)

    def authorize(self, handler) -> bool:
        given = handler.headers.get("Authorization", "")
        if given:
            self.seen_auth.append(given)
        if given == self.expected:
            return True
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", 'Basic realm="upstream"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False


class Upstream:
    def __init__(self, root: Path, env: dict):
        self.root = root
        self.env = env
        self.port = 0
        self.server: AuthGitServer | None = None
        self.seen_auth: list[str] = []

    def start(self) -> None:
        self.server = AuthGitServer(("127.0.0.1", self.port), self.root, ["app", "lib", "held"], self.env)
        self.server.seen_auth = self.seen_auth
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.git"


# ---------------------------------------------------------------------------------------------
# fixtures: one upstream, one daemon, one guest clone per repo for the whole module (keeps it fast)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gitgate")
    mp = pytest.MonkeyPatch()
    home = tmp / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("GIT_"):
            mp.delenv(name)
    mp.setenv("HOME", str(home))
    mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
    env = dict(os.environ)

    upstream_root = tmp / "upstream"
    seed = tmp / "seed"
    git("init", "--quiet", "-b", "main", str(seed))
    git("config", "user.name", "Upstream", cwd=seed)
    git("config", "user.email", "upstream@example.invalid", cwd=seed)
    commit_file(seed, "README", "hello\n", "initial")
    for name in ("app", "lib", "held"):
        git("init", "--quiet", "--bare", "-b", "main", str(upstream_root / f"{name}.git"))
        git("push", "--quiet", str(upstream_root / f"{name}.git"), "main", cwd=seed)
    upstream = Upstream(upstream_root, {k: env[k] for k in ("PATH", "HOME", "GIT_CONFIG_NOSYSTEM")})
    upstream.start()

    gate_port = free_port()
    mirrors, state = tmp / "mirrors", tmp / "state"
    config = {
        "version": 1,
        "listen": f"127.0.0.1:{gate_port}",
        "refresh_seconds": 60,
        "mirrors_dir": str(mirrors),
        "state_dir": str(state),
        "audit_log": str(state / "audit.jsonl"),
        "pipelock_scan_url": "",
        "max_push_bytes": MAX_PUSH_BYTES,
        "supervise": {"state_dir": str(tmp / "supervise"), "timeout_seconds": HOLD_TIMEOUT_S},
        "repos": [
            {"name": "app", "url": upstream.url("app"),
             "identity": {"kind": "token", "token_env": "GIT_TOKEN", "username": USERNAME, "ssh_key": ""},
             "push": {"branches": ["bottle/test/*"], "force": False, "delete": False, "tags": False}},
            {"name": "lib", "url": upstream.url("lib"),
             "identity": {"kind": "token", "token_env": "GIT_TOKEN", "username": USERNAME, "ssh_key": ""},
             "push": {"branches": ["*"], "force": True, "delete": True, "tags": True}},
            {"name": "held", "url": upstream.url("held"),
             "identity": {"kind": "token", "token_env": "GIT_TOKEN", "username": USERNAME, "ssh_key": ""},
             "push": {"branches": ["bottle/test/*"], "approve": True}},
        ],
    }
    config_path = tmp / "git-gate.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    stdout_path, stderr_path = tmp / "gate.stdout", tmp / "gate.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "bottle_tasks.sidecars.gitgate", "--config", str(config_path)],
            cwd=REPO_ROOT, stdout=out, stderr=err,
            env={**env, "GIT_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)})

    def listening():
        if daemon.poll() is not None:
            raise AssertionError(f"git-gate exited {daemon.returncode}: {stderr_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", gate_port), timeout=0.2).close()
            return True
        except OSError:
            return False

    assert wait_for(listening, timeout=15)
    gate_url = f"http://127.0.0.1:{gate_port}"
    guests = {}
    for name in ("app", "lib", "held"):
        guest = tmp / f"guest-{name}"
        git("clone", "--quiet", f"{gate_url}/{name}.git", str(guest))
        git("config", "user.name", "Agent", cwd=guest)
        git("config", "user.email", "agent@example.invalid", cwd=guest)
        guests[name] = guest
    world = {
        "tmp": tmp, "upstream": upstream, "mirrors": mirrors, "state": state, "gate_url": gate_url, "guests": guests,
        "daemon": daemon, "stdout": stdout_path, "stderr": stderr_path, "seed": seed, "config": config_path,
        "store": Store(tmp / "supervise"),
    }
    yield world
    daemon.terminate()
    try:
        code = daemon.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        code = "killed: no exit within 10 s of SIGTERM"
    if upstream.server is not None:
        upstream.stop()
    mp.undo()
    assert code == 0, code


def upstream_repo(world, name="app") -> Path:
    return world["upstream"].root / f"{name}.git"


def mirror(world, name="app") -> Path:
    """The gate's own repo (its refs, config and hooks); only fetched objects are in the mirrors dir."""
    return world["state"] / f"{name}.git"


def json_lines(text: str) -> list[dict]:
    """Complete JSON lines only: the writer may be halfway through the last one."""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.startswith("{")]


def audit_records(world) -> list[dict]:
    path = world["state"] / "audit.jsonl"
    return json_lines(path.read_text()) if path.exists() else []


def new_branch(guest: Path, branch: str, start: str = "origin/main") -> None:
    git("checkout", "--quiet", "-B", branch, start, cwd=guest)


def queue(world, name="app") -> Path:
    """The gate's forward queue for the repo: in its own state dir."""
    return world["state"] / "spool" / name / "queue"


def queued_refs(world, name="app") -> list[str]:
    """The refs waiting to be forwarded; an earlier test's forward may still be draining."""
    refs = []
    for entry in queue(world, name).glob("*.json"):
        try:
            refs.append(json.loads(entry.read_text())["ref"])
        except FileNotFoundError:
            continue    # forwarded while we looked
    return refs


def assert_rejected(world, result, ref: str, reason: str, name="app", also: tuple[str, ...] = ()) -> None:
    """Rejected with the reason, and nothing of the push (ref, and the refs in also) queued."""
    assert result.returncode != 0, result.stderr
    assert f"git-gate: rejected {ref}: {reason}" in result.stderr, result.stderr
    assert rev(mirror(world, name), ref) is None or ref == "refs/heads/main"
    assert not {ref, *also} & set(queued_refs(world, name))


# ---------------------------------------------------------------------------------------------
# the daemon end to end


def test_allowed_branch_push_arrives_upstream_with_the_token(world):
    guest = world["guests"]["app"]
    new_branch(guest, "bottle/test/one")
    sha = commit_file(guest, "one.txt", "one\n", "one")
    result = git("push", "origin", "HEAD:refs/heads/bottle/test/one", cwd=guest, check=False)
    assert result.returncode == 0, result.stderr
    assert "git-gate: accepted refs/heads/bottle/test/one" in result.stderr
    assert wait_for(lambda: rev(upstream_repo(world), "refs/heads/bottle/test/one") == sha, timeout=15)
    assert AuthGitServer.expected in world["upstream"].seen_auth
    assert wait_for(lambda: any(r["event"] == "forward" and r["accepted"] for r in audit_records(world)), timeout=15)
    push = [r for r in audit_records(world) if r["event"] == "push" and r["accepted"]]
    assert push[0]["refs"][0]["ref"] == "refs/heads/bottle/test/one" and push[0]["refs"][0]["new"] == sha


def test_push_to_protected_branch_is_rejected(world):
    guest = world["guests"]["app"]
    before = rev(upstream_repo(world), "refs/heads/main")
    new_branch(guest, "main")
    commit_file(guest, "main.txt", "x\n", "to main")
    result = git("push", "origin", "HEAD:refs/heads/main", cwd=guest, check=False)
    assert_rejected(world, result, "refs/heads/main", "branch not allowed (allowed: bottle/test/*)")
    assert rev(mirror(world), "refs/heads/main") == before
    assert rev(upstream_repo(world), "refs/heads/main") == before


def test_force_push_is_rejected(world):
    guest = world["guests"]["app"]
    new_branch(guest, "bottle/test/force")
    commit_file(guest, "f.txt", "1\n", "first")
    assert git("push", "origin", "HEAD:refs/heads/bottle/test/force", cwd=guest, check=False).returncode == 0
    first = rev(guest, "HEAD")
    git("commit", "--quiet", "--amend", "-m", "rewritten", cwd=guest)
    result = git("push", "--force", "origin", "HEAD:refs/heads/bottle/test/force", cwd=guest, check=False)
    assert result.returncode != 0
    assert "git-gate: rejected refs/heads/bottle/test/force: non-fast-forward update not allowed" in result.stderr
    assert rev(mirror(world), "refs/heads/bottle/test/force") == first
    assert wait_for(lambda: rev(upstream_repo(world), "refs/heads/bottle/test/force") == first, timeout=15)
    time.sleep(0.3)
    assert rev(upstream_repo(world), "refs/heads/bottle/test/force") == first


def test_ref_deletion_is_rejected(world):
    guest = world["guests"]["app"]
    assert wait_for(lambda: rev(upstream_repo(world), "refs/heads/bottle/test/one"), timeout=15)
    result = git("push", "origin", ":refs/heads/bottle/test/one", cwd=guest, check=False)
    assert result.returncode != 0
    assert "git-gate: rejected refs/heads/bottle/test/one: deletion not allowed" in result.stderr
    assert rev(mirror(world), "refs/heads/bottle/test/one")
    assert rev(upstream_repo(world), "refs/heads/bottle/test/one")


def test_tag_is_rejected_when_not_allowed(world):
    guest = world["guests"]["app"]
    git("tag", "v-test", "origin/main", cwd=guest)
    result = git("push", "origin", "refs/tags/v-test", cwd=guest, check=False)
    assert_rejected(world, result, "refs/tags/v-test", "tags not allowed")
    assert rev(upstream_repo(world), "refs/tags/v-test") is None


def test_commit_with_a_secret_is_rejected_without_showing_it(world):
    guest = world["guests"]["app"]
    key = fake_aws_key()
    new_branch(guest, "bottle/test/secret")
    clean = commit_file(guest, "ok.txt", "fine\n", "clean commit")
    leaky = commit_file(guest, "config.ini", f"[aws]\naccess_key = {key}\n", "add config")
    result = git("push", "origin", "HEAD:refs/heads/bottle/test/secret", cwd=guest, check=False)
    assert_rejected(world, result, "refs/heads/bottle/test/secret",
                    f"secret in the added lines of commit {leaky[:12]}: aws_access_key_id")
    assert clean[:12] not in result.stderr  # only the commit that adds the secret is named
    assert key not in result.stderr and key not in result.stdout
    assert rev(upstream_repo(world), "refs/heads/bottle/test/secret") is None
    records = wait_for(lambda: [r for r in audit_records(world) if r["event"] == "push" and not r["accepted"]
                                  and r["refs"][0]["ref"] == "refs/heads/bottle/test/secret"], timeout=15)
    assert "aws_access_key_id" in records[0]["reason"]
    assert key not in (world["state"] / "audit.jsonl").read_text()
    assert key not in world["stdout"].read_text()


def test_keys_in_an_author_and_a_rename_target_are_rejected_through_the_gate_without_showing_them(world):
    """The places beyond the diff (tests/unit/test_gitgate_scan.py has them all), pushed for real."""
    guest = world["guests"]["app"]
    in_author, in_name = fake_aws_key(), fake_aws_key()
    new_branch(guest, "bottle/test/author")
    git("commit", "--quiet", "--allow-empty", f"--author=Dev {in_author} <dev@example.invalid>", "-m", "empty",
        cwd=guest)
    author_commit = rev(guest, "HEAD")
    result = git("push", "origin", "HEAD:refs/heads/bottle/test/author", cwd=guest, check=False)
    assert_rejected(world, result, "refs/heads/bottle/test/author",
                    f"secret in the author of commit {author_commit[:12]}: aws_access_key_id")
    new_branch(guest, "bottle/test/rename")
    git("mv", "README", f"{in_name}.md", cwd=guest)
    git("commit", "--quiet", "-m", "a rename adds no line", cwd=guest)
    rename_commit = rev(guest, "HEAD")
    result = git("push", "origin", "HEAD:refs/heads/bottle/test/rename", cwd=guest, check=False)
    assert_rejected(world, result, "refs/heads/bottle/test/rename",
                    f"secret in the file names of commit {rename_commit[:12]}: aws_access_key_id")
    wait_for(lambda: [r for r in audit_records(world) if r["event"] == "push" and not r["accepted"]
                      and r["refs"][0]["ref"] == "refs/heads/bottle/test/rename"], timeout=15)
    for text in (result.stderr, (world["state"] / "audit.jsonl").read_text(), world["stdout"].read_text()):
        assert in_author not in text and in_name not in text
    new_branch(guest, "bottle/test/clean-rename")
    git("mv", "README", "README.md", cwd=guest)
    git("commit", "--quiet", "-m", "a clean rename", cwd=guest)
    assert git("push", "origin", "HEAD:refs/heads/bottle/test/clean-rename", cwd=guest, check=False).returncode == 0


def test_one_bad_ref_rejects_the_whole_push(world):
    guest = world["guests"]["app"]
    new_branch(guest, "bottle/test/mixed")
    commit_file(guest, "m.txt", "m\n", "mixed")
    result = git("push", "origin", "HEAD:refs/heads/bottle/test/mixed", "HEAD:refs/heads/release", cwd=guest,
                 check=False)
    assert_rejected(world, result, "refs/heads/release", "branch not allowed", also=("refs/heads/bottle/test/mixed",))
    assert rev(mirror(world), "refs/heads/bottle/test/mixed") is None


def test_push_while_upstream_is_down_is_forwarded_once_it_is_back(world):
    guest = world["guests"]["app"]
    upstream = world["upstream"]
    upstream.stop()
    try:
        new_branch(guest, "bottle/test/later")
        sha = commit_file(guest, "later.txt", "later\n", "while upstream is down")
        result = git("push", "origin", "HEAD:refs/heads/bottle/test/later", cwd=guest, check=False)
        assert result.returncode == 0, result.stderr
        assert rev(mirror(world), "refs/heads/bottle/test/later") == sha
        assert wait_for(lambda: [r for r in audit_records(world) if r["event"] == "forward" and not r["accepted"]
                                   and r["refs"][0]["ref"] == "refs/heads/bottle/test/later"], timeout=15)
    finally:
        upstream.start()
    assert wait_for(lambda: rev(upstream_repo(world), "refs/heads/bottle/test/later") == sha, timeout=20)
    assert wait_for(lambda: not list(queue(world).glob("*.json")), timeout=15)


def test_fetch_sees_a_new_upstream_commit(world):
    seed, guest = world["seed"], world["guests"]["app"]
    git("checkout", "--quiet", "main", cwd=seed)
    git("pull", "--quiet", "--ff-only", str(upstream_repo(world)), "main", cwd=seed)
    sha = commit_file(seed, "upstream.txt", "new upstream work\n", "upstream moves")
    git("push", "--quiet", str(upstream_repo(world)), "main", cwd=seed)
    time.sleep(GUEST_REFRESH_INTERVAL_S + 0.1)  # the guest refresh is rate limited
    git("fetch", "--quiet", "origin", cwd=guest)
    assert rev(guest, "refs/remotes/origin/main") == sha
    # agent branches awaiting nothing are still there: refresh never prunes
    assert rev(mirror(world), "refs/heads/bottle/test/later")


def test_allowed_force_delete_and_tag_are_forwarded(world):
    guest = world["guests"]["lib"]
    up = upstream_repo(world, "lib")
    new_branch(guest, "feature")
    commit_file(guest, "a.txt", "a\n", "a")
    assert git("push", "origin", "HEAD:refs/heads/feature", cwd=guest, check=False).returncode == 0
    git("commit", "--quiet", "--amend", "-m", "a, rewritten", cwd=guest)
    rewritten = rev(guest, "HEAD")
    result = git("push", "--force", "origin", "HEAD:refs/heads/feature", cwd=guest, check=False)
    assert result.returncode == 0, result.stderr
    git("tag", "-a", "-m", "release", "v1", cwd=guest)
    tag = rev(guest, "refs/tags/v1")
    assert git("push", "origin", "refs/tags/v1", cwd=guest, check=False).returncode == 0
    assert wait_for(lambda: rev(up, "refs/heads/feature") == rewritten and rev(up, "refs/tags/v1") == tag, timeout=15)
    assert git("push", "origin", ":refs/heads/feature", cwd=guest, check=False).returncode == 0
    assert wait_for(lambda: rev(up, "refs/heads/feature") is None, timeout=15)
    forwards = [r for r in audit_records(world) if r["event"] == "forward" and r["repo"] == "lib" and r["accepted"]]
    assert any(r["force"] for r in forwards)


def test_gzipped_request_bodies_are_served(world):
    """A fetch with many wants makes git gzip its upload-pack request (Content-Encoding: gzip)."""
    seed, up = world["seed"], upstream_repo(world, "lib")
    tree = rev(seed, "HEAD^{tree}")
    lines = []
    for i in range(40):
        commit = git("commit-tree", tree, "-m", f"branch {i}", cwd=seed).stdout.strip()
        lines.append(f"create refs/heads/many/{i:02d} {commit}")
    git("push", "--quiet", str(up), *(f"{line.split()[2]}:{line.split()[1]}" for line in lines), cwd=seed)
    guest = world["guests"]["lib"]

    def fetched() -> bool:
        # The mirror refreshes at most once per GUEST_REFRESH_INTERVAL_S; under load one fetch can come too soon.
        git("fetch", "--quiet", "origin", cwd=guest)
        return rev(guest, "refs/remotes/origin/many/39") == lines[-1].split()[2]
    wait_for(fetched, timeout=15, what="the 40 new branches in the guest", interval=GUEST_REFRESH_INTERVAL_S / 2)
    events = json_lines(world["stdout"].read_text())
    assert any(e.get("event") == "http" and e.get("gzip") and e.get("status") == 200 for e in events)


def test_large_push_with_a_chunked_request_body_is_forwarded(world):
    """Above http.postBuffer (1 MiB) git streams the pack with Transfer-Encoding: chunked."""
    guest, up = world["guests"]["lib"], upstream_repo(world, "lib")
    new_branch(guest, "big")
    (guest / "blob.bin").write_bytes(random.randbytes(1_200_000))
    git("add", "blob.bin", cwd=guest)
    git("commit", "--quiet", "-m", "a large incompressible file", cwd=guest)
    sha = rev(guest, "HEAD")
    result = git("push", "origin", "HEAD:refs/heads/big", cwd=guest, check=False)
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: rev(up, "refs/heads/big") == sha, timeout=15)
    events = json_lines(world["stdout"].read_text())
    assert any(e.get("event") == "http" and e.get("service") == "git-receive-pack" and e.get("chunked")
               and e.get("status") == 200 for e in events)


def test_unknown_repo_and_dumb_protocol_are_refused(world):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for path, status in (("/other.git/info/refs?service=git-upload-pack", 404), ("/app.git/HEAD", 404),
                         ("/app.git/info/refs", 403), ("/../app.git/info/refs?service=git-upload-pack", 404)):
        with pytest.raises(urllib.error.HTTPError) as caught:
            opener.open(world["gate_url"] + path, timeout=5)
        assert caught.value.code == status, path


def test_token_never_appears_in_audit_or_output(world):
    # runs last: by now pushes, rejections, failed and successful forwards have all been logged
    outputs = [(world["state"] / "audit.jsonl").read_text(), world["stdout"].read_text(),
               world["stderr"].read_text()]
    encoded = base64.b64encode(f"{USERNAME}:{TOKEN}".encode()).decode()
    for text in outputs:
        assert TOKEN not in text
        assert encoded not in text
    events = {r["event"] for r in audit_records(world)}
    assert {"push", "forward"} <= events
    for hook in ("pre-receive", "post-receive"):
        assert TOKEN not in (mirror(world) / "git-gate" / "hooks" / hook).read_text()
    assert world["daemon"].poll() is None


# ---------------------------------------------------------------------------------------------
# the policy function without HTTP


@pytest.fixture()
def plain_repo(tmp_path, monkeypatch):
    return one_commit_repo(tmp_path, monkeypatch)


ZERO = "0" * 40
POLICY = PushPolicy(branches=("bottle/*",))


def decide(repo: Path, *updates: tuple[str, str, str], policy=POLICY):
    parsed = [RefUpdate(old, new, ref) for old, new, ref in updates]
    return evaluate_push(policy, parsed, repo, SecretScanner())


def test_policy_removing_a_secret_is_fine_adding_one_in_a_merge_is_not(plain_repo):
    key = fake_aws_key()
    base = rev(plain_repo, "HEAD")
    git("branch", "-m", "bottle/x", cwd=plain_repo)
    with_key = commit_file(plain_repo, "k.txt", key + "\n", "add key")
    git("update-ref", "refs/heads/main", with_key, cwd=plain_repo)  # the key is already "in the mirror"
    removed = commit_file(plain_repo, "k.txt", "gone\n", "remove key")
    [decision] = decide(plain_repo, (with_key, removed, "refs/heads/bottle/x"))
    assert decision.accepted, decision.reasons

    # an evil merge: the key appears only in the merge result
    git("checkout", "--quiet", "-b", "side", base, cwd=plain_repo)
    side = commit_file(plain_repo, "side.txt", "side\n", "side")
    git("checkout", "--quiet", "bottle/x", cwd=plain_repo)
    git("merge", "--quiet", "--no-commit", "side", cwd=plain_repo)
    (plain_repo / "evil.txt").write_text(f"key={fake_aws_key()}\n")
    git("add", "evil.txt", cwd=plain_repo)
    git("commit", "--quiet", "-m", "merge side", cwd=plain_repo)
    merge = rev(plain_repo, "HEAD")
    git("update-ref", "refs/heads/main", removed, cwd=plain_repo)
    git("update-ref", "-d", "refs/heads/side", cwd=plain_repo)
    git("update-ref", "-d", "refs/heads/bottle/x", cwd=plain_repo)
    [decision] = decide(plain_repo, (removed, merge, "refs/heads/bottle/x"))
    assert decision.reasons == (f"secret in the added lines of commit {merge[:12]}: aws_access_key_id",)
    assert side[:12] not in " ".join(decision.reasons)


def test_policy_reasons_are_all_reported(plain_repo):
    base = rev(plain_repo, "HEAD")
    git("update-ref", "refs/heads/keep", base, cwd=plain_repo)
    decisions = decide(plain_repo, (ZERO, base, "refs/notes/commits"), (base, ZERO, "refs/heads/main"),
                       (ZERO, base, "refs/tags/v1"))
    assert decisions[0].reasons == ("ref not allowed (only refs/heads/* and refs/tags/*)",)
    assert decisions[1].reasons == ("branch not allowed (allowed: bottle/*)", "deletion not allowed")
    assert decisions[2].reasons == ("tags not allowed",)


def test_pre_receive_hook_prints_one_line_per_reason_and_spools_an_event(plain_repo, tmp_path):
    config = parse_config({
        "version": 1, "listen": "127.0.0.1:0", "mirrors_dir": str(tmp_path / "m"), "state_dir": str(tmp_path / "s"),
        "repos": [{"name": "r", "url": "https://git.example.invalid/r.git", "push": {"branches": ["bottle/*"]}}]})
    repo = config.repos[0]
    mirror_dir = tmp_path / "s" / "r.git"
    git("clone", "--quiet", "--bare", str(plain_repo), str(mirror_dir))
    head = rev(mirror_dir, "refs/heads/main")
    stderr = io.StringIO()
    code = hook_pre_receive(config, repo, f"{head} {ZERO} refs/heads/main\n", stderr, environ=os.environ)
    assert code == 1
    assert stderr.getvalue().splitlines() == [
        "git-gate: rejected refs/heads/main: branch not allowed (allowed: bottle/*)",
        "git-gate: rejected refs/heads/main: deletion not allowed",
    ]
    [(_, event)] = read_spool(tmp_path / "s" / "spool" / "r" / "events")
    assert event["event"] == "push" and event["accepted"] is False and event["repo"] == "r"


def test_pipelock_verdicts_reject_and_its_absence_fails_closed(plain_repo):
    """pipelock's own patterns reach places the floor does not know: here a token only pipelock flags, in
    the author's name; the floor finds nothing, so the verdict is pipelock's."""
    custom = "custom-" + "".join(random.choices(string.ascii_lowercase, k=20))
    git("branch", "-m", "bottle/p", cwd=plain_repo)
    git("commit", "--quiet", "--allow-empty", f"--author=Dev {custom} <dev@example.invalid>", "-m", "empty",
        cwd=plain_repo)
    head = rev(plain_repo, "HEAD")
    update = [RefUpdate(ZERO, head, "refs/heads/bottle/p")]
    git("update-ref", "-d", "refs/heads/bottle/p", cwd=plain_repo)

    def verdict(request):
        if custom not in request["input"]["text"]:
            return 200, {"status": "completed", "decision": "allow", "findings": []}
        return 200, {"status": "completed", "decision": "deny", "findings": [
            {"scanner": "dlp", "rule_id": "DLP-Custom Token", "severity": "high", "message": "m"}]}
    deny = FakePipelock(verdict)
    down = FakePipelock(lambda _: (503, {"status": "error", "errors": [{"code": "busy"}]}))
    try:
        [denied] = evaluate_push(POLICY, update, plain_repo,
                                         SecretScanner(pipelock_scan.PipelockClient(deny.url, "t")))
        [unavailable] = evaluate_push(POLICY, update, plain_repo,
                                              SecretScanner(pipelock_scan.PipelockClient(down.url, "t")))
    finally:
        deny.close()
        down.close()
    assert denied.reasons == (f"secret in the author of commit {head[:12]}: pipelock:DLP-Custom Token",)
    assert "base" in deny.requests[0][0]["input"]["text"]  # the first call holds the whole push
    assert len(deny.requests) < 16  # then halves, to find the place
    assert len(unavailable.reasons) == 1 and unavailable.reasons[0].startswith("secret scan unavailable")


def test_hook_fails_closed_on_a_broken_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{ZERO} {'1' * 40} refs/heads/x\n"))
    code = gitgate_main(["pre-receive", "--config", str(tmp_path / "missing.yaml"), "--repo", "app"])
    assert code == 1
    assert "push rejected" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# configuration


BASE = {"version": 1, "listen": "10.0.0.2:8081", "mirrors_dir": "/var/lib/bottle/mirrors", "state_dir": "/var/lib/bottle/git",
        "repos": [{"name": "app", "url": "https://git.example.com/org/app.git",
                   "identity": {"kind": "token", "token_env": "GIT_TOKEN", "username": "", "ssh_key": ""},
                   "push": {"branches": ["bottle/x/*"], "force": False, "delete": False, "tags": False}}]}


def test_config_parses_the_contract_shape():
    config = parse_config(BASE)
    assert (config.listen_host, config.listen_port, config.refresh_seconds) == ("10.0.0.2", 8081, 60.0)
    assert config.audit_log == Path("/var/lib/bottle/git/audit.jsonl")
    assert config.repos[0].identity == GitIdentity("token", token_env="GIT_TOKEN", username="x-access-token")
    assert config.repos[0].push.branch_allowed("bottle/x/feature")
    assert not config.repos[0].push.branch_allowed("main")


@pytest.mark.parametrize("patch, message", [
    ({"version": 2}, "version: must be 1"),
    ({"listen": "nope"}, "listen: must be \"ip:port\""),
    ({"colour": 1}, "colour: unknown key"),
    ({"repos": [{**BASE["repos"][0], "name": "a/b"}]}, "repos[0].name:"),
    ({"repos": [{**BASE["repos"][0], "url": "-oProxyCommand=x"}]}, "repos[0].url:"),
    ({"repos": [{**BASE["repos"][0], "identity": {"kind": "token", "token_env": ""}}]}, "repos[0].identity.token_env:"),
    ({"repos": [{**BASE["repos"][0], "identity": {"kind": "ssh", "ssh_key": ""}}]}, "repos[0].identity.ssh_key:"),
    ({"repos": [{**BASE["repos"][0], "push": {"force": "yes"}}]}, "repos[0].push.force: must be true or false"),
    ({"repos": [BASE["repos"][0], BASE["repos"][0]]}, "repos[1].name: duplicate"),
    ({"repos": [{**BASE["repos"][0], "push": {"approve": True}}]}, "repos[0].push.approve: needs supervise"),
    ({"supervise": {"state_dir": "relative", "timeout_seconds": 5}}, "supervise.state_dir: must be an absolute path"),
    ({"supervise": {"state_dir": "/s", "timeout_seconds": 0}}, "supervise.timeout_seconds: must be an integer"),
    ({"max_push_bytes": 0}, "max_push_bytes: must be a positive number"),
    ({"state_dir": None}, "state_dir: is required"),
    ({"state_dir": "var/lib/bottle/git"}, "state_dir: must be an absolute path"),
    ({"state_dir": "/var/lib/bottle/mirrors/"}, "state_dir: must be apart from mirrors_dir"),
    ({"state_dir": "/var/lib/bottle/mirrors/x"}, "state_dir: must be apart from mirrors_dir"),
    ({"state_dir": "/var/lib/bottle"}, "state_dir: must be apart from mirrors_dir"),
    ({"repos": [{**BASE["repos"][0], "push": {"namespace_root": "bottle/x"}}]},
     'repos[0].push.namespace_root: must be a branch prefix of whole names ending in "/"'),
    ({"repos": [{**BASE["repos"][0], "push": {"namespace_root": "bottle/*/"}}]}, "repos[0].push.namespace_root:"),
    ({"repos": [{**BASE["repos"][0], "push": {"namespace_root": "bottle/x/", "instance": "y/z"}}]},
     "repos[0].push.instance: must be letters, digits"),
    ({"repos": [{**BASE["repos"][0], "push": {"instance": "y"}}]}, "repos[0].push.instance: needs repos[0].push.namespace_root"),
])
def test_config_errors_name_file_and_key(patch, message):
    with pytest.raises(GitGateConfigError) as caught:
        parse_config({**BASE, **patch}, source="/etc/bottle/git-gate.yaml")
    assert str(caught.value).startswith("/etc/bottle/git-gate.yaml: ")
    assert message in str(caught.value)


def test_missing_token_variable_is_a_clear_startup_error(tmp_path):
    config = parse_config({**BASE, "mirrors_dir": str(tmp_path / "m"), "state_dir": str(tmp_path / "s")})
    with pytest.raises(MissingTokenError, match=r"repos\[0\].identity.token_env: GIT_TOKEN"):
        Gate(config, tmp_path / "git-gate.yaml", environ={})


def test_scrubber_redacts_token_basic_auth_and_userinfo():
    scrubber = SecretScrubber.credentials([("u", "s3cret-token-value")])
    basic = base64.b64encode(b"u:s3cret-token-value").decode()
    text = scrubber.text(f"fatal: https://u:s3cret-token-value@host/x failed; Basic {basic}; s3cret-token-value")
    assert "s3cret-token-value" not in text and basic not in text


def test_upstream_ca_joins_the_system_store_for_upstream_git_only(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "upstream-ca.pem").write_text(pem)
    config = parse_config({**BASE, "mirrors_dir": str(tmp_path / "m"), "state_dir": str(tmp_path / "s")})
    gate = Gate(config, tmp_path / "git-gate.yaml", environ={"GIT_TOKEN": "t0ken", "PATH": os.environ["PATH"]},
                        upstream_ca=tmp_path / "upstream-ca.pem")
    gate.setup()
    env = gate.upstream_env(config.repos[0])
    assert Path(env["GIT_SSL_CAINFO"]).read_text().endswith(pem)
    assert env["GIT_GATE_PASSWORD"] == "t0ken" and "GIT_TOKEN" not in env
    assert "GIT_SSL_CAINFO" not in gate.cgi_env() and "t0ken" not in json.dumps(gate.cgi_env())


# ---------------------------------------------------------------------------------------------
# attack: walking around supervise. The guest hook matches Bash commands (best effort: `git -C dir
# push`, `\git push`, `bash -c "git push"` slip past Bash(git push:*)); git-gate holds every push of
# a repo with push.approve in the supervise queue until a human decides, however git was invoked.


def _push_in_background(*args: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(proc=git(*args, check=False)), daemon=True)
    thread.start()
    return thread, outcome


def _pending_push(store: Store, branch: str):
    return wait_for(lambda: next((r for r in store.list_pending() if r.tool == "git push" and branch in r.summary),
                                 None), timeout=30, what=f"a pending git push request for {branch}")


def test_push_made_any_way_waits_for_a_human_and_lands_only_once_approved(world):
    guest, store = world["guests"]["held"], world["store"]
    new_branch(guest, "bottle/test/held")
    sha = commit_file(guest, "held.txt", "one\ntwo\n", "work to approve")
    thread, outcome = _push_in_background("-C", str(guest), "push", "origin", "HEAD:refs/heads/bottle/test/held")
    request = _pending_push(store, "bottle/test/held")
    # What the human sees (doit supervise prints summary and input): repo, branch, range, diffstat.
    assert request.summary.startswith("git push to held: bottle/test/held new at " + sha[:12])
    assert "1 commit(s), 1 file changed, 2 insertions(+)" in request.summary
    [ref] = request.input["refs"]
    assert (ref["ref"], ref["new"], ref["change"]) == ("refs/heads/bottle/test/held", sha, "create")
    assert any("held.txt" in line for line in ref["diffstat"]) and ref["commits"][0].endswith("Agent: work to approve")
    assert thread.is_alive(), "the push did not wait for the decision"
    assert rev(mirror(world, "held"), "refs/heads/bottle/test/held") is None
    assert rev(upstream_repo(world, "held"), "refs/heads/bottle/test/held") is None
    store.decide(request.id, "approve", "tester", "looks fine")
    thread.join(timeout=60)
    proc = outcome["proc"]
    assert proc.returncode == 0, proc.stderr
    assert f"git-gate: the push to held waits for a human: request {request.id}" in proc.stderr
    assert f"git-gate: approved by tester: looks fine (request {request.id})" in proc.stderr
    assert wait_for(lambda: rev(upstream_repo(world, "held"), "refs/heads/bottle/test/held") == sha, timeout=15)
    records = wait_for(lambda: [r for r in audit_records(world) if r["event"] == "push" and r["repo"] == "held"
                                  and r["accepted"]], timeout=15)
    assert records[-1]["approval"] == {"status": "approved", "request": request.id, "by": "tester",
                                       "reason": "looks fine"}


def test_push_denied_by_a_human_is_rejected_with_the_reason_and_never_arrives(world):
    guest, store = world["guests"]["held"], world["store"]
    new_branch(guest, "bottle/test/denied")
    commit_file(guest, "denied.txt", "no\n", "work to deny")
    thread, outcome = _push_in_background("-C", str(guest), "push", "origin", "HEAD:refs/heads/bottle/test/denied")
    request = _pending_push(store, "bottle/test/denied")
    store.decide(request.id, "deny", "tester", "not this one")
    thread.join(timeout=60)
    proc = outcome["proc"]
    assert proc.returncode != 0
    assert (f"git-gate: rejected refs/heads/bottle/test/denied: denied by tester: not this one "
            f"(request {request.id})") in proc.stderr, proc.stderr
    assert rev(mirror(world, "held"), "refs/heads/bottle/test/denied") is None
    assert not list(queue(world, "held").glob("*.json"))
    assert rev(upstream_repo(world, "held"), "refs/heads/bottle/test/denied") is None


class FakeTime:
    """One clock for the store (UTC) and the wait (monotonic); sleeping advances it and runs on_sleep."""

    def __init__(self):
        self.elapsed = 0.0
        self.sleeps = 0
        self.on_sleep = lambda: None

    def clock(self):
        from datetime import datetime, timedelta, timezone
        return datetime(2031, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.elapsed += seconds
        self.sleeps += 1
        self.on_sleep()


@pytest.fixture()
def held_mirror(plain_repo, tmp_path):
    """A mirror of plain_repo whose repo r holds pushes for a human, a commit on bottle/x that the
    mirror has (fetched, so in the object store) but no ref reaches yet, and a fake clock."""
    config = parse_config({
        "version": 1, "listen": "127.0.0.1:0", "mirrors_dir": str(tmp_path / "m"), "state_dir": str(tmp_path / "s"),
        "supervise": {"state_dir": str(tmp_path / "supervise"), "timeout_seconds": 30},
        "repos": [{"name": "r", "url": "https://git.example.invalid/r.git",
                   "push": {"branches": ["bottle/*"], "approve": True}}]})
    mirror_dir = tmp_path / "s" / "r.git"
    git("clone", "--quiet", "--bare", str(plain_repo), str(mirror_dir))
    git("checkout", "--quiet", "-b", "bottle/x", cwd=plain_repo)
    sha = commit_file(plain_repo, "feature.txt", "a\nb\nc\n", "feature work")
    git("fetch", "--quiet", str(plain_repo), "bottle/x", cwd=mirror_dir)  # objects only (FETCH_HEAD)
    fake = FakeTime()
    store = Store(tmp_path / "supervise", clock=fake.clock)

    def hold(link, repo, updates, repo_dir, out, env=None):
        summary, details = approval.describe_push(repo, updates, repo_dir, env)
        return approval.wait_for_human(store, repo, summary, details, link.timeout_seconds, out,
                                       monotonic=fake.monotonic, sleep=fake.sleep)

    def run(ref="refs/heads/bottle/x"):
        stderr = io.StringIO()
        code = hook_pre_receive(config, config.repos[0], f"{ZERO} {sha} {ref}\n", stderr, environ=os.environ,
                                hold=hold)
        return code, stderr.getvalue()

    return types.SimpleNamespace(config=config, mirror=mirror_dir, events=tmp_path / "s" / "spool" / "r" / "events",
                                 sha=sha, fake=fake, store=store, run=run)


def _decide_on_third_sleep(held, decision: str, reason: str) -> None:
    def on_sleep():
        if held.fake.sleeps == 3:
            [request] = held.store.list_pending()
            held.store.decide(request.id, decision, "alice", reason)
    held.fake.on_sleep = on_sleep


def test_held_push_goes_in_only_after_approval(held_mirror):
    _decide_on_third_sleep(held_mirror, "approve", "ship it")
    code, stderr = held_mirror.run()
    assert code == 0, stderr
    assert "git-gate: approved by alice: ship it" in stderr
    [(_, event)] = read_spool(held_mirror.events)
    assert event["accepted"] and event["approval"]["status"] == "approved" and event["approval"]["by"] == "alice"


def test_held_push_denied_gets_the_human_reason_on_every_ref(held_mirror):
    _decide_on_third_sleep(held_mirror, "deny", "wrong branch")
    code, stderr = held_mirror.run()
    assert code == 1
    [line] = [l for l in stderr.splitlines() if l.startswith("git-gate: rejected")]
    assert line.startswith("git-gate: rejected refs/heads/bottle/x: denied by alice: wrong branch (request ")
    [(_, event)] = read_spool(held_mirror.events)
    assert not event["accepted"] and "wrong branch" in event["reason"]


def test_held_push_nobody_decides_expires_into_a_rejection(held_mirror):
    code, stderr = held_mirror.run()
    assert code == 1
    assert "git-gate: rejected refs/heads/bottle/x: no human approved the push within 30 s, so it is denied" in stderr
    assert stderr.count("git-gate: still waiting for a human to approve request") >= 2  # every 10 s
    assert held_mirror.fake.elapsed < 60  # bounded by the timeout (fake seconds, no real wait)
    assert [h["event"] for h in held_mirror.store.history()] == ["request", "expired"]


def test_a_push_the_policy_rejects_never_bothers_the_human(held_mirror):
    code, stderr = held_mirror.run("refs/heads/main")
    assert code == 1 and "branch not allowed" in stderr
    assert held_mirror.store.history() == []


def test_the_wait_runs_as_the_state_dir_owner_when_git_gate_is_root(held_mirror, tmp_path, monkeypatch):
    """In the bundle git-gate is root; what doit reads must be the host user's, so a child that has
    become the state dir's owner files the request and waits; its verdict comes back to the hook."""
    became = tmp_path / "became"
    monkeypatch.setattr(approval, "state_dir_owner", lambda _dir: (os.getuid(), os.getgid()))
    monkeypatch.setattr(approval, "become", lambda uid, gid: became.write_text(f"{uid}:{gid}"))
    store = Store(tmp_path / "supervise").ensure_layout()  # the host lays it out before the bundle starts

    def decide_when_asked():
        request = wait_for(lambda: next(iter(store.list_pending()), None), timeout=30, what="the request")
        store.decide(request.id, "deny", "bob", "from the parent")
    decider = threading.Thread(target=decide_when_asked, daemon=True)
    decider.start()
    updates = [RefUpdate(ZERO, held_mirror.sha, "refs/heads/bottle/x")]
    verdict = approval.hold_push(held_mirror.config.supervise, "r", updates, held_mirror.mirror, io.StringIO())
    decider.join(timeout=30)
    assert (verdict.status, verdict.by, verdict.reason) == ("denied", "bob", "from the parent")
    assert became.read_text() == f"{os.getuid()}:{os.getgid()}"


# ---------------------------------------------------------------------------------------------
# attack: denial of service against git-gate. Connections are capped, idle or trickling clients are
# dropped and their git killed, the secret scan streams with bounded memory, packs are bounded.


def _serving_processes(root: Path) -> list[int]:
    """Live processes working in root (http-backend and the git under it chdir into the repo)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(root)):
                    pids.append(int(entry))
            except OSError:
                continue  # gone, or a zombie (no cwd): nothing left running
    return pids


@pytest.fixture()
def served(plain_repo, tmp_path):
    """GitCgiServers (tight limits) on a bare copy of plain_repo; whatever git they leave running is
    killed at the end (the tests assert there is none)."""
    root = tmp_path / "served"
    git("clone", "--quiet", "--bare", str(plain_repo), str(root / "r.git"))
    git("config", "http.receivepack", "true", cwd=root / "r.git")
    cgi_env = {k: os.environ[k] for k in ("PATH", "HOME", "GIT_CONFIG_NOSYSTEM")}
    servers: list[GitCgiServer] = []
    logs: list[dict] = []

    def start(limits: HttpLimits, max_connections: int = 64) -> GitCgiServer:
        capped = type("Capped", (GitCgiServer,), {"max_connections": max_connections})
        server = capped(("127.0.0.1", 0), root, ["r"], cgi_env, log=logs.append, limits=limits)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    def url(server) -> str:
        return f"http://127.0.0.1:{server.server_address[1]}/r.git"

    yield types.SimpleNamespace(root=root, start=start, url=url, logs=logs)
    for server in servers:
        server.shutdown()
        server.server_close()
    for pid in _serving_processes(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _closed_by_server(sock: socket.socket, rounds: int = 300, send: bytes = b"") -> bool:
    """Poll (0.1 s a round, bounded) until the server closes the connection, optionally trickling send."""
    sock.setblocking(False)
    for _ in range(rounds):
        try:
            if send:
                sock.send(send)
            while True:
                data = sock.recv(65536)
                if not data:
                    return True
        except BlockingIOError:
            pass
        except OSError:
            return True  # reset: closed
        time.sleep(0.1)
    return False


def _still_serves(served, server) -> None:
    clone = served.root.parent / f"clone-{time.monotonic_ns()}"
    git("clone", "--quiet", served.url(server), str(clone))
    git("-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "--quiet", "--allow-empty", "-m",
        "after the attack", cwd=clone)
    assert git("push", "--quiet", "origin", "HEAD:refs/heads/after", cwd=clone, check=False).returncode == 0


def test_idle_connections_over_the_cap_start_nothing_and_idle_ones_are_dropped(served):
    server = served.start(HttpLimits(idle_timeout_s=2, request_timeout_s=60, body_window_s=60), max_connections=4)
    address = server.server_address[:2]
    idle = [socket.create_connection(address) for _ in range(4)]
    wait_for(lambda: server.watchdog.active() == 4, timeout=20, what="4 connections being served")
    extra = [socket.create_connection(address) for _ in range(8)]
    assert all(_closed_by_server(sock, rounds=100) for sock in extra), "a connection over the cap was served"
    assert _serving_processes(served.root) == []
    assert all(_closed_by_server(sock) for sock in idle), "an idle connection was kept"
    for sock in idle + extra:
        sock.close()
    _still_serves(served, server)


def test_trickled_headers_are_dropped(served):
    server = served.start(HttpLimits(idle_timeout_s=30, request_timeout_s=1))
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"GET /r.git/info/refs?service=git-upload-pack HTTP/1.0\r\n")
    assert _closed_by_server(sock, send=b"X-Pad: 1\r\n"), "a client trickling headers was kept"
    sock.close()
    assert any(r.get("event") == "http-drop" for r in served.logs)
    _still_serves(served, server)


def test_trickled_body_is_dropped_and_its_git_killed(served):
    server = served.start(HttpLimits(idle_timeout_s=30, body_window_s=1, min_body_bytes=1000))
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"POST /r.git/git-upload-pack HTTP/1.0\r\nContent-Type: application/x-git-upload-pack-request\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    wait_for(lambda: _serving_processes(served.root), timeout=20, what="http-backend started")
    assert _closed_by_server(sock, send=b"0"), "a client trickling its body was kept"
    sock.close()
    wait_for(lambda: not _serving_processes(served.root), timeout=30, what="no git left running")
    _still_serves(served, server)


def test_client_gone_mid_body_leaves_no_git_running(served):
    """Given CONTENT_LENGTH, git 2.39's http-backend spins forever on a body that ends early."""
    server = served.start(HttpLimits())
    for _ in range(3):
        sock = socket.create_connection(server.server_address[:2])
        sock.sendall(b"POST /r.git/git-receive-pack HTTP/1.0\r\nContent-Type: application/x-git-receive-pack-request"
                     b"\r\nContent-Length: 100000\r\n\r\n0000")
        wait_for(lambda: _serving_processes(served.root), timeout=20, what="http-backend started")
        sock.close()
    wait_for(lambda: not _serving_processes(served.root), timeout=30, what="no git left running")
    _still_serves(served, server)


def test_push_bigger_than_max_push_bytes_is_refused_and_a_normal_one_still_lands(world):
    guest, up = world["guests"]["lib"], upstream_repo(world, "lib")
    new_branch(guest, "toobig")
    (guest / "huge.bin").write_bytes(random.randbytes(MAX_PUSH_BYTES + 512 * 1024))
    git("add", "huge.bin", cwd=guest)
    git("commit", "--quiet", "-m", "more than max_push_bytes", cwd=guest)
    result = git("push", "origin", "HEAD:refs/heads/toobig", cwd=guest, check=False)
    assert result.returncode != 0
    assert "pack exceeds maximum allowed size" in result.stderr, result.stderr
    assert rev(mirror(world, "lib"), "refs/heads/toobig") is None
    new_branch(guest, "normal-after-toobig")
    sha = commit_file(guest, "small.txt", "small\n", "a normal push")
    assert git("push", "origin", "HEAD:refs/heads/normal-after-toobig", cwd=guest, check=False).returncode == 0
    assert wait_for(lambda: rev(up, "refs/heads/normal-after-toobig") == sha, timeout=15)


class RecordingScanner(SecretScanner):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def scan(self, text: str) -> list[str]:
        self.largest = max(self.largest, len(text))
        return super().scan(text)


SCAN_BOUND = scan.SCAN_WINDOW_CHARS  # what one scanner call is given, at most


def _pushed_commit(repo: Path, branch: str, files: dict[str, str | int]) -> RefUpdate:
    """A commit of files (text, or a size for a file of zeros) on top of main, reachable from no ref:
    what pre-receive sees of a push of it to refs/heads/<branch>."""
    base = rev(repo, "HEAD")
    git("update-ref", f"refs/heads/{branch}", base, cwd=repo)
    git("checkout", "--quiet", branch, cwd=repo)
    for name, content in files.items():
        if isinstance(content, int):
            with open(repo / name, "wb") as out:
                out.truncate(content)
        else:
            (repo / name).write_text(content)
    git("add", *files, cwd=repo)
    git("commit", "--quiet", "-m", f"to {branch}", cwd=repo)
    head = rev(repo, "HEAD")
    git("checkout", "--quiet", "main", cwd=repo)  # HEAD must not reach it either
    git("update-ref", "-d", f"refs/heads/{branch}", cwd=repo)
    return RefUpdate(base, head, f"refs/heads/{branch}")


def test_secret_deep_in_a_large_diff_is_caught_one_bounded_window_at_a_time(plain_repo):
    lines = [f"line {i} {random.random()}\n" for i in range(120_000)]  # ~3.5 MB
    lines[100_000] = f"key = {fake_aws_key()}\n"
    update = _pushed_commit(plain_repo, "bottle/big", {
        "big.txt": "".join(lines), "one-line.txt": "x" * 2_500_000 + fake_aws_key()})  # and one 2.5 MB line
    scanner = RecordingScanner()
    [decision] = evaluate_push(POLICY, [update], plain_repo, scanner)
    assert decision.reasons == (f"secret in the added lines of commit {update.new[:12]}: aws_access_key_id",)
    assert 0 < scanner.largest <= SCAN_BOUND, scanner.largest


def test_secret_split_across_a_scan_window_boundary_is_caught():
    key = fake_aws_key()
    push = scan.PushScan(SecretScanner(), scan.ScanBudget())
    place = scan.Place("the added lines", "commit", "c" * 40)
    text = scan.PlaceText(push, place)
    text.write("a " * ((scan.SCAN_WINDOW_CHARS - 10) // 2) + key[:10])  # fills the first window
    assert push.findings == {}
    text.write(key[10:] + "\n")
    text.close()
    push.flush()
    assert push.findings == {place: ["aws_access_key_id"]}


def test_object_too_big_to_scan_is_rejected_though_its_pack_is_tiny(plain_repo):
    """A 33 MiB file of zeros packs into a few KB; the old scan held all of `git log -p` in memory."""
    update = _pushed_commit(plain_repo, "bottle/zeros", {"zeros.bin": scan.MAX_SCAN_OBJECT_BYTES + 1024 * 1024})
    blob = rev(plain_repo, f"{update.new}:zeros.bin")
    scanner = RecordingScanner()
    [decision] = evaluate_push(POLICY, [update], plain_repo, scanner)
    assert decision.reasons == (f"blob {blob} (33 MiB, zeros.bin) is larger than the 32 MiB the secret scan reads; "
                                "git-gate forwards nothing it has not scanned",)
    assert scanner.largest == len(update.ref)  # nothing of it was read: only the ref name


def test_push_with_more_text_than_the_scan_budget_is_rejected(plain_repo):
    update = _pushed_commit(plain_repo, "bottle/budget", {"text.txt": "words " * 2000})
    [decision] = evaluate_push(POLICY, [update], plain_repo, SecretScanner(), budget=scan.ScanBudget(limit=4096))
    assert len(decision.reasons) == 1 and "more than the secret scan reads in one push" in decision.reasons[0]
