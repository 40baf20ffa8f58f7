"""The bundle's init supervisor: PID 1 of the sidecar bundle.

    python -m bottle_tasks.sidecars.init

It starts the daemons named in ``BUNDLE_DAEMONS`` (comma separated), prefixes every line
they print with ``[name] `` on its own stdout, restarts a daemon that exits (exponential
backoff, reset once it has stayed up a while), reaps zombies, probes readiness and writes
``$BOTTLE_RUN_DIR/status.json`` (default ``/run/bottle``) atomically, which
``bottle_tasks.sidecars.health`` reads. SIGTERM/SIGINT are forwarded to every daemon's
process group; init then exits 0 once they are gone (SIGKILL after a grace period).

Everything the bundle hard-codes is injectable so tests can run it with fake daemons:

- ``BOTTLE_RUN_DIR``: where status.json goes.
- ``BOTTLE_CONFIG_DIR``: where routes.yaml, pipelock.yaml and ca/ live (default /etc/bottle).
- ``BOTTLE_DNS_LISTEN``: the DNS sink's address (default 0.0.0.0:53).
- ``BOTTLE_DAEMON_TABLE``: a JSON file that replaces the built-in table::

      {"name": {"command": ["prog", "arg"],
                "probe": {"tcp": "127.0.0.1:9"} | {"http": "http://..."} |
                         {"dns": "127.0.0.1:53"} | null}}

Only the standard library and PyYAML are used; nothing from the rest of bottle_tasks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

Probe = Callable[[], bool]

DEFAULT_RUN_DIR = "/run/bottle"
DEFAULT_CONFIG_DIR = "/etc/bottle"
DEFAULT_DNS_LISTEN = "0.0.0.0:53"
PIPELOCK_HEALTH_URL = "http://127.0.0.1:8888/health"
PROBE_TIMEOUT_S = 0.5


# --------------------------------------------------------------------------- addresses


def split_host_port(address: str) -> tuple[str, int]:
    """'10.0.0.2:8080' or '[::1]:53' -> (host, port)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not an ip:port address: {address!r}")
    return host.strip("[]"), int(port)


def dialable_host(host: str) -> str:
    """A wildcard bind address is probed through loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


# --------------------------------------------------------------------------- probes


def tcp_accepts(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((dialable_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get_ok(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """GET url answers 200. http.client never consults *_PROXY variables, on purpose."""
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def dns_probe_query(query_id: int) -> bytes:
    """A standard query for 'bottle-probe.invalid. A' with the RD bit set."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    name = b"".join(bytes([len(label)]) + label for label in (b"bottle-probe", b"invalid"))
    return header + name + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A UDP query gets any response carrying our query id."""
    host = dialable_host(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    query_id = int.from_bytes(os.urandom(2), "big")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.send(dns_probe_query(query_id))
            reply = sock.recv(4096)
    except OSError:
        return False
    return len(reply) >= 12 and int.from_bytes(reply[:2], "big") == query_id


def config_listen_address(config_path: Path) -> tuple[str, int] | None:
    """The `listen` address of a daemon's YAML config, or None while it is missing or invalid."""
    import yaml  # only egress needs it; keeps `init` importable without PyYAML for tests

    try:
        document = yaml.safe_load(config_path.read_text())
        return split_host_port(str(document["listen"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def listen_probe(config_path: Path) -> Probe:
    """Ready when the daemon accepts TCP on the address its config names."""
    def probe() -> bool:
        address = config_listen_address(config_path)
        return address is not None and tcp_accepts(*address)

    return probe


def probe_from_spec(spec: Mapping[str, str] | None) -> Probe | None:
    """Build a probe from a table file entry: {"tcp"|"http"|"dns": target} or null."""
    if not spec:
        return None
    (kind, target), = spec.items()
    if kind == "tcp":
        host, port = split_host_port(target)
        return lambda: tcp_accepts(host, port)
    if kind == "http":
        return lambda: http_get_ok(target)
    if kind == "dns":
        host, port = split_host_port(target)
        return lambda: dns_answers(host, port)
    raise ValueError(f"unknown probe kind {kind!r} (expected tcp, http or dns)")


# --------------------------------------------------------------------------- daemon table


@dataclass(frozen=True)
class Daemon:
    name: str
    command: tuple[str, ...]
    probe: Probe | None = None  # None: ready as soon as it runs


def default_daemon_table(
    config_dir: Path = Path(DEFAULT_CONFIG_DIR),
    dns_listen: str = DEFAULT_DNS_LISTEN,
    python: str = sys.executable,
) -> dict[str, Daemon]:
    """The bundle's daemons (docs/bundle-contract.md)."""
    dns_host, dns_port = split_host_port(dns_listen)
    daemons = [
        Daemon(
            "egress",
            (python, "-m", "bottle_tasks.sidecars.egress",
             "--routes", str(config_dir / "routes.yaml"), "--ca-dir", str(config_dir / "ca")),
            listen_probe(config_dir / "routes.yaml"),
        ),
        Daemon(
            "pipelock",
            ("pipelock", "run", "--config", str(config_dir / "pipelock.yaml")),
            lambda: http_get_ok(PIPELOCK_HEALTH_URL),
        ),
        Daemon(
            "dns",
            (python, "-m", "bottle_tasks.sidecars.dnssink"),
            lambda: dns_answers(dns_host, dns_port),
        ),
        Daemon(
            "git-gate",
            (python, "-m", "bottle_tasks.sidecars.gitgate", "--config", str(config_dir / "git-gate.yaml")),
            listen_probe(config_dir / "git-gate.yaml"),
        ),
        Daemon(
            "supervise",
            (python, "-m", "bottle_tasks.sidecars.supervise", "--config", str(config_dir / "supervise.yaml")),
            listen_probe(config_dir / "supervise.yaml"),
        ),
    ]
    return {daemon.name: daemon for daemon in daemons}


def load_daemon_table(path: Path) -> dict[str, Daemon]:
    entries = json.loads(path.read_text())
    return {
        name: Daemon(name, tuple(entry["command"]), probe_from_spec(entry.get("probe")))
        for name, entry in entries.items()
    }


def parse_daemon_names(value: str) -> list[str]:
    """'egress, dns,,egress' -> ['egress', 'dns']: order kept, blanks and repeats dropped."""
    names: list[str] = []
    for name in (part.strip() for part in value.split(",")):
        if name and name not in names:
            names.append(name)
    return names


def select_daemons(table: Mapping[str, Daemon], names: Sequence[str]) -> list[Daemon]:
    unknown = [name for name in names if name not in table]
    if unknown:
        raise UnknownDaemon(unknown, sorted(table))
    return [table[name] for name in names]


class UnknownDaemon(ValueError):
    def __init__(self, unknown: Sequence[str], known: Sequence[str]) -> None:
        super().__init__(
            f"unknown daemon(s) in BUNDLE_DAEMONS: {', '.join(unknown)}; "
            f"known daemons: {', '.join(known)}"
        )


# --------------------------------------------------------------------------- restart policy


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.25
    cap_s: float = 4.0
    stable_after_s: float = 10.0  # up this long: the next crash starts from initial_s again

    def delay(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        return min(self.cap_s, self.initial_s * 2 ** (consecutive_failures - 1))


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

    def pump(self, name: str, pipe: IO[bytes]) -> threading.Thread:
        """Copy a daemon's pipe line by line until it closes (the daemon and its children exit)."""

        def copy() -> None:
            with pipe:
                for raw in iter(pipe.readline, b""):
                    self.line(name, raw.decode("utf-8", errors="replace"))

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
    backoff: Backoff = field(default_factory=Backoff)
    tick_s: float = 0.1
    probe_interval_s: float = 0.5
    status_interval_s: float = 0.5
    stop_grace_s: float = 8.0  # below docker stop's default 10 s, so we SIGKILL first

    def __post_init__(self) -> None:
        self.states = {daemon.name: DaemonState(daemon) for daemon in self.daemons}
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
        try:
            process = subprocess.Popen(
                state.daemon.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one pipe keeps stdout/stderr lines in order
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
        state.pump = self.output.pump(name, process.stdout)
        self.log(f"{name}: started pid {process.pid}: {' '.join(state.daemon.command)}")

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
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.status_path, self.status())
        except OSError as error:
            message = f"cannot write {self.status_path}: {error}"
            if message != self._last_status_error:
                self.log(message)
            self._last_status_error = message
        else:
            self._last_status_error = None


def write_json_atomically(path: Path, document: object) -> None:
    """Readers see the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


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


def table_from_env(env: Mapping[str, str]) -> dict[str, Daemon]:
    table_file = env.get("BOTTLE_DAEMON_TABLE")
    if table_file:
        return load_daemon_table(Path(table_file))
    return default_daemon_table(
        config_dir=Path(env.get("BOTTLE_CONFIG_DIR", DEFAULT_CONFIG_DIR)),
        dns_listen=env.get("BOTTLE_DNS_LISTEN", DEFAULT_DNS_LISTEN),
    )


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        table = table_from_env(env)
        daemons = select_daemons(table, parse_daemon_names(env.get("BUNDLE_DAEMONS", "")))
    except (UnknownDaemon, ValueError, OSError, KeyError) as error:
        print(f"[init] error: {error}", file=sys.stderr, flush=True)
        return 2
    run_dir = Path(env.get("BOTTLE_RUN_DIR", DEFAULT_RUN_DIR))
    return Supervisor(daemons, run_dir=run_dir).run()


if __name__ == "__main__":
    sys.exit(main())
