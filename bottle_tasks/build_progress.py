"""An image build's progress, read from the lines `docker build` prints as they arrive.

parse_step knows both builders: the classic one (`Step 5/12 : RUN ...`, Docker 20.10's default) and
BuildKit's plain progress (`#8 [ 5/12] RUN ...`, DOCKER_BUILDKIT=1 and newer engines). BuildProgress
shows the current step: on a terminal one line, redrawn in place with the step's running time (a
ticker redraws it while a quiet RUN prints nothing); elsewhere (CI, pipes) one plain line per step
as it starts, so a log shows progress too.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

_CLASSIC = re.compile(r"Step (?P<number>\d+)/(?P<total>\d+) : (?P<text>.*)")
# `#8 [ 5/12] RUN ...`, or with a stage name in a multi-stage build: `#12 [builder 2/4] COPY ...`.
# `#1 [internal] load build definition` has no n/m: not a step.
_BUILDKIT = re.compile(r"#\d+ \[\s*(?:(?P<stage>\S+)\s+)?(?P<number>\d+)/(?P<total>\d+)\] (?P<text>.*)")

PLAIN_WIDTH = 160      # a CI log line: the step's text is cut here (the full output stays in the Result)
TICK_SECONDS = 1.0


@dataclass(frozen=True)
class BuildStep:
    number: int
    total: int
    text: str
    stage: str = ""

    def label(self) -> str:
        stage = f" ({self.stage})" if self.stage else ""
        return f"step {self.number}/{self.total}{stage}: {self.text}"


def parse_step(line: str) -> BuildStep | None:
    """The build step a line of build output starts, or None for any other line."""
    line = line.rstrip()
    match = _CLASSIC.fullmatch(line) or _BUILDKIT.fullmatch(line)
    if match is None:
        return None
    fields = match.groupdict()
    return BuildStep(int(fields["number"]), int(fields["total"]), fields["text"].strip(), fields.get("stage") or "")


def duration(seconds: float) -> str:
    """1.2 s, 48 s, 3 m 04 s: tenths only where they matter."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} m {rest:02d} s"


def fit(text: str, width: int) -> str:
    """text cut to width characters, the cut marked with an ellipsis."""
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


class BuildProgress:
    """Use as `with BuildProgress.on(sys.stdout) as progress: docker(..., on_line=progress.line)`.

    stream, tty, width (a callable: the terminal may be resized) and clock are injected, so the
    rendering is tested without a terminal or a real build."""

    def __init__(self, stream: TextIO, *, tty: bool, width: Callable[[], int] = lambda: 80,
                 clock: Callable[[], float] = time.monotonic, tick_seconds: float = TICK_SECONDS) -> None:
        self._stream, self.tty, self._width, self._clock = stream, tty, width, clock
        self._tick_seconds = tick_seconds
        self._lock = threading.Lock()        # the ticker and the build's lines both draw
        self._seen: set[BuildStep] = set()
        self._current: BuildStep | None = None
        self._since = clock()
        self._drawn = ""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def on(cls, stream: TextIO) -> BuildProgress:
        return cls(stream, tty=_isatty(stream), width=lambda: shutil.get_terminal_size().columns)

    def __enter__(self) -> BuildProgress:
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="build-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._drawn:
                self._draw()
                self._write("\n")       # the last step stays on screen; what follows starts a line of its own

    def line(self, line: str) -> None:
        """One line of build output (runner.run's on_line)."""
        step = parse_step(line)
        with self._lock:
            if step is not None and step not in self._seen:   # BuildKit repeats a step's header
                self._seen.add(step)
                self._current, self._since = step, self._clock()
                if not self.tty:
                    self._write(f"  {fit(step.label(), PLAIN_WIDTH)}\n")
            if self.tty:
                self._draw()

    def refresh(self) -> None:
        """Redraw the terminal line with the time the step has taken so far (what the ticker calls)."""
        with self._lock:
            if self.tty:
                self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_seconds):
            self.refresh()

    def _draw(self) -> None:
        width = max(self._width() - 1, 20)      # never the last column: a terminal wraps there
        label = self._current.label() if self._current else "preparing the build"
        elapsed = f"  {duration(self._clock() - self._since)}"
        text = ("  " + fit(label, width - 2 - len(elapsed)) + elapsed).ljust(width)
        if text != self._drawn:
            self._write("\r" + text)
            self._drawn = text

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
