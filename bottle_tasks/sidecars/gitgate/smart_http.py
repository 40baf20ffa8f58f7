"""git smart HTTP by running ``git http-backend`` as CGI, for the configured repos only.

Only ``/<name>.git/{info/refs,git-upload-pack,git-receive-pack}`` is served, and only the smart
protocol; request bodies may be gzipped or chunked. The CGI environment is the one the server is
given (no token variables) plus the request's; Authorization and Cookie headers never reach git.

The guest may be hostile, so every connection is bounded (``HttpLimits``):

- at most ``max_connections`` at once; over the cap a connection is closed unanswered, before
  anything is started for it;
- every read and write on the socket times out after ``idle_timeout_s``; the request line and
  headers must be in within ``request_timeout_s``; the body must bring at least ``min_body_bytes``
  in every ``body_window_s`` (a trickle is dropped) and at most ``max_body_bytes`` in all. A
  watchdog thread shuts down the socket of a connection that falls behind;
- http-backend runs in a process group of its own (with receive-pack or upload-pack and the
  hooks under it). A request whose body does not arrive whole (a timeout, a trickle, a client that
  goes away, a malformed chunk, too many bytes) has the whole group killed and http-backend reaped.
  The body is piped to http-backend without ``CONTENT_LENGTH``, so git reads it to EOF: given a
  length, git 2.39's http-backend spins forever on a body that ends early.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

from bottle_tasks.contract import DEFAULT_MAX_PUSH_BYTES
from bottle_tasks.sidecars.daemon import BoundedThreadingMixIn
from bottle_tasks.sidecars.gitgate.git import git_error_line

REMOTE_USER = "agent"
MAX_CONNECTIONS = 64
KILL_GRACE_S = 5.0  # SIGTERM to SIGKILL, for a request's process group
BODY_SLACK_BYTES = 16 * 1024 * 1024  # a receive-pack body: ref commands on top of the pack
_SERVICE_PATH = re.compile(r"^/([A-Za-z0-9][A-Za-z0-9._-]*)\.git/(info/refs|git-upload-pack|git-receive-pack)$")
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,15}$")


@dataclass(frozen=True)
class HttpLimits:
    idle_timeout_s: float = 60.0         # any one read or write on the socket
    request_timeout_s: float = 30.0      # the request line and the headers, in all
    body_window_s: float = 60.0          # a body must bring at least min_body_bytes in each such window
    min_body_bytes: int = 4096
    max_body_bytes: int | None = DEFAULT_MAX_PUSH_BYTES + BODY_SLACK_BYTES  # as sent (framing, gzip); None: none


class BodyError(Exception):
    """The request body did not arrive whole; status is what the log records (408, 413 or 400)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class _Watch:
    """One connection as the watchdog sees it: its phase and the body bytes of the current window."""

    def __init__(self, sock: socket.socket, client: str):
        self.sock = sock
        self.client = client
        self.phase = "request"           # "request" (line and headers), "body", "busy" (nothing to check)
        self.since = time.monotonic()    # phase or window start
        self.window_bytes = 0
        self.dropped = ""                # why the watchdog shut the socket down

    def body(self) -> None:
        self.phase, self.since, self.window_bytes = "body", time.monotonic(), 0

    def busy(self) -> None:
        self.phase = "busy"

    def count(self, n: int) -> None:
        self.window_bytes += n


class Watchdog:
    """Shuts down the socket of a connection slower than its limits (see the module docstring)."""

    def __init__(self, limits: HttpLimits, log: Callable[[dict[str, Any]], None] | None):
        self.limits = limits
        self.log = log
        self._lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._stop = threading.Event()
        self._tick = max(0.05, min(1.0, limits.request_timeout_s / 4, limits.body_window_s / 4))
        self._thread = threading.Thread(target=self._run, name="git-gate-http-watchdog", daemon=True)
        self._thread.start()

    def register(self, sock: socket.socket, client: str) -> _Watch:
        watch = _Watch(sock, client)
        with self._lock:
            self._watches.add(watch)
        return watch

    def unregister(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def active(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._watches)

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            if watch.dropped:
                continue
            if watch.phase == "request" and now - watch.since > self.limits.request_timeout_s:
                self._drop(watch, f"request headers not in within {self.limits.request_timeout_s:g} s")
            elif watch.phase == "body" and now - watch.since >= self.limits.body_window_s:
                if watch.window_bytes < self.limits.min_body_bytes:
                    self._drop(watch, f"request body slower than {self.limits.min_body_bytes} bytes in "
                                      f"{self.limits.body_window_s:g} s")
                else:
                    watch.since, watch.window_bytes = now, 0

    def _drop(self, watch: _Watch, reason: str) -> None:
        watch.dropped = reason
        try:
            watch.sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once, empty
        except OSError:
            pass
        if self.log is not None:
            self.log({"event": "http-drop", "client": watch.client, "reason": reason})

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            self.check()

    def stop(self) -> None:
        self._stop.set()


class _ProcessGroup:
    """http-backend, started as the leader of a process group of its own, and everything under it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._lock = threading.Lock()
        self.stopped = False

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _leader_exited(self) -> bool:
        try:  # WNOWAIT: a zombie leader keeps its pid, so the group id cannot be reused before the SIGKILL
            return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # already reaped

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left after KILL_GRACE_S, then reap the leader."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            if self.process.returncode is None:
                self._signal(signal.SIGTERM)
                deadline = time.monotonic() + KILL_GRACE_S
                while not self._leader_exited() and time.monotonic() < deadline:
                    time.sleep(0.05)
                self._signal(signal.SIGKILL)
        self.process.wait()

    def reap(self, timeout: float = 30.0) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()


class GitCgiServer(BoundedThreadingMixIn, HTTPServer):
    """Serves ``/<name>.git/{info/refs,git-upload-pack,git-receive-pack}`` for the named repos only.

    ``before(repo, service)`` runs before an ``info/refs`` advertisement (git-gate refreshes there);
    ``after(repo, service)`` after each RPC. Subclasses may override ``authorize``. At most
    ``max_connections`` at once; over the cap a connection is closed unanswered.
    """

    allow_reuse_address = True
    max_connections = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], project_root: Path, repo_names: Iterable[str],
                 cgi_env: Mapping[str, str], *, before: Callable[[str, str], None] | None = None,
                 after: Callable[[str, str], None] | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, limits: HttpLimits = HttpLimits()):
        self.project_root = project_root
        self.repo_names = frozenset(repo_names)
        self.cgi_env = dict(cgi_env)
        self.before = before
        self.after = after
        self.log = log
        self.limits = limits
        super().__init__(address, GitCgiHandler)
        self.watchdog = Watchdog(limits, log)

    def authorize(self, handler: GitCgiHandler) -> bool:
        """True to serve the request; otherwise send a response yourself and return False."""
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (reset, timed out): one JSON line, not socketserver's traceback."""
        kind = sys.exc_info()[0]
        if self.log is not None:
            self.log({"event": "http-error", "client": str(client_address[0]) if client_address else "",
                      "reason": kind.__name__ if kind else "unknown"})

    def server_close(self) -> None:
        self.watchdog.stop()
        super().server_close()


class GitCgiHandler(BaseHTTPRequestHandler):
    server: GitCgiServer
    server_version = "git-gate"
    protocol_version = "HTTP/1.0"  # one request per connection: the response body streams until close

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()
        self.watch = self.server.watchdog.register(self.connection, str(self.client_address[0]))

    def finish(self) -> None:
        self.server.watchdog.unregister(self.watch)
        try:
            super().finish()
        except OSError:
            pass  # the client is gone; nothing left to flush to it

    def do_GET(self) -> None:
        self.handle_git()

    def do_POST(self) -> None:
        self.handle_git()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged as JSON by handle_git

    def plain(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_git(self) -> None:
        if self.watch.dropped:
            return  # the headers came in cut short by the watchdog; the socket is already shut
        if self.command == "POST":
            self.watch.body()
        else:
            self.watch.busy()
        path, _, query = self.path.partition("?")
        match = _SERVICE_PATH.match(path)
        if not match or match[1] not in self.server.repo_names:
            self.plain(404, "git-gate: no such repository")
            return
        repo, what = match[1], match[2]
        if what == "info/refs":
            service = dict(part.partition("=")[::2] for part in query.split("&") if part).get("service", "")
            if self.command != "GET" or service not in ("git-upload-pack", "git-receive-pack"):
                self.plain(403, "git-gate: only the smart HTTP protocol is served")
                return
        else:
            service = what
            if self.command != "POST":
                self.plain(405, "git-gate: POST only")
                return
        if not self.server.authorize(self):
            return
        if what == "info/refs" and self.server.before is not None:
            self.server.before(repo, service)
        status = self.run_cgi(path, query)
        if what != "info/refs" and self.server.after is not None:
            self.server.after(repo, service)
        if self.server.log is not None:
            self.server.log({"event": "http", "repo": repo, "method": self.command, "service": service,
                             "advertisement": what == "info/refs", "status": status,
                             "gzip": self.headers.get("Content-Encoding", "") in ("gzip", "x-gzip"),
                             "chunked": self.headers.get("Transfer-Encoding", "").lower() == "chunked"})

    def cgi_environment(self, path: str, query: str) -> dict[str, str]:
        env = dict(self.server.cgi_env)
        env.update({
            "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": "git-gate", "REQUEST_METHOD": self.command,
            "PATH_INFO": path, "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0], "REMOTE_USER": REMOTE_USER,
            "GIT_PROJECT_ROOT": str(self.server.project_root), "GIT_HTTP_EXPORT_ALL": "1",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        })
        # No CONTENT_LENGTH: request_body() enforces the length and closes git's stdin after it.
        for name, value in self.headers.items():
            lowered = name.lower()
            if lowered in ("authorization", "proxy-authorization", "cookie", "content-type", "content-length"):
                continue
            # HTTP_CONTENT_ENCODING (gzip request bodies) and HTTP_GIT_PROTOCOL (v2) are read by http-backend.
            env["HTTP_" + re.sub(r"[^A-Z0-9]", "_", name.upper())] = value
        return env

    # -- the request body ---------------------------------------------------------------------

    def _account(self, n: int, total: int) -> int:
        self.watch.count(n)
        total += n
        limit = self.server.limits.max_body_bytes
        if limit is not None and total > limit:
            raise BodyError(413, f"request body larger than {limit} bytes")
        return total

    def _read_exactly(self, size: int, total: int) -> Iterator[tuple[bytes, int]]:
        """size bytes of the body as they arrive (read1: every byte counts for the watchdog at once)."""
        remaining = size
        while remaining > 0:
            chunk = self.rfile.read1(min(remaining, 65536))
            if not chunk:
                raise BodyError(408 if self.watch.dropped else 400,
                                self.watch.dropped or "request body ended before its length")
            remaining -= len(chunk)
            total = self._account(len(chunk), total)
            yield chunk, total

    def _line(self, limit: int, total: int) -> tuple[bytes, int]:
        line = self.rfile.readline(limit)
        total = self._account(len(line), total)
        if not line.endswith(b"\n"):
            raise BodyError(408 if self.watch.dropped else 400,
                            self.watch.dropped or "request body ended or broke inside its chunk framing")
        return line, total

    def request_body(self) -> Iterator[bytes]:
        """The body, de-chunked; BodyError unless it arrives whole and within the limits."""
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size_line, total = self._line(1024, total)
                size_text = size_line.split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.match(size_text):
                    raise BodyError(400, "malformed chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        line, total = self._line(8192, total)
                        if line in (b"\r\n", b"\n"):
                            return
                for chunk, total in self._read_exactly(size, total):
                    yield chunk
                end, total = self._line(8, total)
                if end not in (b"\r\n", b"\n"):
                    raise BodyError(400, "malformed chunk")
        else:
            text = (self.headers.get("Content-Length") or "0").strip()
            if not text.isdigit():
                raise BodyError(400, "malformed Content-Length")
            length = int(text)
            limit = self.server.limits.max_body_bytes
            if limit is not None and length > limit:
                raise BodyError(413, f"request body larger than {limit} bytes")
            for chunk, total in self._read_exactly(length, total):
                yield chunk

    def feed(self, stdin: IO[bytes], group: _ProcessGroup, failure: list[BodyError]) -> None:
        """Pipe the body to http-backend. If git stops reading early (it refused the push), keep
        reading the body, so the client finishes sending and reads git's answer. If the body does
        not arrive whole, kill the process group: git must not act on half a request."""
        writing = True
        try:
            for chunk in self.request_body():
                if writing:
                    try:
                        stdin.write(chunk)
                    except (OSError, ValueError):
                        writing = False
        except BodyError as exc:
            failure.append(exc)
        except TimeoutError:
            failure.append(BodyError(408, f"no request body for {self.server.limits.idle_timeout_s:g} s"))
        except (OSError, ValueError) as exc:
            failure.append(BodyError(400, f"request body unreadable ({type(exc).__name__})"))
        finally:
            self.watch.busy()
            try:
                stdin.close()
            except OSError:
                pass
        if failure:
            group.stop()

    # -- running http-backend -----------------------------------------------------------------

    def run_cgi(self, path: str, query: str) -> int:
        process = subprocess.Popen(["git", "http-backend"], env=self.cgi_environment(path, query),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        assert process.stdin and process.stdout and process.stderr
        group = _ProcessGroup(process)
        errors: list[bytes] = []
        failure: list[BodyError] = []

        def drain(stderr: IO[bytes]) -> None:
            errors.append(stderr.read(1 << 16))
            stderr.read()

        feeder = threading.Thread(target=self.feed, args=(process.stdin, group, failure), daemon=True)
        drainer = threading.Thread(target=drain, args=(process.stderr,), daemon=True)
        feeder.start()
        drainer.start()
        status, sent = 502, False
        try:
            status, reason, headers = self.cgi_headers(process.stdout)
            sent = True
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            while True:
                chunk = process.stdout.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
            self.wfile.flush()
        except (OSError, ValueError):
            group.stop()  # the client went away, or http-backend broke its output
            if not sent and not failure:
                try:
                    self.plain(502, "git-gate: git http-backend failed")
                except OSError:
                    pass
        finally:
            process.stdout.close()
            feeder.join()  # bounded: the body phase has the watchdog, the idle timeout and max_body_bytes
            if failure:
                group.stop()
            else:
                group.reap()
            drainer.join(timeout=5)
        if failure:
            self.close_connection = True
            if self.server.log is not None:
                self.server.log({"event": "http-abort", "client": self.client_address[0], "status": failure[0].status,
                                 "reason": str(failure[0])})
            return failure[0].status
        message = b"".join(errors).decode("utf-8", "replace").strip()
        if message and self.server.log is not None:
            self.server.log({"event": "http-backend", "status": status, "reason": git_error_line(message)})
        return status

    @staticmethod
    def cgi_headers(stdout: IO[bytes]) -> tuple[int, str, list[tuple[str, str]]]:
        status, reason, headers = 200, "OK", []
        while True:
            line = stdout.readline(65536)
            if not line:
                raise ValueError("http-backend ended before its headers")
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                return status, reason, headers
            name, _, value = text.partition(":")
            value = value.strip()
            if name.lower() == "status":
                code, _, reason = value.partition(" ")
                status = int(code)
            else:
                headers.append((name, value))
