"""The bundle's init supervisor: PID 1 of the sidecar bundle.

    python -m bottle_tasks.sidecars.init

It reads the daemon table (``daemon_table``: JSON, rendered by the host) from
``$BOTTLE_DAEMON_TABLE`` (default ``/etc/bottle/daemons.json``) and starts the daemons named in
``BUNDLE_DAEMONS`` (comma separated), in that order. It prefixes every line they print with
``[name] `` on its own stdout, restarts a daemon that exits (exponential backoff, reset once it has
stayed up a while), reaps zombies, probes readiness (``probes``) and writes
``$BOTTLE_RUN_DIR/status.json`` (default ``/run/bottle``) atomically, which
``bottle_tasks.sidecars.health`` reads. SIGTERM/SIGINT are forwarded to every daemon's
process group; init then exits 0 once they are gone (SIGKILL after a grace period).

Secrets: the host copies ``$BOTTLE_SECRETS_FILE`` (default ``/var/lib/bottle/secrets.json``, 0600)
into the container before it starts; init reads it once and gives each daemon only the variables
its table entry lists under ``secrets``, so git-gate's children never see the model API key and
egress never sees a git identity. No secret is in the container's own environment.

A missing, unreadable or invalid table, an unreadable secrets file, or a name in BUNDLE_DAEMONS the
table lacks, makes init exit 2 with one line on stderr. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, Sequence

from bottle_tasks.sidecars.audit import AUDIT_FD_ENV, SLUG_ENV, AuditWriter, from_pipelock, make_pipe
from bottle_tasks.sidecars.daemon import Backoff
from bottle_tasks.sidecars.daemon_table import (
    DEFAULT_DAEMON_TABLE, Daemon, DaemonTableError, SecretsError, UnknownDaemon, daemon_environment,
    load_daemon_table, load_secrets, parse_daemon_names, select_daemons,
)
from bottle_tasks.sidecars.files import atomic_write_json

DEFAULT_SECRETS_FILE = "/var/lib/bottle/secrets.json"
DEFAULT_RUN_DIR = "/run/bottle"
# Restarts after 0.25, 0.5, 1, 2, 4, 4 ... s; a daemon that stayed up 10 s starts again from 0.25 s.
RESTART_BACKOFF = Backoff(initial_s=0.25, cap_s=4.0, stable_after_s=10.0)


# --------------------------------------------------------------------------- output


class PrefixedOutput:
    """Serialises lines from many daemons onto one stream, each with its [name] prefix."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self._stream.write(f"[{name}] {text.rstrip(chr(10))}\n")
            self._stream.flush()

    def pump(self, name: str, pipe: IO[bytes], audit: AuditWriter | None = None) -> threading.Thread:
        """Copy a daemon's pipe line by line until it closes (the daemon and its children exit); with
        audit, its decisions also go into the stream (pipelock's log, read by from_pipelock)."""

        def copy() -> None:
            with pipe:
                for raw in iter(pipe.readline, b""):
                    text = raw.decode("utf-8", errors="replace")
                    self.line(name, text)
                    found = from_pipelock(text) if audit is not None else None
                    if found is not None:
                        event, decision, fields = found
                        audit.emit(event, decision, **fields)

        thread = threading.Thread(target=copy, name=f"pump-{name}", daemon=True)
        thread.start()
        return thread


# --------------------------------------------------------------------------- supervisor


@dataclass
class DaemonState:
    daemon: Daemon
    process: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None
    started_at: float = 0.0
    restarts: int = 0
    consecutive_failures: int = 0
    next_start_at: float = 0.0
    last_exit_code: int | None = None
    ready: bool = False
    next_probe_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.process is not None

    def as_status(self) -> dict[str, object]:
        return {
            "pid": self.process.pid if self.process else None,
            "running": self.running,
            "ready": self.running and self.ready,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,  # negative: killed by that signal
            "started_at": self.started_at if self.running else None,
        }


@dataclass
class Supervisor:
    daemons: Sequence[Daemon]
    run_dir: Path = Path(DEFAULT_RUN_DIR)
    output: PrefixedOutput = field(default_factory=lambda: PrefixedOutput(sys.stdout))
    backoff: Backoff = RESTART_BACKOFF
    tick_s: float = 0.1
    probe_interval_s: float = 0.5
    status_interval_s: float = 0.5
    stop_grace_s: float = 8.0  # below docker stop's default 10 s, so we SIGKILL first
    secrets: Mapping[str, str] = field(default_factory=dict)  # each daemon gets only the ones its entry names
    bottle: str = ""                                          # the slug, for the audit stream

    def __post_init__(self) -> None:
        self.states = {daemon.name: DaemonState(daemon) for daemon in self.daemons}
        # One pipe for the audit stream: the sink daemon reads it, every other daemon and init write it.
        # init keeps both ends, so a restarted sink finds the lines that waited, and no writer meets EPIPE.
        self.audit_pipe = make_pipe() if any(d.audit_sink for d in self.daemons) else None
        self.audit = AuditWriter("init", fd=self.audit_pipe[1] if self.audit_pipe else None, bottle=self.bottle)
        self._by_pid: dict[int, DaemonState] = {}
        self._stop_signal: int | None = None
        self._force_kill = False
        self._next_status_at = 0.0
        self._last_status_error: str | None = None

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def log(self, text: str) -> None:
        self.output.line("init", text)

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        become_subreaper()
        if not self.daemons:
            self.log("BUNDLE_DAEMONS is empty: no daemons to run, idling")
        while self._stop_signal is None:
            self.step(time.monotonic())
            time.sleep(self.tick_s)
        self.shutdown()
        return 0

    def step(self, now: float) -> None:
        self.reap(now)
        for state in self.states.values():
            if not state.running and now >= state.next_start_at:
                self.start(state, now)
            elif state.running and now >= state.next_probe_at:
                self.probe(state, now)
        if now >= self._next_status_at:
            self.write_status()
            self._next_status_at = now + self.status_interval_s

    def start(self, state: DaemonState, now: float) -> None:
        name = state.daemon.name
        env = {**daemon_environment(os.environ, state.daemon, self.secrets), "PYTHONUNBUFFERED": "1"}
        stdin: int = subprocess.DEVNULL
        pass_fds: tuple[int, ...] = ()
        if self.audit_pipe is not None and state.daemon.audit_sink:
            stdin = self.audit_pipe[0]
        elif self.audit_pipe is not None:
            pass_fds = (self.audit_pipe[1],)
            env[AUDIT_FD_ENV] = str(self.audit_pipe[1])
        try:
            process = subprocess.Popen(
                state.daemon.command,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one pipe keeps stdout/stderr lines in order
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,  # own process group: signals reach its children too
            )
        except OSError as error:
            self.log(f"{name}: cannot start {state.daemon.command[0]!r}: {error}")
            self.on_exit(state, 127, now)
            return
        state.process = process
        state.started_at = time.time()
        state.ready = False
        state.next_probe_at = now
        self._by_pid[process.pid] = state
        assert process.stdout is not None
        audit = None
        if state.daemon.audit_stdout and self.audit_pipe is not None:
            audit = AuditWriter(state.daemon.audit_stdout, fd=self.audit_pipe[1], bottle=self.bottle)
        state.pump = self.output.pump(name, process.stdout, audit)
        self.log(f"{name}: started pid {process.pid}: {' '.join(state.daemon.command)}")
        self.audit.emit("daemon_start", "info", reason=f"{name} started (pid {process.pid}, start {state.restarts + 1})",
                        detail={"daemon": name, "pid": process.pid, "restarts": state.restarts})

    def probe(self, state: DaemonState, now: float) -> None:
        probe = state.daemon.probe
        was_ready = state.ready
        state.ready = True if probe is None else probe()
        state.next_probe_at = now + self.probe_interval_s
        if state.ready != was_ready:
            self.log(f"{state.daemon.name}: {'ready' if state.ready else 'not ready'}")

    def reap(self, now: float) -> None:
        """Collect every exited child: our daemons, and orphans re-parented to us."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            state = self._by_pid.pop(pid, None)
            if state is not None and state.process is not None:
                exit_code = os.waitstatus_to_exitcode(wait_status)
                state.process.returncode = exit_code  # we reaped it, not Popen
                self.on_exit(state, exit_code, now)

    def on_exit(self, state: DaemonState, exit_code: int, now: float) -> None:
        was_stable = (
            state.process is not None
            and time.time() - state.started_at >= self.backoff.stable_after_s
        )
        state.process = None
        state.ready = False
        state.last_exit_code = exit_code
        if self._stop_signal is not None:
            return
        state.consecutive_failures = 1 if was_stable else state.consecutive_failures + 1
        delay = self.backoff.delay(state.consecutive_failures)
        state.next_start_at = now + delay
        state.restarts += 1
        self.log(f"{state.daemon.name}: exited with {exit_code}; restarting in {delay:.2f}s")
        self.audit.emit("daemon_exit", "warn", reason_code="daemon_exited",
                        reason=f"{state.daemon.name} exited with {exit_code}; restarting in {delay:.2f}s",
                        detail={"daemon": state.daemon.name, "exit_code": exit_code, "restarts": state.restarts})
        self.write_status()

    # -- signals and shutdown ------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_stop_signal)

    def on_stop_signal(self, signum: int, _frame: object) -> None:
        if self._stop_signal is not None:
            self._force_kill = True  # a second signal: stop waiting politely
        self._stop_signal = signum

    def signal_daemons(self, signum: int) -> None:
        for state in self.states.values():
            if state.process is not None:
                try:
                    os.killpg(state.process.pid, signum)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    # A daemon that dropped to another uid (the DNS sink's nobody) when init lacks CAP_KILL:
                    # say so and go on; the container's end stops it anyway.
                    self.log(f"{state.daemon.name}: cannot signal pid {state.process.pid} (another uid, no CAP_KILL)")

    def shutdown(self) -> None:
        signum = self._stop_signal or signal.SIGTERM
        self.log(f"received {signal.Signals(signum).name}: stopping daemons")
        self.signal_daemons(signum)
        deadline = time.monotonic() + self.stop_grace_s
        while any(state.running for state in self.states.values()):
            if self._force_kill or time.monotonic() >= deadline:
                self.log("daemons still running after the grace period: SIGKILL")
                self.signal_daemons(signal.SIGKILL)
                self._force_kill = False
                deadline = float("inf")
            self.reap(time.monotonic())
            time.sleep(self.tick_s)
        for state in self.states.values():
            if state.pump is not None:
                state.pump.join(timeout=1.0)  # let the last lines out
        self.write_status()
        self.log("all daemons stopped")

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "updated_at": time.time(),
            "init_pid": os.getpid(),
            "stopping": self._stop_signal is not None,
            "selected": [daemon.name for daemon in self.daemons],
            "daemons": {name: state.as_status() for name, state in self.states.items()},
        }

    def write_status(self) -> None:
        # A run dir we cannot write (e.g. --read-only without a /run tmpfs) must not kill
        # the daemons; health then reports "no readable status.json", which is the truth.
        try:
            atomic_write_json(self.status_path, self.status())
        except OSError as error:
            message = f"cannot write {self.status_path}: {error}"
            if message != self._last_status_error:
                self.log(message)
            self._last_status_error = message
        else:
            self._last_status_error = None


def become_subreaper() -> None:
    """Outside PID 1 (tests, or an init-less runtime), still inherit orphaned grandchildren."""
    if os.getpid() == 1 or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- entry point


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        table = load_daemon_table(env.get("BOTTLE_DAEMON_TABLE") or DEFAULT_DAEMON_TABLE)
        daemons = select_daemons(table, parse_daemon_names(env.get("BUNDLE_DAEMONS", "")))
        secrets = load_secrets(env.get("BOTTLE_SECRETS_FILE") or DEFAULT_SECRETS_FILE)
    except (DaemonTableError, UnknownDaemon, SecretsError) as error:
        print(f"[init] error: {error}", file=sys.stderr, flush=True)
        return 2
    run_dir = Path(env.get("BOTTLE_RUN_DIR", DEFAULT_RUN_DIR))
    return Supervisor(daemons, run_dir=run_dir, secrets=secrets, bottle=env.get(SLUG_ENV, "")).run()


if __name__ == "__main__":
    sys.exit(main())
