"""A build's progress (bottle_tasks/build_progress.py): which lines start a step, in both builders'
formats; one redrawn line on a terminal, one plain line per step elsewhere; and build_image shows it."""

from __future__ import annotations

import io
import threading

import pytest

from bottle_tasks.build_progress import BuildProgress, BuildStep, duration, parse_step
from bottle_tasks.tasks import common, images
from tests.unit.fakes import FakeRunner
from tests.unit.test_build_trust import _image

CLASSIC_BUILD = """\
Sending build context to Docker daemon  12.8kB
Step 1/3 : FROM node:20-slim
 ---> 1a2b3c4d5e6f
Step 2/3 : RUN npm install -g @anthropic-ai/claude-code
 ---> Running in 0123456789ab
added 3 packages in 41s
 ---> 9f8e7d6c5b4a
Step 3/3 : CMD ["claude"]
Successfully built 9f8e7d6c5b4a
"""

BUILDKIT_BUILD = """\
#1 [internal] load build definition from Dockerfile
#1 DONE 0.0s
#5 [1/3] FROM docker.io/library/node:20-slim@sha256:abc
#5 DONE 0.1s
#8 [ 2/3] RUN npm install -g @anthropic-ai/claude-code
#8 0.512 added 3 packages in 41s
#9 [builder 1/2] COPY . .
#8 [ 2/3] RUN npm install -g @anthropic-ai/claude-code
#8 DONE 41.3s
#10 [ 3/3] COPY extra-ca.pem /usr/local/share/ca-certificates/
#10 CACHED
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("line,step", [
    ("Step 5/12 : RUN npm install -g @anthropic-ai/claude-code", BuildStep(5, 12, "RUN npm install -g @anthropic-ai/claude-code")),
    ("Step 1/3 : FROM node:20-slim AS base", BuildStep(1, 3, "FROM node:20-slim AS base")),
    ("#8 [ 5/12] RUN npm install -g @anthropic-ai/claude-code", BuildStep(5, 12, "RUN npm install -g @anthropic-ai/claude-code")),
    ("#12 [10/12] COPY bin/ /usr/local/bin/", BuildStep(10, 12, "COPY bin/ /usr/local/bin/")),
    ("#9 [builder 2/4] RUN go build ./...", BuildStep(2, 4, "RUN go build ./...", stage="builder")),
    ("#9 [stage-1  3/5] COPY --from=builder /out /out", BuildStep(3, 5, "COPY --from=builder /out /out", stage="stage-1")),
])
def test_step_lines_of_both_builders(line, step):
    assert parse_step(line) == step


@pytest.mark.parametrize("line", [
    " ---> Using cache",
    " ---> Running in 0123456789ab",
    "Sending build context to Docker daemon  12.8kB",
    "Successfully built 9f8e7d6c5b4a",
    "#1 [internal] load build definition from Dockerfile",
    "#4 [auth] library/node:pull token for registry-1.docker.io",
    "#8 0.512 Step 1/2 : printed by a RUN, not a step of this build",
    "#8 DONE 41.3s",
    "#8 CACHED",
    "npm notice Step 5/12 : a package's own output",
    "",
])
def test_other_lines_are_not_steps(line):
    assert parse_step(line) is None


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0.04, 1.26, 48.7, 60, 184.2)] == ["0.0 s", "1.3 s", "48 s", "1 m 00 s", "3 m 04 s"]


def _feed(progress: BuildProgress, output: str) -> None:
    with progress:
        for line in output.splitlines():
            progress.line(line)


@pytest.mark.parametrize("output", [CLASSIC_BUILD, BUILDKIT_BUILD])
def test_without_a_terminal_each_step_is_one_plain_line_as_it_starts(output):
    stream = io.StringIO()
    _feed(BuildProgress(stream, tty=False), output)
    assert "\r" not in stream.getvalue()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "  step 2/3: RUN npm install -g @anthropic-ai/claude-code"
    # One line per step: BuildKit printing a step's header again adds none.
    assert len(lines) == (3 if output is CLASSIC_BUILD else 4)
    assert all(line.startswith("  step ") for line in lines)


def test_a_plain_line_is_cut_and_a_step_of_a_named_stage_says_which():
    stream = io.StringIO()
    _feed(BuildProgress(stream, tty=False), "#9 [builder 1/2] RUN " + "x" * 500)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("  step 1/2 (builder): RUN xxx") and line.endswith("…") and len(line) == 2 + 160


def test_on_a_terminal_one_line_is_redrawn_with_the_step_s_time_and_cleared_to_the_width():
    stream, clock = io.StringIO(), Clock()
    progress = BuildProgress(stream, tty=True, width=lambda: 72, clock=clock, tick_seconds=3600)
    with progress:
        progress.line("Step 1/2 : FROM node:20-slim")
        clock.now += 3
        progress.line(" ---> 1a2b3c4d5e6f")               # any output redraws the time
        progress.line("Step 2/2 : RUN npm install -g @anthropic-ai/claude-code")
        clock.now += 48
        progress.refresh()                                 # what the ticker does while the RUN is quiet
        before_exit = stream.getvalue()
    assert "\n" not in before_exit and stream.getvalue() == before_exit + "\n"
    frames = before_exit.split("\r")[1:]
    assert all(len(frame) == 71 for frame in frames)      # cleared to the width, short of the last column
    assert [frame.rstrip() for frame in frames] == [
        "  step 1/2: FROM node:20-slim  0.0 s",
        "  step 1/2: FROM node:20-slim  3.0 s",
        "  step 2/2: RUN npm install -g @anthropic-ai/claude-code  0.0 s",     # a new step: its own time
        "  step 2/2: RUN npm install -g @anthropic-ai/claude-code  48 s",
    ]


def test_a_long_step_is_cut_on_a_terminal_and_the_time_stays_visible():
    stream = io.StringIO()
    progress = BuildProgress(stream, tty=True, width=lambda: 40, clock=Clock(), tick_seconds=3600)
    with progress:
        progress.line("Step 2/2 : RUN apt-get update && apt-get install -y curl git ca-certificates")
    frame = stream.getvalue().split("\r")[-1].rstrip("\n")
    assert len(frame) == 39 and frame.endswith("…  0.0 s") and frame.startswith("  step 2/2: RUN apt-get")


def test_the_terminal_line_shows_life_before_the_first_step_and_redraws_only_what_changed():
    stream, clock = io.StringIO(), Clock()
    progress = BuildProgress(stream, tty=True, width=lambda: 60, clock=clock, tick_seconds=3600)
    with progress:
        progress.refresh()
        progress.refresh()                                 # nothing changed: nothing written
        clock.now += 2
        progress.line("Sending build context to Docker daemon  12.8kB")
    frames = stream.getvalue().rstrip("\n").split("\r")[1:]
    assert [frame.rstrip() for frame in frames] == ["  preparing the build  0.0 s", "  preparing the build  2.0 s"]


class Drawn(io.StringIO):
    """A stream that says when something was drawn on it."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn = threading.Event()

    def write(self, text: str) -> int:
        self.drawn.set()
        return super().write(text)


def test_on_a_terminal_a_ticker_redraws_while_the_build_is_quiet_and_is_joined_at_the_end():
    stream = Drawn()
    with BuildProgress(stream, tty=True, tick_seconds=0.01):
        assert stream.drawn.wait(30), "the ticker never drew"
        assert any(t.name == "build-progress" for t in threading.enumerate())
    assert not any(t.name == "build-progress" for t in threading.enumerate())


def test_without_a_terminal_there_is_no_ticker():
    with BuildProgress(io.StringIO(), tty=False, tick_seconds=0.01):
        assert not any(t.name == "build-progress" for t in threading.enumerate())


def test_a_stream_that_is_no_terminal_or_cannot_say_gets_plain_lines():
    assert BuildProgress.on(io.StringIO()).tty is False
    assert BuildProgress.on(object()).tty is False


def test_build_image_shows_the_steps_and_still_keeps_the_output_for_its_error(tmp_path, monkeypatch, capsys):
    image, s = _image(tmp_path)
    images.stage_build_trust(s)
    runner = FakeRunner({("docker", "build"): (1, CLASSIC_BUILD + "npm error 404 Not Found\n", "returned a non-zero code: 1\n")})
    monkeypatch.setattr(common, "_run", common.Run(s, common.Docker(runner=runner)))
    with pytest.raises(images.CommandError) as failed:
        images.build_image(image, s)
    shown = capsys.readouterr().out.splitlines()
    assert [line for line in shown if line.startswith("  step ")] == [
        "  step 1/3: FROM node:20-slim",
        "  step 2/3: RUN npm install -g @anthropic-ai/claude-code",
        "  step 3/3: CMD [\"claude\"]",
    ]
    assert "npm error 404 Not Found" in str(failed.value)
