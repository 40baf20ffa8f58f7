"""Several git-gates (one per bottle of an agent, each in its own bundle) sharing one mirrors dir: each
has its own repo (refs, config, hooks) and forwards and audits only what came through it; they share
only the objects fetched from the upstream, one download serving all behind an flock; nothing a
sibling bundle writes in the shared dir runs or counts as a ref in another gate; a planted link never
steers the lock; and each bottle pushes only inside its own instance's branch namespace.

Real git, a local bare "upstream" repo, gates on 127.0.0.1; every path is a temp path.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from tests.unit.gitrepos import clean_git_env, commit_file, git, one_commit_repo, rev
from tests.waiting import wait_for

from bottle_tasks.contract import PushPolicy
from bottle_tasks.sidecars.daemon import Backoff
from bottle_tasks.sidecars.gitgate import daemon as gate_daemon
from bottle_tasks.sidecars.gitgate.config import load_config
from bottle_tasks.sidecars.gitgate.daemon import Gate
from bottle_tasks.sidecars.gitgate.hooks import CONFIG_ENV, MirrorPaths, hook_script, write_spool
from bottle_tasks.sidecars.gitgate.policy import RefUpdate, evaluate_push
from bottle_tasks.sidecars.gitgate.scan import SecretScanner
from bottle_tasks.sidecars.gitgate.shared import LOCKS_DIR, MirrorLockError, hold_mirror

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = Backoff(initial_s=0.05, cap_s=0.2)
ZERO = "0" * 40


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# the world: one upstream, one mirrors dir, gates made on demand


@pytest.fixture()
def shared(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    clean_git_env(monkeypatch, home)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Agent")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "agent@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Agent")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "agent@example.invalid")
    seed = tmp_path / "seed"
    git("init", "--quiet", "-b", "main", str(seed))
    commit_file(seed, "README", "hello\n", "initial")
    upstream = tmp_path / "upstream" / "app.git"
    git("init", "--quiet", "--bare", "-b", "main", str(upstream))
    git("push", "--quiet", str(upstream), "main", cwd=seed)
    mirrors = tmp_path / "mirrors"
    env = {k: os.environ[k] for k in ("PATH", "HOME", "GIT_CONFIG_NOSYSTEM")}
    started: list[Gate] = []

    def config_file(name: str, instance: str, branches=("*",)) -> Path:
        path = tmp_path / name / "git-gate.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({
            "version": 1, "listen": "127.0.0.1:0", "mirrors_dir": str(mirrors),
            "state_dir": str(tmp_path / name / "state"),
            "repos": [{"name": "app", "url": str(upstream), "identity": {"kind": "none"},
                       "push": {"branches": list(branches), "delete": True,
                                "namespace_root": "bottle/a/", "instance": instance}}]}))
        return path

    def gate(name: str, instance: str, *, start: bool = False) -> Gate:
        path = config_file(name, instance)
        made = Gate(load_config(path), path, environ=env, out=io.StringIO(), backoff=FAST)
        if start:
            made.start()
            started.append(made)
        else:
            made.setup()
        return made

    def url(made: Gate) -> str:
        assert made.server is not None
        return f"http://127.0.0.1:{made.server.server_address[1]}/app.git"

    def guest(made: Gate, name: str) -> Path:
        work = tmp_path / f"guest-{name}"
        git("clone", "--quiet", url(made), str(work))
        return work

    yield types.SimpleNamespace(tmp=tmp_path, upstream=upstream, mirrors=mirrors, objects=mirrors / "app.objects",
                                config_file=config_file, gate=gate, url=url, guest=guest, env=env)
    for made in started:
        made.stop()


def audit(made: Gate) -> list[dict]:
    return records(made.config.audit_log)


def repo_of(made: Gate) -> Path:
    """The gate's own repo of app: its refs, config and hooks."""
    return MirrorPaths.of(made.config, made.config.repos[0]).root


def object_files(objects: Path) -> list[Path]:
    """The loose objects and packs in an objects dir."""
    return [p for p in objects.rglob("*") if p.is_file() and p.parent.name != "info"]


def upstream_moves_on(shared, name: str = "later.txt") -> str:
    other = shared.tmp / f"other-{name}"
    git("clone", "--quiet", str(shared.upstream), str(other))
    later = commit_file(other, name, "later\n", "upstream moves on")
    git("push", "--quiet", "origin", "main", cwd=other)
    return later


def assert_the_upstream_reaches_the_repo_of(shared, made: Gate) -> None:
    """A commit made upstream lands in made's repo with one refresh of made."""
    later = upstream_moves_on(shared)
    assert made.refresh(made.config.repos[0]) is True
    assert rev(repo_of(made), "refs/heads/main") == later


def count_fetches(monkeypatch) -> list[list[str]]:
    """Every `git fetch` the gate runs in this process."""
    fetches: list[list[str]] = []
    real = gate_daemon.run_git

    def counting(args, **kwargs):
        if args[0] == "fetch":
            fetches.append(list(args))
        return real(args, **kwargs)
    monkeypatch.setattr(gate_daemon, "run_git", counting)
    return fetches


# ---------------------------------------------------------------------------------------------
# each gate its own repo and spools: forwarded and audited by the gate the push came through, only


def test_a_push_through_one_gate_is_forwarded_and_audited_by_that_gate_alone(shared):
    gate_x, gate_y = shared.gate("x", "x", start=True), shared.gate("y", "y", start=True)
    assert gate_x.config.state_dir != gate_y.config.state_dir
    guest = shared.guest(gate_x, "x")
    git("checkout", "--quiet", "-b", "bottle/a/x/feature", cwd=guest)
    sha = commit_file(guest, "x.txt", "x\n", "work of x")
    pushed = git("push", "origin", "HEAD:refs/heads/bottle/a/x/feature", cwd=guest, check=False)
    assert pushed.returncode == 0, pushed.stderr
    ref = "refs/heads/bottle/a/x/feature"
    assert wait_for(lambda: rev(shared.upstream, ref) == sha, timeout=15, what="the forward by gate x")
    assert wait_for(lambda: [r for r in audit(gate_x) if r["event"] == "forward" and r["accepted"]], timeout=15)
    assert [r["refs"][0]["ref"] for r in audit(gate_x) if r["event"] == "push"] == [ref]
    # what x's guest pushed is in x's own objects, never in the dir every bundle of the agent writes
    assert git("cat-file", "-e", sha, cwd=repo_of(gate_x)).returncode == 0
    assert not [p for p in object_files(shared.objects) if sha[2:] in p.name]

    gate_y.forwarder.forward_pending()  # a pass of y's own: its queue and events are its own, and empty
    assert audit(gate_y) == []
    for kind in ("queue", "events"):
        assert not list((gate_y.config.state_dir / "spool" / "app" / kind).iterdir())
    assert not [line for line in gate_y.audit.out.getvalue().splitlines() if '"event": "push"' in line]
    # forwarded, it is the upstream's: y's guest sees x's branch through y's own fetch
    assert wait_for(lambda: f"{sha}\t{ref}" in git("ls-remote", shared.url(gate_y), cwd=shared.tmp).stdout,
                    timeout=15, what="x's forwarded branch through y")


def test_an_unforwarded_push_is_in_its_gates_repo_alone_and_its_fetch_leaves_it(shared):
    """x accepted a push to main the upstream refuses for now: x's refresh must not undo it (it is
    queued), and y, whose refs are its own, serves the upstream's main until x forwards it."""
    gate_x, gate_y = shared.gate("x", "x", start=True), shared.gate("y", "y", start=True)
    before = rev(shared.upstream, "refs/heads/main")
    refuse = shared.upstream / "hooks" / "pre-receive"
    refuse.write_text("#!/bin/sh\necho upstream says no >&2\nexit 1\n")
    refuse.chmod(0o755)
    guest = shared.guest(gate_x, "x")
    sha = commit_file(guest, "main.txt", "x\n", "x on main")
    pushed = git("push", "origin", "HEAD:refs/heads/main", cwd=guest, check=False)
    assert pushed.returncode == 0, pushed.stderr
    assert wait_for(lambda: [r for r in audit(gate_x) if r["event"] == "forward" and not r["accepted"]], timeout=15)

    assert gate_x.refresh(gate_x.config.repos[0]) is True
    assert rev(repo_of(gate_x), "refs/heads/main") == sha, "x's fetch undid its own unforwarded push"
    assert gate_y.refresh(gate_y.config.repos[0]) is True
    assert rev(repo_of(gate_y), "refs/heads/main") == before
    assert rev(shared.upstream, "refs/heads/main") == before

    refuse.unlink()
    gate_x.forwarder.retry_now()
    assert wait_for(lambda: rev(shared.upstream, "refs/heads/main") == sha, timeout=15)
    assert wait_for(lambda: not list(MirrorPaths.of(gate_x.config, gate_x.config.repos[0]).queue.iterdir()),
                    timeout=15, what="x's queue drained")
    # forwarded, the ref is the upstream's again: a commit made there reaches x and y
    assert_the_upstream_reaches_the_repo_of(shared, gate_x)
    assert gate_y.refresh(gate_y.config.repos[0]) is True
    assert rev(repo_of(gate_y), "refs/heads/main") == rev(shared.upstream, "refs/heads/main")


def test_each_gate_has_its_own_repo_and_hooks_and_the_shared_dir_only_objects(shared):
    gate_x, gate_y = shared.gate("x", "x"), shared.gate("y", "y")
    for made in (gate_x, gate_y):
        root = repo_of(made)
        assert root.parent == made.config.state_dir
        for hook in ("pre-receive", "post-receive"):
            assert (root / "git-gate" / "hooks" / hook).read_text() == hook_script("app", hook)
        assert git("config", "core.hooksPath", cwd=root).stdout.strip() == str(root / "git-gate" / "hooks")
        assert (root / "objects" / "info" / "alternates").read_text() == f"{shared.objects}\n"
    assert sorted(p.name for p in shared.mirrors.iterdir()) == [LOCKS_DIR, "app.objects"]
    assert not [p for p in shared.mirrors.rglob("*") if p.name in ("config", "HEAD", "hooks", "refs")]
    # a push into a gate's repo that no gate serves (no gate environment) is refused by the hook
    work = shared.tmp / "direct"
    git("clone", "--quiet", str(shared.upstream), str(work))
    commit_file(work, "d.txt", "d\n", "direct")
    direct = git("push", str(repo_of(gate_x)), "HEAD:refs/heads/bottle/a/x/direct", cwd=work, check=False)
    assert direct.returncode != 0
    assert "no gate environment; push refused" in direct.stderr
    assert rev(repo_of(gate_x), "refs/heads/bottle/a/x/direct") is None


def test_a_guest_header_cannot_name_another_gates_config(shared):
    """The hooks take their config from the gate's CGI environment; a request header only ever lands
    there as HTTP_*, so x's guest cannot borrow y's policy (and y's namespace)."""
    gate_x, gate_y = shared.gate("x", "x", start=True), shared.gate("y", "y")
    assert gate_x.cgi_env()[CONFIG_ENV] == str(gate_x.config_path)
    guest = shared.guest(gate_x, "x")
    commit_file(guest, "y.txt", "y\n", "not mine")
    forged = git("-c", f"http.extraHeader={CONFIG_ENV}: {gate_y.config_path}", "push", "origin",
                 "HEAD:refs/heads/bottle/a/y/fix", cwd=guest, check=False)
    assert forged.returncode != 0
    assert ("git-gate: rejected refs/heads/bottle/a/y/fix: branch bottle/a/y/fix is instance y's namespace; "
            "this bottle (instance x) pushes to bottle/a/x/*") in forged.stderr, forged.stderr
    assert rev(repo_of(gate_x), "refs/heads/bottle/a/y/fix") is None


# ---------------------------------------------------------------------------------------------
# one download serves all, behind the objects' lock


CHILD = """
import json, os, sys, time
from pathlib import Path
from bottle_tasks.sidecars.gitgate import daemon
from bottle_tasks.sidecars.gitgate.config import load_config

config_path, log, go = sys.argv[1:4]
real = daemon.run_git

def logging(args, **kwargs):
    if args[0] != "fetch":
        return real(args, **kwargs)
    started = time.time()
    time.sleep(0.5)  # a slow upstream: the other gate comes while this one fetches
    result = real(args, **kwargs)
    with open(log, "a") as out:
        out.write(json.dumps([os.getpid(), started, time.time()]) + "\\n")
    return result

daemon.run_git = logging
config = load_config(config_path)
gate = daemon.Gate(config, Path(config_path), out=sys.stderr)
while not os.path.exists(go):
    time.sleep(0.01)
gate.setup()  # both create the shared objects dir at once, too
print(json.dumps({"ok": gate.refresh(config.repos[0])}))
"""


def test_two_gates_refreshing_at_once_download_once_one_after_the_other(shared):
    log, go = shared.tmp / "fetches", shared.tmp / "go"
    names = ("x", "y")
    children = [subprocess.Popen(
        [sys.executable, "-c", CHILD, str(shared.config_file(name, name)), str(log), str(go)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name in names]
    time.sleep(0.3)
    go.write_text("")
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["ok"] is True, err
    (first_start, first_end), (second_start, _) = sorted((start, end) for _pid, start, end in
                                                         map(json.loads, log.read_text().splitlines()))
    assert second_start >= first_end - 0.01, "two fetches ran at once: the lock did not hold"
    head = rev(shared.upstream, "refs/heads/main")
    for name in names:
        root = shared.tmp / name / "state" / "app.git"
        assert rev(root, "refs/heads/main") == head
        assert object_files(root / "objects") == [], f"{name} downloaded the objects into its own repo"
    assert object_files(shared.objects), "the upstream's objects are not in the shared dir"


def test_a_second_gates_refresh_downloads_nothing_the_first_fetched(shared):
    gate_x, gate_y = shared.gate("x", "x"), shared.gate("y", "y")
    assert gate_x.refresh(gate_x.config.repos[0]) and gate_y.refresh(gate_y.config.repos[0])
    later = upstream_moves_on(shared)
    assert gate_x.refresh(gate_x.config.repos[0]) is True
    present = sorted(object_files(shared.objects))
    assert gate_y.refresh(gate_y.config.repos[0]) is True
    assert rev(repo_of(gate_y), "refs/heads/main") == later
    assert sorted(object_files(shared.objects)) == present, "y's refresh downloaded again what x had fetched"
    assert object_files(repo_of(gate_y) / "objects") == []


def test_threads_of_one_gate_share_a_fetch(shared, monkeypatch):
    made = shared.gate("x", "x")
    fetches = count_fetches(monkeypatch)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(made.refresh(made.config.repos[0], min_interval=60)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [True] * 4 and len(fetches) == 1


def test_a_held_lock_bounds_the_wait_of_a_guest_refresh(shared, monkeypatch):
    made = shared.gate("x", "x")
    fetches = count_fetches(monkeypatch)
    with hold_mirror(shared.mirrors, "app", timeout=5):  # another gate, fetching forever
        started = time.monotonic()
        assert made.refresh(made.config.repos[0], timeout=0.5) is False
        assert time.monotonic() - started < 5
    assert fetches == []
    assert "another gate held" in made.audit.out.getvalue() and "app.lock" in made.audit.out.getvalue()
    assert made.refresh(made.config.repos[0]) is True  # released: the next refresh fetches


def test_a_refresh_that_cannot_run_git_fails_and_the_next_one_fetches(shared, monkeypatch):
    """An OSError under a refresh (git gone, a dir removed) fails that refresh; it must not end the
    background thread, which would leave the gate's repo stale for good."""
    made = shared.gate("x", "x")
    real = gate_daemon.run_git

    def broken(args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")
    monkeypatch.setattr(gate_daemon, "run_git", broken)
    assert made.refresh(made.config.repos[0]) is False
    assert "No such file or directory" in made.audit.out.getvalue()
    monkeypatch.setattr(gate_daemon, "run_git", real)
    assert_the_upstream_reaches_the_repo_of(shared, made)


# ---------------------------------------------------------------------------------------------
# attack: a sibling bundle writes the shared dir


def test_nothing_a_sibling_bundle_writes_in_the_shared_dir_runs_in_another_gate(shared, monkeypatch):
    """A compromised bundle of instance x writes what it likes in the mirrors dir: hooks where the
    gates kept them before, the dir itself made a repo with hooks and config, an alternate of the
    shared objects. A push, a fetch and a clone through y must run none of it, and no git of y's
    may open the mirrors dir as a repo (git runs for-each-ref in the repo around an alternate)."""
    trace = shared.tmp / "trace"
    real_cgi_env = Gate.cgi_env
    monkeypatch.setattr(Gate, "cgi_env", lambda self: {**real_cgi_env(self), "GIT_TRACE": str(trace)})
    shared.gate("x", "x")
    gate_y = shared.gate("y", "y", start=True)
    ran = shared.tmp / "ran-in-y"
    evil = f'#!/bin/sh\necho "$0 $GIT_GATE_CONFIG" >> {ran}\nexit 0\n'
    git("init", "--quiet", "--bare", str(shared.mirrors))  # the mirrors dir, a repo of x's making
    legacy_hooks = shared.mirrors / "app.git" / "git-gate" / "hooks"
    legacy_hooks.mkdir(parents=True)
    for hooks in (shared.mirrors / "hooks", legacy_hooks):
        for hook in ("pre-receive", "post-receive", "reference-transaction", "post-update"):
            (hooks / hook).write_text(evil)
            (hooks / hook).chmod(0o755)
    git("config", "core.hooksPath", str(shared.mirrors / "hooks"), cwd=shared.mirrors)
    git("config", "core.fsmonitor", str(shared.mirrors / "hooks" / "post-update"), cwd=shared.mirrors)
    elsewhere = shared.tmp / "x-objects"
    (elsewhere / "info").mkdir(parents=True)
    (shared.objects / "info" / "alternates").write_text(f"{elsewhere}\n")

    real = gate_daemon.run_git

    def traced(args, **kwargs):
        kwargs["env"] = {**(kwargs.get("env") or {}), "GIT_TRACE": str(trace)}
        return real(args, **kwargs)
    monkeypatch.setattr(gate_daemon, "run_git", traced)
    upstream_moves_on(shared)
    assert gate_y.refresh(gate_y.config.repos[0]) is True
    guest = shared.guest(gate_y, "y")
    commit_file(guest, "y.txt", "y\n", "work of y")
    pushed = git("push", "origin", "HEAD:refs/heads/bottle/a/y/fix", cwd=guest, check=False)
    assert pushed.returncode == 0, pushed.stderr
    assert not ran.exists(), f"x's script ran in y's gate: {ran.read_text().strip()}"
    lines = trace.read_text().splitlines()
    assert [line for line in lines if "receive-pack" in line], "the trace saw no push"
    opened = [line for line in lines if f"--git-dir={shared.mirrors}" in line]
    assert opened == [], opened


def test_a_shared_objects_dir_planted_as_a_link_is_refused_at_start(shared):
    elsewhere = shared.tmp / "elsewhere"
    elsewhere.mkdir()
    shared.mirrors.mkdir()
    shared.objects.symlink_to(elsewhere)
    path = shared.config_file("y", "y")
    made = Gate(load_config(path), path, environ=shared.env, out=io.StringIO())
    with pytest.raises(OSError, match="app.objects: not a plain directory"):
        made.setup()
    assert not (elsewhere / "pack").exists() or list((elsewhere / "pack").iterdir()) == []


def test_a_mirrors_dir_of_the_last_layout_gives_its_objects_and_loses_its_hooks(shared):
    """Before per-gate repos the mirrors dir held a whole repo, app.git, whose objects include a push
    a gate had queued and not forwarded: the objects move to app.objects (the push is forwarded),
    the rest (config and hooks every bundle could write) goes, unread."""
    legacy = shared.mirrors / "app.git"
    git("clone", "--quiet", "--bare", str(shared.upstream), str(legacy))
    work = shared.tmp / "work"
    git("clone", "--quiet", str(shared.upstream), str(work))
    sha = commit_file(work, "q.txt", "q\n", "queued before the change")
    git("push", "--quiet", str(legacy), "HEAD:refs/heads/bottle/a/y/queued", cwd=work)
    path = shared.config_file("y", "y")
    queue = shared.tmp / "y" / "state" / "spool" / "app" / "queue"
    write_spool(queue, {"ref": "refs/heads/bottle/a/y/queued", "old": ZERO, "new": sha, "force": False})
    made = Gate(load_config(path), path, environ=shared.env, out=io.StringIO(), backoff=FAST)
    made.setup()
    assert not legacy.exists()
    assert git("cat-file", "-e", sha, cwd=repo_of(made)).returncode == 0
    made.forwarder.forward_pending()
    assert rev(shared.upstream, "refs/heads/bottle/a/y/queued") == sha


def test_a_repo_of_the_first_layout_keeps_its_queue(shared):
    """The first layout kept the gate's repo where it is now, <state_dir>/app.git, with the queue
    inside it (git-gate/queue): the entries move into the spool and are forwarded."""
    root = shared.tmp / "y" / "state" / "app.git"
    git("clone", "--quiet", "--bare", str(shared.upstream), str(root))
    work = shared.tmp / "work"
    git("clone", "--quiet", str(shared.upstream), str(work))
    sha = commit_file(work, "q.txt", "q\n", "queued long ago")
    git("push", "--quiet", str(root), "HEAD:refs/heads/bottle/a/y/old", cwd=work)
    write_spool(root / "git-gate" / "queue", {"ref": "refs/heads/bottle/a/y/old", "old": ZERO, "new": sha,
                                              "force": False})
    path = shared.config_file("y", "y")
    made = Gate(load_config(path), path, environ=shared.env, out=io.StringIO(), backoff=FAST)
    made.setup()
    assert list((root / "git-gate" / "queue").iterdir()) == []
    made.forwarder.forward_pending()
    assert rev(shared.upstream, "refs/heads/bottle/a/y/old") == sha


# ---------------------------------------------------------------------------------------------
# attack: links and FIFOs planted where the lock lives


def _plant_link(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def test_a_lock_file_planted_as_a_link_is_refused_and_not_followed(shared, monkeypatch):
    made = shared.gate("x", "x")
    fetches = count_fetches(monkeypatch)
    victim = shared.tmp / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    _plant_link(shared.mirrors / LOCKS_DIR / "app.lock", victim)
    assert made.refresh(made.config.repos[0]) is False
    assert "follows no link" in made.audit.out.getvalue()
    assert fetches == []
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    absent = shared.tmp / "absent"
    _plant_link(shared.mirrors / LOCKS_DIR / "app.lock", absent)
    assert made.refresh(made.config.repos[0]) is False
    assert not absent.exists(), "the lock was created through the link"


def test_a_locks_dir_planted_as_a_link_is_refused(shared):
    made = shared.gate("x", "x")
    elsewhere = shared.tmp / "elsewhere"
    elsewhere.mkdir()
    locks = shared.mirrors / LOCKS_DIR
    for entry in locks.iterdir():
        entry.unlink()
    locks.rmdir()
    locks.symlink_to(elsewhere)
    assert made.refresh(made.config.repos[0]) is False
    assert list(elsewhere.iterdir()) == []


def test_a_fifo_at_the_lock_does_not_hang_the_gate(shared):
    made = shared.gate("x", "x")
    lock = shared.mirrors / LOCKS_DIR / "app.lock"
    lock.unlink()
    os.mkfifo(lock)
    started = time.monotonic()
    assert made.refresh(made.config.repos[0]) is False
    assert time.monotonic() - started < 5


def test_a_start_with_the_lock_planted_as_a_link_fails_with_the_path(shared):
    locks = shared.mirrors / LOCKS_DIR
    locks.mkdir(parents=True)
    (locks / "app.lock").symlink_to(shared.tmp / "victim")
    path = shared.config_file("x", "x")
    made = Gate(load_config(path), path, environ=shared.env, out=io.StringIO())
    with pytest.raises(MirrorLockError, match="app.lock: not a plain directory or file"):
        made.setup()
    assert not (shared.tmp / "victim").exists()


def test_many_unforwarded_refs_never_stop_the_gates_fetch(shared):
    """One push of the guest may create a thousand long branches in its namespace; until the gate has
    forwarded them all, its fetch must leave them alone. As arguments (^<ref> each) they passed the
    system's limit, and the fetch (the guest's fetches, the background refresh) failed."""
    gate_y = shared.gate("y", "y")
    assert gate_y.refresh(gate_y.config.repos[0]) is True
    root = repo_of(gate_y)
    head = rev(root, "refs/heads/main")
    stem = "refs/heads/bottle/a/y/" + "/".join(["p" * 240] * 8) + "/"  # long, as a push may make them
    count = os.sysconf("SC_ARG_MAX") // len(stem) + 100
    refs = [f"{stem}{i:06d}" for i in range(count)]
    git("update-ref", "--stdin", cwd=root, env=None, input_text="".join(f"create {ref} {head}\n" for ref in refs))
    queue = MirrorPaths.of(gate_y.config, gate_y.config.repos[0]).queue
    for ref in refs:  # accepted, not forwarded
        write_spool(queue, {"ref": ref, "old": ZERO, "new": head, "force": False})
    assert_the_upstream_reaches_the_repo_of(shared, gate_y)
    assert rev(root, refs[-1]) == head


@pytest.mark.xfail(strict=True, reason="open: bottle/<agent>/<name> of the default instance is a file where "
                                      "instance <name>'s namespace needs a directory (review finding)")
def test_the_default_instance_cannot_squat_another_instances_namespace(shared):
    """The default instance owns bottle/a/<name> (no further /); git keeps refs as paths, so its
    bottle/a/y blocks every bottle/a/y/... of instance y, in the mirror and upstream, for good."""
    gate_d, gate_y = shared.gate("d", "", start=True), shared.gate("y", "y", start=True)
    squatter = shared.guest(gate_d, "d")
    commit_file(squatter, "d.txt", "d\n", "default's")
    git("push", "origin", "HEAD:refs/heads/bottle/a/y", cwd=squatter, check=False)
    wait_for(lambda: rev(shared.upstream, "refs/heads/bottle/a/y"), timeout=15, what="the default's forward")
    guest = shared.guest(gate_y, "y")
    commit_file(guest, "y.txt", "y\n", "work of y")
    pushed = git("push", "origin", "HEAD:refs/heads/bottle/a/y/fix", cwd=guest, check=False)
    assert pushed.returncode == 0, pushed.stderr
    assert wait_for(lambda: rev(shared.upstream, "refs/heads/bottle/a/y/fix"), timeout=15,
                    what="y's push forwarded"), audit(gate_y)

# ---------------------------------------------------------------------------------------------
# attack: pushing into another instance's branch namespace, whatever the globs allow


def _policy(instance: str, branches=("*",), **more) -> PushPolicy:
    return PushPolicy(branches=branches, namespace_root="bottle/a/", instance=instance, **more)


@pytest.mark.parametrize("instance, branch, refusal", [
    ("x", "bottle/a/y/fix", "branch bottle/a/y/fix is instance y's namespace; this bottle (instance x) pushes to "
                            "bottle/a/x/*"),
    ("x", "bottle/a/Y/fix", "branch bottle/a/Y/fix is instance Y's namespace; this bottle (instance x) pushes to "
                            "bottle/a/x/*"),
    ("x", "bottle/A/y/fix", "branch bottle/A/y/fix is instance y's namespace; this bottle (instance x) pushes to "
                            "bottle/a/x/*"),  # the same ref file as bottle/a/y/fix on a case-insensitive disk
    ("x", "bottle/a/fix", "branch bottle/a/fix is the default instance's namespace; this bottle (instance x) pushes "
                          "to bottle/a/x/*"),
    ("", "bottle/a/x/fix", "branch bottle/a/x/fix is instance x's namespace; this bottle (the default instance) "
                           "pushes to bottle/a/<name> (no further /)"),
    ("", "bottle/a/x/deep/er", "branch bottle/a/x/deep/er is instance x's namespace; this bottle (the default "
                               "instance) pushes to bottle/a/<name> (no further /)"),
    ("x", "bottle/a/x/fix", ""),
    ("x", "bottle/a/x/deep/er", ""),
    ("", "bottle/a/fix", ""),
    ("x", "main", ""),          # outside the namespace root the globs decide
    ("x", "bottle/ab/y/z", ""),  # another agent's root is not this one's
])
def test_a_bottle_pushes_only_in_its_own_namespace_whatever_the_globs(instance, branch, refusal):
    for branches in (("*",), ("bottle/a/*", "*"), (branch,)):  # even an agent file that names the branch outright
        assert _policy(instance, branches).branch_refusal(branch) == refusal



@pytest.mark.parametrize("branch", ["bottle", "bottle/a", "Bottle/A"])
def test_a_branch_on_the_way_to_the_namespace_root_is_refused_whatever_the_globs(branch):
    """git keeps a branch as a file: refs/heads/bottle/a (under branches: ['*']) would be where every
    instance's bottle/a/<name>/ needs a directory, in the mirror they share and upstream."""
    for instance in ("x", ""):
        refusal = _policy(instance).branch_refusal(branch)
        assert refusal.startswith(f"branch {branch} would hold the place of bottle/a/, where every instance's "
                                  "branches live"), refusal

def test_without_a_namespace_root_the_globs_alone_decide():
    assert PushPolicy(branches=("*",)).branch_refusal("bottle/a/y/fix") == ""
    assert PushPolicy(branches=("bottle/a/*",)).branch_refusal("main") == "branch not allowed (allowed: bottle/a/*)"


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    return one_commit_repo(tmp_path, monkeypatch)


def test_the_push_policy_refuses_another_instances_namespace_create_update_and_delete(repo):
    head = rev(repo, "HEAD")
    git("update-ref", "refs/heads/bottle/a/y/old", head, cwd=repo)
    x = _policy("x", force=True, delete=True, tags=True)
    decisions = evaluate_push(x, [RefUpdate(ZERO, head, "refs/heads/bottle/a/y/new"),
                                  RefUpdate(head, ZERO, "refs/heads/bottle/a/y/old"),
                                  RefUpdate(ZERO, head, "refs/heads/bottle/a/x/mine")], repo, SecretScanner())
    assert [d.reasons for d in decisions] == [
        ("branch bottle/a/y/new is instance y's namespace; this bottle (instance x) pushes to bottle/a/x/*",),
        ("branch bottle/a/y/old is instance y's namespace; this bottle (instance x) pushes to bottle/a/x/*",),
        (),
    ]
    [default] = evaluate_push(_policy(""), [RefUpdate(ZERO, head, "refs/heads/bottle/a/x/fix")], repo, SecretScanner())
    assert default.reasons == ("branch bottle/a/x/fix is instance x's namespace; this bottle (the default instance) "
                               "pushes to bottle/a/<name> (no further /)",)
