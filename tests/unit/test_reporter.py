"""The reporter (bottle_tasks/reporter.py): doit's console output unchanged, failures included, plus
one line with the time each stage took and which were up to date; fed the events doit's runner
sends, and through a real in-process doit run."""

from __future__ import annotations

import io

import pytest
from doit.doit_cmd import reset_vars
from doit.exceptions import TaskFailed, UnmetDependency
from doit.reporter import ConsoleReporter
from doit.task import Stream, Task

from bottle_tasks.cli import main
from bottle_tasks.settings import ROOT
from bottle_tasks.reporter import HANDS_OVER, BottleReporter, summary_line
from bottle_tasks.tasks import DOIT_CONFIG


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stage(name: str, **extra) -> Task:
    return Task(name, [lambda: None], **extra)


def play(reporter, events) -> str:
    """Send events as doit's Runner does. Each is (kind, task, arg): "run" (arg: the seconds it
    takes on the reporter's clock), "run-actions" (the same, and the task's actions really run),
    "uptodate", or "unmet" (arg: the failure doit reports before the task runs)."""
    for kind, task, *arg in events:
        reporter.get_status(task)
        if kind == "uptodate":
            reporter.skip_uptodate(task)
        elif kind == "unmet":
            reporter.add_failure(task, arg[0])
        else:
            reporter.execute_task(task)
            failure = task.execute(Stream(0)) if kind == "run-actions" else None
            if isinstance(reporter, BottleReporter):
                reporter._clock.now += arg[0]
            reporter.add_failure(task, failure) if failure else reporter.add_success(task)
    reporter.complete_run()
    return reporter.outstream.getvalue()


def bottle_reporter(**options) -> BottleReporter:
    return BottleReporter(io.StringIO(), options, clock=Clock())


def test_a_bring_up_ends_with_each_stage_s_time_and_the_stages_that_were_up_to_date():
    out = play(bottle_reporter(), [
        ("run", stage("preflight:example"), 0.3),
        ("run", stage("build_trust"), 0.04),
        ("uptodate", stage("image_build:example")),
        ("uptodate", stage("bundle_build")),
        ("run", stage("bundle:example"), 1.2),
        ("run", stage("guest:example"), 0.9),
        ("run", stage("provision:example"), 184),
    ])
    assert out.splitlines() == [
        ".  preflight:example", ".  build_trust", "-- image_build:example", "-- bundle_build",
        ".  bundle:example", ".  guest:example", ".  provision:example",
        "stages (example): preflight 0.3 s · build_trust 0.0 s · bundle 1.2 s · guest 0.9 s · provision 3 m 04 s"
        " · up to date: image_build, bundle_build",
    ]


def test_the_summary_comes_before_the_agent_takes_the_terminal_and_only_once():
    start = stage("start", meta={HANDS_OVER: True})
    out = play(bottle_reporter(), [
        ("uptodate", stage("guest:example")),
        ("run", stage("provision:example"), 0.4),
        ("run", start, 3600),                              # the agent's session: not a stage
    ])
    assert out.splitlines() == ["-- guest:example", ".  provision:example",
                                "stages (example): provision 0.4 s · up to date: guest", ".  start"]


def test_stages_of_several_agents_keep_their_names():
    assert summary_line([("guest:a", "1.0 s"), ("guest:b", "up to date"), ("bundle_build", "2.0 s")]) == \
        "stages: guest:a 1.0 s · bundle_build 2.0 s · up to date: guest:b"


@pytest.mark.parametrize("events", [
    [("run", stage("build_trust"), 0.1)],                                  # `doit build_trust`
    [("uptodate", stage("ca:example"))],
    [("run", stage("render:example"), 0.1), ("run", stage("start", meta={HANDS_OVER: True}), 5)],
    [("run", stage("_private"), 1), ("run", Task("group", None), 0), ("run", stage("approve"), 0.1)],
])
def test_a_run_of_one_stage_gets_no_summary(events):
    out = play(bottle_reporter(), events)
    assert "stages" not in out


def _failing_run() -> list:
    def fails():
        print("captured build output")
        return TaskFailed("bottle-x-guest: the fence did not come up; run doit clean agent=x")

    def errors():
        raise RuntimeError("a bug")

    return [
        ("uptodate", stage("render:example")),
        ("run", stage("bundle:example"), 1.5),
        ("run-actions", Task("guest:example", [fails], verbosity=1), 0.9),
        ("run-actions", Task("provision:example", [errors], verbosity=0), 0.1),
        ("unmet", stage("start", meta={HANDS_OVER: True}), UnmetDependency("guest:example")),
    ]


@pytest.mark.parametrize("failure_verbosity", [0, 1, 2])
def test_failures_are_reported_exactly_as_doit_s_console_reporter_does(failure_verbosity):
    ours = play(bottle_reporter(failure_verbosity=failure_verbosity), _failing_run())
    doits = play(ConsoleReporter(io.StringIO(), {"failure_verbosity": failure_verbosity}), _failing_run())
    summary = "stages (example): bundle 1.5 s · guest failed after 0.9 s · provision failed after 0.1 s · up to date: render\n"
    assert summary in ours and ours.replace(summary, "") == doits
    assert "TaskFailed - taskid:guest:example\nbottle-x-guest: the fence did not come up" in ours
    assert "TaskError - taskid:provision:example" in ours and "RuntimeError: a bug" in ours
    assert "captured build output" in ours
    # The summary comes before the failures' captured output, which stays last.
    assert ours.index(summary) < ours.index("#" * 40)


def test_a_stage_that_fails_before_it_runs_is_named_without_a_time():
    out = play(bottle_reporter(), [("run", stage("ca:example"), 0.1),
                                   ("unmet", stage("guest:example"), UnmetDependency("bundle:example"))])
    assert "stages (example): ca 0.1 s · guest failed\n" in out


def test_dodo_and_the_console_command_use_this_reporter():
    assert DOIT_CONFIG["reporter"] is BottleReporter
    import dodo

    assert dodo.DOIT_CONFIG["reporter"] is BottleReporter


# ---- a real doit run, in-process (tasks that need no docker) --------------------------------------

@pytest.fixture
def doit_run(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOTTLE_AGENTS_DIR", str(ROOT / "agents"))   # the checkout's example, from outside it
    monkeypatch.setenv("BOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)

    def doit(*args: str) -> tuple[int, str]:
        """Run `bottle ARGS`; the reporter's output (run's outfile is bound to sys.stdout when doit
        is imported, so it goes to a file here), else what the command printed."""
        reset_vars()
        report = tmp_path / "report.txt"
        report.unlink(missing_ok=True)
        outfile = ["-o", str(report)] if args[0] == "run" else []
        code = main([args[0], "--db-file", str(tmp_path / "doit.sqlite3"), *outfile, *args[1:]])
        printed = capsys.readouterr().out
        return code, report.read_text() if outfile else printed

    yield doit
    reset_vars()


def test_a_real_run_prints_the_summary_and_then_says_what_was_up_to_date(doit_run):
    code, out = doit_run("run", "render:example", "ca:example", "agent=example")
    assert code == 0 and ".  render:example" in out
    assert out.splitlines()[-1].startswith("stages (example): render ") and " · ca " in out
    code, out = doit_run("run", "render:example", "ca:example", "agent=example")
    assert code == 0 and out.splitlines() == ["-- render:example", "-- ca:example", "stages (example): up to date: render, ca"]
    # Users' CI may set verbosity or force every task: the summary stays.
    code, out = doit_run("run", "-v", "0", "-a", "render:example", "ca:example", "agent=example")
    assert code == 0 and out.splitlines()[-1].startswith("stages (example): render ") and "up to date" not in out


def test_a_real_failure_keeps_its_message_and_list_and_clean_print_no_summary(doit_run):
    code, out = doit_run("run", "ca:example", "preflight:example", "agent=example")
    assert code == 1
    assert "TaskFailed - taskid:preflight:example\nANTHROPIC_API_KEY is not set in the host environment" in out
    assert "stages (example): ca " in out and "preflight failed after " in out
    for command in (("list", "agent=example"), ("list", "--all", "--status", "ca:example", "agent=example"),
                    ("clean", "render:example", "agent=example"), ("info", "ca:example", "agent=example")):
        code, out = doit_run(*command)
        assert code in (0, None) and "stages" not in out, (command, out)   # doit clean returns None
