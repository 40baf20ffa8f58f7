"""doit's console reporter plus one line: how long each stage took, and which stages were up to date.

Everything ConsoleReporter prints stays as it is (`.  task`, `-- task`, failures, captured output),
so logs and greps keep working. The summary comes once, after the stages: before a task that hands
the terminal to the agent (a task whose meta has HANDS_OVER: start), else at the end of the run. A
run with fewer than two stages prints none: it would only repeat the one line above it. `doit list`,
`clean` and `info` use no reporter, so they never print it.
"""

from __future__ import annotations

import time
from typing import Callable

from doit.reporter import ConsoleReporter

from bottle_tasks.build_progress import duration

HANDS_OVER = "hands_over_terminal"   # task meta key: the task runs the agent attached; stages end before it


def hands_over(task) -> bool:
    return bool((task.meta or {}).get(HANDS_OVER))


def is_stage(task) -> bool:
    """A task with actions, not private (`_name`, which doit hides too), that is not the agent's own session."""
    return bool(task.actions) and not task.name.startswith("_") and not hands_over(task)


def summary_line(stages: list[tuple[str, str]]) -> str:
    """`stages (example): build_trust 0.1 s · bundle 1.2 s · up to date: image_build, guest`.

    stages: (task name, outcome) in the order they finished, where the outcome is a duration,
    "failed after <duration>", "failed" or "up to date". When every subtask is one agent's
    (`guest:example`), the agent is named once in front instead of after each stage."""
    agents = {name.partition(":")[2] for name, _ in stages if ":" in name}
    one_agent = next(iter(agents)) if len(agents) == 1 else ""
    short = [(name.removesuffix(f":{one_agent}") if one_agent else name, outcome) for name, outcome in stages]
    ran = [f"{name} {outcome}" for name, outcome in short if outcome != "up to date"]
    current = [name for name, outcome in short if outcome == "up to date"]
    parts = ran + ([f"up to date: {', '.join(current)}"] if current else [])
    return f"stages{f' ({one_agent})' if one_agent else ''}: " + " · ".join(parts)


class BottleReporter(ConsoleReporter):
    desc = "console output, then one line with the time each stage took"

    def __init__(self, outstream, options, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(outstream, options)
        self._clock = clock
        self._started: dict[str, float] = {}
        self._stages: list[tuple[str, str]] = []
        self._summarised = False

    def execute_task(self, task) -> None:
        if hands_over(task):
            self._summarise()
        super().execute_task(task)
        if is_stage(task):
            self._started[task.name] = self._clock()

    def add_success(self, task) -> None:
        super().add_success(task)
        self._finished(task, "")

    def add_failure(self, task, fail) -> None:
        super().add_failure(task, fail)
        self._finished(task, "failed")

    def skip_uptodate(self, task) -> None:
        super().skip_uptodate(task)
        if is_stage(task):
            self._stages.append((task.name, "up to date"))

    def complete_run(self) -> None:
        # Before the failures' captured output and doit's own errors, which stay the last lines.
        self._summarise()
        super().complete_run()

    def _finished(self, task, failed: str) -> None:
        if not is_stage(task):
            return
        started = self._started.pop(task.name, None)
        if started is None:          # failed before it ran (a dependency error): no time to tell
            self._stages.append((task.name, failed or "done"))
            return
        took = duration(self._clock() - started)
        self._stages.append((task.name, f"{failed} after {took}" if failed else took))

    def _summarise(self) -> None:
        if self._summarised:
            return
        self._summarised = True
        if len(self._stages) >= 2:
            self.write(summary_line(self._stages) + "\n")
            self.outstream.flush()     # before the agent's own output, also when stdout is a pipe
