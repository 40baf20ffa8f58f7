"""git smart HTTP by running ``git http-backend`` as CGI, for the configured repos only.

Only ``/<name>.git/{info/refs,git-upload-pack,git-receive-pack}`` is served, and only the smart
protocol; request bodies may be gzipped or chunked. The CGI environment is the one the server is
given (no token variables) plus the request's; Authorization and Cookie headers never reach git.
"""

from __future__ import annotations

import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

from bottle_tasks.sidecars.daemon import BoundedThreadingMixIn, read_chunks
from bottle_tasks.sidecars.gitgate.git import git_error_line

REMOTE_USER = "agent"
MAX_CONNECTIONS = 64
_SERVICE_PATH = re.compile(r"^/([A-Za-z0-9][A-Za-z0-9._-]*)\.git/(info/refs|git-upload-pack|git-receive-pack)$")


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
                 log: Callable[[dict[str, Any]], None] | None = None):
        self.project_root = project_root
        self.repo_names = frozenset(repo_names)
        self.cgi_env = dict(cgi_env)
        self.before = before
        self.after = after
        self.log = log
        super().__init__(address, GitCgiHandler)

    def authorize(self, handler: GitCgiHandler) -> bool:
        """True to serve the request; otherwise send a response yourself and return False."""
        return True


class GitCgiHandler(BaseHTTPRequestHandler):
    server: GitCgiServer
    server_version = "git-gate"
    protocol_version = "HTTP/1.0"  # one request per connection: the response body streams until close

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
        if self.headers.get("Content-Length"):
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        for name, value in self.headers.items():
            lowered = name.lower()
            if lowered in ("authorization", "proxy-authorization", "cookie", "content-type", "content-length"):
                continue
            # HTTP_CONTENT_ENCODING (gzip request bodies) and HTTP_GIT_PROTOCOL (v2) are read by http-backend.
            env["HTTP_" + re.sub(r"[^A-Z0-9]", "_", name.upper())] = value
        return env

    def request_body(self) -> Iterable[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    return
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from read_chunks(self.rfile, size)  # cut short at EOF: the next size line is b""
                self.rfile.readline(8)  # CRLF after the chunk
        else:
            yield from read_chunks(self.rfile, int(self.headers.get("Content-Length") or 0))

    def run_cgi(self, path: str, query: str) -> int:
        process = subprocess.Popen(["git", "http-backend"], env=self.cgi_environment(path, query),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdin and process.stdout and process.stderr
        errors: list[bytes] = []

        def feed(stdin: IO[bytes]) -> None:
            try:
                for chunk in self.request_body():
                    stdin.write(chunk)
            except (OSError, ValueError):
                pass
            finally:
                try:
                    stdin.close()
                except OSError:
                    pass

        def drain(stderr: IO[bytes]) -> None:
            errors.append(stderr.read(1 << 16))
            stderr.read()

        feeder = threading.Thread(target=feed, args=(process.stdin,), daemon=True)
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
            process.kill()  # the client went away, or http-backend broke its output
            if not sent:
                try:
                    self.plain(502, "git-gate: git http-backend failed")
                except OSError:
                    pass
        finally:
            process.stdout.close()
            process.wait()
            feeder.join(timeout=5)
            drainer.join(timeout=5)
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
