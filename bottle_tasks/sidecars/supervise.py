"""supervise: the bundle daemon through which a human on the host approves agent actions.

    python -m bottle_tasks.sidecars.supervise --config /etc/bottle/supervise.yaml

supervise.yaml (docs/bundle-contract.md, "supervise")::

    listen: "10.243.7.2:8082"               # plain HTTP on the internal network
    state_dir: "/var/lib/bottle/supervise"   # the host state dir, mounted read-write
    default_timeout_seconds: 300             # when a request gives none (1..3600)
    tools: ["Bash(git push:*)", "WebFetch"]  # the supervised rule patterns (optional, default [])
    max_pending: 32                          # requests waiting for a human at once (optional)
    max_requests_per_minute: 60              # new requests in any 60 s (optional)

API (JSON in, JSON out):

- ``POST /v1/requests`` ``{"tool", "input", "summary", "timeout_seconds"}`` -> ``201 {"id",
  "status": "pending"}``. ``tool``: non-empty string, at most 200 characters; ``input``: an
  object; ``summary``: string, at most 2000; ``timeout_seconds``: integer 1..3600 (optional);
  no other keys; body at most 64 KiB with a Content-Length. Anything else -> ``400 {"error"}``.
  With ``max_pending`` requests pending, or ``max_requests_per_minute`` created in the last
  60 s -> ``429 {"error"}`` with a Retry-After; nothing is written for it.
- ``GET /v1/requests/<id>?wait=<seconds>`` -> ``200 {"id", "status", "reason", "by",
  "decided_at", "expires_at"}``, waiting up to ``wait`` (at most 60) while the status is
  ``pending``. Unknown id -> ``404``. ``expired`` means deny.
- ``GET /healthz`` -> ``200 {"ok": true}`` (the init readiness probe).

Run as root (the bundle), the daemon becomes the owner of its state dir before it serves, so its
files (0600) belong to the host user, who must read and decide them; a root parent stays behind
only to pass init's stop signal on (root without CAP_KILL may not signal another uid).

The daemon keeps nothing in memory: requests and decisions are files in the state dir
(``supervise_store``), and the host decides by writing ``decisions/<id>.json`` while the daemon
polls for it every 0.2 s. Each HTTP request is one JSON line on stdout, with the tool input
truncated. Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from bottle_tasks.contract import SupervisePolicy
from bottle_tasks.sidecars.audit import AuditWriter
from bottle_tasks.sidecars.configfile import config_failer, read_yaml, string_list
from bottle_tasks.sidecars.daemon import (
    BoundedThreadingMixIn, install_stop_handlers, read_chunks, split_host_port, wait_for_stop_signal,
)
from bottle_tasks.sidecars.supervise_store import (
    MAX_TIMEOUT_S, MIN_TIMEOUT_S, InvalidArgument, Request, Store, SuperviseError, TooManyRequests, UnknownRequest,
    become, state_dir_owner, validate_request_fields,
)

DEFAULT_CONFIG = "/etc/bottle/supervise.yaml"
DEFAULT_STATE_DIR = "/var/lib/bottle/supervise"
DEFAULT_TIMEOUT_S = 300
MAX_BODY_BYTES = 64 * 1024
MAX_DRAIN_BYTES = 1024 * 1024  # an oversized body is read and dropped up to this, then the connection closes
MAX_WAIT_S = 60.0
POLL_INTERVAL_S = 0.2
MAX_CONNECTIONS = 128          # long polls hold a thread each
SOCKET_TIMEOUT_S = 15.0        # for reading a request, not for the long poll itself
LOG_INPUT_CHARS = 300
REQUEST_KEYS = frozenset({"tool", "input", "summary", "timeout_seconds"})
REQUEST_PATH = "/v1/requests"
MAX_LIMIT = 100_000
CONFIG_KEYS = frozenset({"version", "listen", "state_dir", "default_timeout_seconds", "tools", "max_pending",
                         "max_requests_per_minute"})


class ConfigError(Exception):
    pass


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    state_dir: Path
    policy: SupervisePolicy = SupervisePolicy(tools=(), timeout=DEFAULT_TIMEOUT_S)


def parse_config(data: Any, source: str = "supervise.yaml") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with listen, state_dir, default_timeout_seconds, tools")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    if "listen" not in data:
        raise ConfigError(f"{source}: listen is required (ip:port)")
    try:
        host, port = split_host_port(data["listen"], default_host="0.0.0.0")
    except ValueError:
        raise ConfigError(f"{source}: listen must be ip:port, got {data['listen']!r}") from None
    state_dir = data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        raise ConfigError(f"{source}: state_dir must be a path")
    timeout = data.get("default_timeout_seconds", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not MIN_TIMEOUT_S <= timeout <= MAX_TIMEOUT_S:
        raise ConfigError(f"{source}: default_timeout_seconds must be an integer from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}")
    tools = string_list(data.get("tools"), "tools", config_failer(ConfigError, source))
    limits = {}
    for key in ("max_pending", "max_requests_per_minute"):
        value = data.get(key, getattr(SupervisePolicy, key))
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
            raise ConfigError(f"{source}: {key} must be an integer from 1 to {MAX_LIMIT}")
        limits[key] = value
    return Config(host, port, Path(state_dir), SupervisePolicy(tools=tuple(tools), timeout=timeout, **limits))


def load_config(path: Path) -> Config:
    return parse_config(read_yaml(path, ConfigError, "supervise config"), str(path))


def truncate(value: Any, limit: int = LOG_INPUT_CHARS) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"


_print_lock = threading.Lock()


def log(record: Mapping[str, Any]) -> None:
    line = json.dumps({"ts": round(time.time(), 3), "daemon": "supervise", **record}, ensure_ascii=True)
    with _print_lock:
        print(line, flush=True)


def parse_request_body(body: bytes, default_timeout: int) -> tuple[str, dict[str, Any], str, int]:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(document) - REQUEST_KEYS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    if "tool" not in document:
        raise BadRequest("tool is required")
    tool = document["tool"]
    payload = document.get("input", {})
    summary = document.get("summary", "")
    timeout = document.get("timeout_seconds", default_timeout)
    try:
        validate_request_fields(tool, payload, summary, timeout)
    except InvalidArgument as error:
        raise BadRequest(str(error)) from None
    return tool, payload, summary, timeout


def parse_wait(query: str) -> float:
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("wait")
    if not values:
        return 0.0
    try:
        wait = float(values[-1])
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    if not 0 <= wait < float("inf"):
        raise BadRequest("wait must be a number of seconds from 0 to 60")
    return min(wait, MAX_WAIT_S)


# --------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server: "SuperviseServer"
    server_version = "bottle-supervise/1"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one JSON line per request instead, from the handlers below

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed request lines etc.: JSON like everything else, never an HTML page.
        self.close_connection = True
        try:
            self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def send_json(self, status: int, document: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        body = (json.dumps(document, ensure_ascii=True) + "\n").encode("ascii")
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def dispatch(self, route: Any) -> None:
        try:
            route()
        except BadRequest as error:
            log({"event": "bad_request", "method": self.command, "path": self.path[:200],
                 "status": error.status, "error": str(error), "client": self.client_address[0]})
            self.send_json(error.status, {"error": str(error)}, error.headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as error:  # never a traceback to the client; one line in the log
            log({"event": "error", "method": self.command, "path": self.path[:200],
                 "error": f"{type(error).__name__}: {error}"[:500]})
            try:
                self.send_json(500, {"error": "internal error"})
            except OSError:
                pass

    def do_POST(self) -> None:
        self.dispatch(self.post)

    def do_GET(self) -> None:
        self.dispatch(self.get)

    def do_PUT(self) -> None:
        self.dispatch(self.not_allowed)

    do_DELETE = do_PATCH = do_HEAD = do_PUT

    def not_allowed(self) -> None:
        raise BadRequest(f"method {self.command} not allowed", status=405)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked bodies are not accepted; send a Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.strip().isdigit():
            self.close_connection = True
            raise BadRequest("a Content-Length is required")
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self.drain(length)
            raise BadRequest(f"body is larger than {MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise BadRequest("body shorter than its Content-Length")
        return body

    def drain(self, length: int) -> None:
        """Read (and drop) an oversized body, so the client gets its 400 instead of a reset."""
        for _chunk in read_chunks(self.rfile, min(length, MAX_DRAIN_BYTES)):
            pass

    def post(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != REQUEST_PATH:
            raise BadRequest(f"no such endpoint {path[:100]}", status=404)
        tool, payload, summary, timeout = parse_request_body(self.read_body(), self.server.config.policy.timeout)
        try:
            request = self.server.store.create_request(tool, payload, summary, timeout)
        except TooManyRequests as error:
            raise BadRequest(str(error), status=429,
                             headers={"Retry-After": str(int(error.retry_after + 0.999))}) from None
        log({"event": "request", "id": request.id, "tool": tool, "summary": truncate(summary),
             "input": truncate(payload), "timeout_seconds": timeout, "expires_at": request.expires_at,
             "client": self.client_address[0]})
        self.send_json(201, {"id": request.id, "status": request.status, "expires_at": request.expires_at})

    def get(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/healthz":
            self.send_json(200, {"ok": True})
            return
        prefix = REQUEST_PATH + "/"
        if not parts.path.startswith(prefix) or "/" in parts.path[len(prefix):]:
            raise BadRequest(f"no such endpoint {parts.path[:100]}", status=404)
        request_id = parts.path[len(prefix):]
        wait = parse_wait(parts.query)
        started = time.monotonic()
        request = self.lookup(request_id)
        while request.pending and time.monotonic() - started < wait and not self.server.stopping.is_set():
            self.server.stopping.wait(min(POLL_INTERVAL_S, max(0.0, wait - (time.monotonic() - started))))
            request = self.lookup(request_id)
        record: dict[str, Any] = {"event": "poll" if request.pending else "decision", "id": request.id,
                                  "tool": request.tool, "status": request.status,
                                  "waited_s": round(time.monotonic() - started, 2)}
        if not request.pending:
            record.update(by=request.by, reason=truncate(request.reason), decided_at=request.decided_at)
        log(record)
        self.send_json(200, request.api())

    def lookup(self, request_id: str) -> Request:
        try:
            return self.server.store.get(request_id)
        except UnknownRequest:
            raise BadRequest(f"unknown request id {request_id[:80]!r}", status=404) from None
        except SuperviseError as error:
            raise BadRequest(str(error), status=500) from None


class SuperviseServer(BoundedThreadingMixIn, HTTPServer):
    allow_reuse_address = True
    max_connections = MAX_CONNECTIONS

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store = store or store_for(config)
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__((config.host, config.port), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> "SuperviseServer":
        """Serve in a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting; long polls in progress answer with the current status at once."""
        self.stopping.set()
        self.shutdown()
        self.server_close()


def store_for(config: Config, state_dir: Path | None = None) -> Store:
    return Store(state_dir or config.state_dir, max_pending=config.policy.max_pending,
                 max_per_minute=config.policy.max_requests_per_minute, audit=AuditWriter.from_env("supervise"))


def serve(config: Config, stopped: threading.Event, state_dir: Path | None = None,
          become_owner: Callable[[], None] | None = None) -> int:
    """Listen, become the state dir's owner (when given how), lay out the state dir and serve until
    ``stopped``. Binding comes first, so whatever it needs (name lookup codecs) is loaded as root."""
    try:
        store = store_for(config, state_dir)
        server = SuperviseServer(config, store)
        if become_owner is not None:
            become_owner()
        store.ensure_layout()
    except OSError as error:
        print(f"supervise: {error}", file=sys.stderr, flush=True)
        return 2
    server.start()
    log({"event": "listening", "listen": f"{config.host}:{server.port}", "state_dir": str(config.state_dir),
         "uid": os.geteuid(), "default_timeout_seconds": config.policy.timeout, "tools": list(config.policy.tools),
         "max_pending": config.policy.max_pending,
         "max_requests_per_minute": config.policy.max_requests_per_minute})
    wait_for_stop_signal(stopped)
    server.stop()
    log({"event": "stopped"})
    return 0


def serve_as(owner: tuple[int, int], config: Config) -> int:
    """Serve in a child that is the state dir's owner for good. The root parent only waits: init
    (root, without CAP_KILL) may signal it but not the child, so the parent passes a stop on by
    closing a pipe, and the child stops when the pipe ends (also when the parent is killed)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process (tested through main)
        code = 2
        try:
            os.close(write_end)
            stopped = install_stop_handlers()
            # By cwd: the dir's parents (/var/lib/bottle, 0700 root) need not be searchable by the owner.
            os.chdir(config.state_dir)
            threading.Thread(target=lambda: (os.read(read_end, 1), stopped.set()), daemon=True).start()
            code = serve(config, stopped, state_dir=Path("."), become_owner=lambda: become(*owner))
        except OSError as error:
            print(f"supervise: {config.state_dir}: {error}", file=sys.stderr, flush=True)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(read_end)
    open_ends = [write_end]

    def stop(*_args: Any) -> None:
        while open_ends:  # once: a second signal finds nothing left to close
            os.close(open_ends.pop())

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    _, status = os.waitpid(child, 0)
    stop()
    return os.waitstatus_to_exitcode(status)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bottle_tasks.sidecars.supervise",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="supervise.yaml")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        config = load_config(args.config)
        owner = state_dir_owner(config.state_dir)
    except (ConfigError, OSError) as error:
        print(f"supervise: {error}", file=sys.stderr, flush=True)
        return 2
    if owner is not None:
        return serve_as(owner, config)
    return serve(config, install_stop_handlers())


if __name__ == "__main__":
    sys.exit(main())
