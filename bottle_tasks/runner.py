"""The one way this project runs an external command (docker, crane, smolvm, pipelock).

Errors carry the argv and stderr, as python-on-whales does. Secrets never travel on argv: a
caller passes them through `env` and names the variable on the command line (`-e NAME`).
A caller that shows progress (an image build) passes `on_line` and gets each output line as it
arrives; the Result still holds all of it.
"""

from __future__ import annotations

import codecs
import io
import os
import select
import selectors
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from bottle_tasks.errors import BottleError


class CommandError(BottleError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr
        tail = stderr.strip().splitlines()[-5:]
        super().__init__(f"command failed (exit {returncode}): {shlex.join(argv)}\n" + "\n".join(f"  {line}" for line in tail))


class ToolMissing(BottleError):
    pass


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    timeout: float | None = None,
    capture: bool = True,
    on_line: Callable[[str], None] | None = None,
) -> Result:
    """Run argv; `env` entries are added to the current environment, and `input` goes to stdin (use
    either for secrets). Bytes input (a tar stream) is passed as is; output is text either way.
    `on_line` receives every line of stdout and stderr, without its newline, as the command writes it
    (each stream's lines in order; the two interleave as they are read)."""
    argv = [str(a) for a in argv]
    full_env = {**os.environ, **env} if env else None
    if on_line is not None:
        if not capture:
            raise ValueError("on_line reads the output, so it needs capture=True")
        return _checked(check, _streamed(argv, full_env, input, timeout, on_line))
    binary = isinstance(input, bytes)
    try:
        proc = subprocess.run(
            argv, env=full_env, input=input, timeout=timeout, text=not binary,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise _tool_missing(argv) from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout}s\n{exc.stderr or ''}") from None
    out, err = proc.stdout or "", proc.stderr or ""
    if binary:
        out, err = (stream.decode("utf-8", "replace") if stream else "" for stream in (out, err))
    return _checked(check, Result(tuple(argv), proc.returncode, out, err))


def _tool_missing(argv: list[str]) -> ToolMissing:
    return ToolMissing(f"{argv[0]} is not installed or not on PATH (needed for: {shlex.join(argv[:3])} ...)")


def _checked(check: bool, result: Result) -> Result:
    if check and not result.ok:
        raise CommandError(result.argv, result.returncode, result.stderr)
    return result


class _Lines:
    """One output stream: all its text, and each complete line handed on as it arrives. Newlines are
    translated as text mode does (CRLF and a lone CR become LF), also across chunk boundaries."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("replace"), translate=True)
        self._on_line = on_line
        self._text: list[str] = []
        self._partial = ""

    def feed(self, chunk: bytes, *, final: bool = False) -> None:
        text = self._decoder.decode(chunk, final=final)
        self._text.append(text)
        *lines, self._partial = (self._partial + text).split("\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            self._on_line(line)

    @property
    def text(self) -> str:
        return "".join(self._text)


def _streamed(argv: list[str], env: Mapping[str, str] | None, input: str | bytes | None, timeout: float | None,
              on_line: Callable[[str], None]) -> Result:
    """run() with on_line: one selector reads stdout and stderr (and feeds stdin) in this thread, so
    neither pipe can fill and block the command. Whatever stops the loop (the timeout, an error in
    on_line, Ctrl-C) kills the command before it returns."""
    data = memoryview(input.encode() if isinstance(input, str) else input) if input is not None else None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if data is not None else None,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise _tool_missing(argv) from None
    streams = {proc.stdout: _Lines(on_line), proc.stderr: _Lines(on_line)}
    with proc:
        try:
            with selectors.DefaultSelector() as selector:
                for pipe in streams:
                    selector.register(pipe, selectors.EVENT_READ)
                if data is not None:
                    selector.register(proc.stdin, selectors.EVENT_WRITE)
                while selector.get_map():
                    for key, _ in selector.select(_remaining(deadline)):
                        if key.fileobj is proc.stdin:
                            data = _feed_stdin(proc, data, selector)
                            continue
                        chunk = os.read(key.fd, 65536)
                        streams[key.fileobj].feed(chunk, final=not chunk)
                        if not chunk:
                            selector.unregister(key.fileobj)
            returncode = proc.wait(_remaining(deadline))
        except subprocess.TimeoutExpired:
            proc.kill()
            output = "".join(lines.text for lines in streams.values())
            raise CommandError(argv, -1, f"timed out after {timeout}s\n{output}") from None
        except BaseException:
            proc.kill()
            raise
    out, err = (lines.text for lines in streams.values())
    return Result(tuple(argv), returncode, out, err)


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before the deadline; past it, TimeoutExpired (select would just return nothing)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise subprocess.TimeoutExpired("", 0)
    return left


def _feed_stdin(proc: subprocess.Popen, data: memoryview, selector: selectors.BaseSelector) -> memoryview:
    """Write what the pipe takes without blocking; close stdin once all is written or the command stopped reading."""
    try:
        data = data[os.write(proc.stdin.fileno(), data[:select.PIPE_BUF]):]
    except BrokenPipeError:
        data = data[:0]
    if not data:
        selector.unregister(proc.stdin)
        proc.stdin.close()
    return data
