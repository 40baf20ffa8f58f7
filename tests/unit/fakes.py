"""Fakes shared by the unit tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakePipelock:
    """A stand-in for pipelock's POST /api/v1/scan on 127.0.0.1."""

    def __init__(self, reply):
        self.reply = reply  # callable(request_json) -> (status, body_dict_or_bytes)
        self.requests: list[tuple[dict, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((payload, self.headers.get("Authorization", "")))
                status, body = fake.reply(payload)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/scan"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeRunner:
    """Stands in for runner.run: records every argv (and the env it was given) and answers from a script.

    `answers` maps an argv prefix (a tuple) to a Result-like (returncode, stdout, stderr) or a callable
    taking the argv; the longest matching prefix wins; anything else succeeds with no output. An
    `on_line` callback gets the answer's stdout lines, then its stderr lines, as runner.run would."""

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.calls: list[list[str]] = []
        self.envs: list[dict | None] = []
        self.inputs: list[str | None] = []

    def __call__(self, argv, *, check=True, env=None, input=None, timeout=None, capture=True, on_line=None):
        from bottle_tasks.runner import CommandError, Result

        argv = [str(a) for a in argv]
        self.calls.append(argv)
        self.envs.append(dict(env) if env is not None else None)
        self.inputs.append(input)
        answer = (0, "", "")
        best = -1
        for prefix, value in self.answers.items():
            if tuple(argv[:len(prefix)]) == tuple(prefix) and len(prefix) > best:
                best, answer = len(prefix), value
        if callable(answer):
            answer = answer(argv)
        code, out, err = answer
        for line in [*out.splitlines(), *err.splitlines()] if on_line else ():
            on_line(line)
        result = Result(tuple(argv), code, out, err)
        if check and code != 0:
            raise CommandError(argv, code, err)
        return result

    def commands(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[:len(prefix)] == list(prefix)]
