"""The one way this project runs an external command (docker, crane, smolvm, pipelock).

Errors carry the argv and stderr, as python-on-whales does. Secrets never travel on argv: a
caller passes them through `env` and names the variable on the command line (`-e NAME`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

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
) -> Result:
    """Run argv; `env` entries are added to the current environment, and `input` goes to stdin (use
    either for secrets). Bytes input (a tar stream) is passed as is; output is text either way."""
    argv = [str(a) for a in argv]
    full_env = {**os.environ, **env} if env else None
    binary = isinstance(input, bytes)
    try:
        proc = subprocess.run(
            argv, env=full_env, input=input, timeout=timeout, text=not binary,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise ToolMissing(f"{argv[0]} is not installed or not on PATH (needed for: {shlex.join(argv[:3])} ...)") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout}s\n{exc.stderr or ''}") from None
    out, err = proc.stdout or "", proc.stderr or ""
    if binary:
        out, err = (stream.decode("utf-8", "replace") if stream else "" for stream in (out, err))
    result = Result(tuple(argv), proc.returncode, out, err)
    if check and not result.ok:
        raise CommandError(argv, result.returncode, result.stderr)
    return result
