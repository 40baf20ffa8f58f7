"""runner.run with on_line: each output line as the command writes it (real short subprocesses), the
Result still whole, failures and timeouts still reported, and no command left running behind."""

from __future__ import annotations

import sys
import textwrap

import pytest

from bottle_tasks.runner import CommandError, ToolMissing, run
from tests.unit.test_init import pid_alive

PY = sys.executable


def python(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def test_each_stream_s_lines_arrive_in_order_and_the_result_keeps_all():
    lines: list[str] = []
    result = run(python("""
        import sys
        print("one", flush=True)
        print("two", file=sys.stderr, flush=True)
        print("three", flush=True)
        sys.stdout.write("no newline at the end")
    """), on_line=lines.append)
    # Two pipes: their lines interleave as the reader finds them; within each, the order is kept.
    assert sorted(lines) == sorted(["one", "two", "three", "no newline at the end"])
    assert [line for line in lines if line != "two"] == ["one", "three", "no newline at the end"]
    assert result.ok and result.stdout == "one\nthree\nno newline at the end" and result.stderr == "two\n"


def test_a_line_is_handed_on_while_the_command_still_runs(tmp_path):
    """The command writes a line, then waits for a file that only the callback creates for that line:
    lines read after exit would never create it, and the command would run into the timeout."""
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        (tmp_path / line).touch()

    result = run(python(f"""
        import os, sys, time
        def after(line, stream):
            print(line, file=stream, flush=True)
            while not os.path.exists(os.path.join({str(tmp_path)!r}, line)):
                time.sleep(0.01)
        after("one", sys.stdout)
        after("two", sys.stderr)
        after("three", sys.stdout)
    """), on_line=on_line, timeout=60)
    assert seen == ["one", "two", "three"]
    assert result.stdout == "one\nthree\n" and result.stderr == "two\n"


def test_a_command_that_fills_both_pipes_does_not_deadlock():
    result = run(python("""
        import sys
        for i in range(2000):
            print("o" * 200)
            print("e" * 200, file=sys.stderr)
    """), on_line=lambda line: None, timeout=60)
    assert result.stdout.count("\n") == 2000 and result.stderr.count("\n") == 2000


def test_newlines_are_translated_as_in_text_mode_and_utf8_split_across_writes_is_one_character():
    lines: list[str] = []
    result = run(python("""
        import sys
        out = sys.stdout.buffer
        for chunk in (b"a\\r", b"\\nb\\r", b"c\\n", "é".encode()[:1]):
            out.write(chunk); out.flush()
        out.write("é".encode()[1:] + b"\\n"); out.flush()
    """), on_line=lines.append)
    assert lines == ["a", "b", "c", "é"] and result.stdout == "a\nb\nc\né\n"


def test_a_failing_command_keeps_its_output_and_raises_when_checked():
    failing = python("""
        import sys
        print("step output", flush=True)
        print("the reason", file=sys.stderr)
        sys.exit(3)
    """)
    lines: list[str] = []
    result = run(failing, check=False, on_line=lines.append)
    assert (result.returncode, result.stdout, result.stderr) == (3, "step output\n", "the reason\n")
    assert lines == ["step output", "the reason"]
    with pytest.raises(CommandError, match="exit 3") as failed:
        run(failing, on_line=lambda line: None)
    assert failed.value.returncode == 3 and "the reason" in str(failed.value)


def test_a_command_past_its_timeout_is_killed_and_the_error_keeps_its_output():
    lines: list[str] = []
    with pytest.raises(CommandError, match="timed out after 1s") as failed:
        run(python("""
            import os, time
            print(os.getpid(), flush=True)
            print("still working", flush=True)
            time.sleep(120)
        """), on_line=lines.append, timeout=1)
    assert "still working" in str(failed.value) and failed.value.returncode == -1
    assert not pid_alive(int(lines[0]))


def test_an_error_in_the_callback_stops_the_command_too():
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))
        raise RuntimeError("the caller gave up")

    with pytest.raises(RuntimeError, match="the caller gave up"):
        run(python("""
            import os, time
            print(os.getpid(), flush=True)
            time.sleep(120)
        """), on_line=on_line, timeout=60)
    assert not pid_alive(pids[0])


def test_input_and_env_reach_the_command_and_never_its_argv():
    lines: list[str] = []
    argv = python("""
        import os, sys
        print(sys.stdin.read().upper())
        print(os.environ["BOTTLE_TEST_SECRET"])
    """)
    result = run(argv, input="from stdin " * 10000, env={"BOTTLE_TEST_SECRET": "s3cret"}, on_line=lines.append)
    assert lines[0] == "FROM STDIN " * 10000 and lines[1] == "s3cret"
    assert "s3cret" not in " ".join(result.argv)


def test_a_missing_tool_is_named_and_on_line_needs_the_output():
    with pytest.raises(ToolMissing, match="no-such-tool-here is not installed"):
        run(["no-such-tool-here", "build"], on_line=lambda line: None)
    with pytest.raises(ValueError, match="capture"):
        run([PY, "-c", "pass"], capture=False, on_line=lambda line: None)
