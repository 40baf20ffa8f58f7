#!/usr/bin/env python3
"""Claude Code PreToolUse hook: sensitive tool calls wait for a human on the host.

Runs inside the guest with the guest's python3 (standard library only; this file is copied
into the guest on its own, root-owned). Registered in Claude Code's managed settings
(bottle_tasks/templates/claude-managed-settings.json.j2) as a PreToolUse command hook that nothing the agent
writes can influence: an empty environment, the root-owned interpreter, isolated, no site::

    /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 /usr/bin/python3 -I -S \
        /etc/claude-bottle/supervise_hook.py /etc/claude-bottle/supervise.json

Config (JSON)::

    {"url": "http://<bundle-ip>:8082",           # the supervise daemon in the bundle
     "patterns": ["Bash(git push:*)", "WebFetch"],
     "timeout_seconds": 300,                      # how long the human has (1..3600)
     "grace_seconds": 15}                         # optional: extra wait for a slow or restarting bundle

The hook reads the PreToolUse input on stdin (``tool_name``, ``tool_input``, ``session_id``,
``cwd``, ``hook_event_name``). A call matching no pattern exits 0 at once without output or
network. A matching call is posted to ``POST /v1/requests`` and the hook long-polls
``GET /v1/requests/<id>?wait=...`` (retrying when the connection fails, e.g. while the bundle
restarts) until ``timeout_seconds + grace_seconds`` after it started:

- approved: exit 0 with ``{"hookSpecificOutput": {"hookEventName": "PreToolUse",
  "permissionDecision": "allow", "permissionDecisionReason": ...}}`` on stdout;
- denied, expired, no answer by the deadline, or any failure (bad config, bad input, the
  daemon unreachable or refusing the request): exit 2 with the reason on stderr, which Claude
  Code shows to the model and which blocks the call. The hook fails closed.

Patterns (Claude Code permission-rule style):

- ``Tool`` -- tool_name equals Tool (``Bash``, ``WebFetch``, ``mcp__github__create_pr``);
  ``mcp__server`` also matches every tool of that MCP server; ``*`` matches every tool.
- ``Bash(prefix:*)`` -- a Bash command starting with prefix (``Bash(git push:*)``).
- ``Bash(glob)`` with ``*`` -- fnmatch on the command (``Bash(git push * --force)``).
- ``Bash(exact)`` -- the command is exactly that.
  Bash commands are checked whole and per segment: the command is split at ``&&``, ``||``,
  ``;``, ``|``, ``&``, newlines, ``$(``, backticks and parentheses; each segment is stripped of
  leading ``VAR=value`` assignments and wrappers (``sudo``, ``env``, ``command``, ``exec``,
  ``nohup``, ``time``, ``nice``, ``builtin``); whitespace is collapsed; a first word that is a
  path (``/usr/bin/git``) is also tried as its basename. So ``cd repo && git push`` matches
  ``Bash(git push:*)``. This is a best-effort net, not a shell parser: ``bash -c "..."``,
  ``eval``, variables or ``git -C dir push`` are not seen through.
- ``WebFetch(domain:example.com)`` -- a WebFetch whose URL host is example.com;
  ``domain:*.example.com`` matches its subdomains.
- ``Read|Edit|Write|MultiEdit|NotebookEdit(glob)`` -- fnmatch on the file path (``*`` crosses
  ``/``): absolute globs, ``~/`` globs, and relative globs (matched against the path relative to
  ``cwd`` and as a path suffix).

The hook talks to the bundle directly: HTTP(S)_PROXY is ignored (the guest's proxy is egress,
which must not see this traffic).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any, Callable, Mapping, Sequence

DEFAULT_CONFIG = "/etc/claude-bottle/supervise.json"  # root-owned (provision.py); never the agent's home
DEFAULT_TIMEOUT_S = 300
DEFAULT_GRACE_S = 15.0
MAX_WAIT_S = 60
MAX_SUMMARY_CHARS = 2000
MAX_INPUT_JSON_CHARS = 48 * 1024  # the daemon takes 64 KiB bodies; bigger inputs are sent truncated
RETRY_MIN_S = 0.25
RETRY_MAX_S = 2.0
EXIT_BLOCK = 2
PREFIX = "claude-bottle supervise"

BASH_WRAPPERS = frozenset({"sudo", "env", "command", "exec", "nohup", "time", "nice", "builtin"})
PATH_TOOLS = {"Read": "file_path", "Edit": "file_path", "Write": "file_path", "MultiEdit": "file_path",
              "NotebookEdit": "notebook_path"}
_SEGMENT_SPLIT = re.compile(r"&&|\|\||\$\(|[;&|\n`()]")
_ASSIGNMENT = re.compile(r"""^[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|"[^"]*"|\S*)(?:\s+|$)""")
_PATTERN = re.compile(r"^(?P<tool>[A-Za-z*][A-Za-z0-9_*-]*)(?:\((?P<spec>.*)\))?$", re.S)


class HookError(Exception):
    """Anything that stops the hook from getting a decision; the call is blocked with it."""


# --------------------------------------------------------------------------- patterns


def bash_segments(command: str) -> list[str]:
    """The whole command and each simple command in it, normalised (see module docstring)."""
    candidates = [command, *_SEGMENT_SPLIT.split(command)]
    segments: list[str] = []
    for candidate in candidates:
        text = candidate.strip()
        while True:
            stripped = _ASSIGNMENT.sub("", text, count=1).lstrip()
            words = stripped.split(None, 1)
            if words and words[0] in BASH_WRAPPERS:
                stripped = words[1] if len(words) > 1 else ""
            if stripped == text:
                break
            text = stripped
        normalised = " ".join(text.split())
        if not normalised:
            continue
        segments.append(normalised)
        first, _, rest = normalised.partition(" ")
        if "/" in first and not first.endswith("/"):
            segments.append(" ".join(filter(None, (first.rsplit("/", 1)[1], rest))))
    return segments


def match_bash(spec: str, command: str) -> bool:
    segments = bash_segments(command)
    spec = spec.strip()
    if spec in ("", "*"):
        return True
    if spec.endswith(":*"):
        prefix = " ".join(spec[:-2].split())
        return any(segment.startswith(prefix) for segment in segments)
    wanted = " ".join(spec.split())
    if "*" in wanted:
        return any(fnmatch.fnmatchcase(segment, wanted) for segment in segments)
    return any(segment == wanted for segment in segments)


def match_domain(spec: str, url: str) -> bool:
    domain = spec.split(":", 1)[1].strip().lower().rstrip(".")
    try:
        host = (urllib.parse.urlsplit(url.strip()).hostname or "").lower().rstrip(".")
    except ValueError:
        return True  # an unparseable URL is asked about rather than waved through
    if domain.startswith("*."):
        return host.endswith(domain[1:])
    return host == domain


def match_path(spec: str, path: str, cwd: str) -> bool:
    if not path:
        return False
    glob = os.path.expanduser(spec.strip()) if spec.strip().startswith("~") else spec.strip()
    absolute = os.path.normpath(os.path.join(cwd or "/", os.path.expanduser(path)))
    if glob.startswith("/"):
        return fnmatch.fnmatchcase(absolute, glob)
    relative = os.path.relpath(absolute, cwd) if cwd else absolute
    return (fnmatch.fnmatchcase(relative, glob) or fnmatch.fnmatchcase(absolute, "*/" + glob)
            or fnmatch.fnmatchcase(absolute, glob))


Matcher = Callable[[str, Mapping[str, Any], str], bool]


def compile_pattern(pattern: str) -> Matcher:
    """A predicate (tool_name, tool_input, cwd) -> bool. Raises HookError for a bad pattern."""
    if not isinstance(pattern, str):
        raise HookError(f"pattern {pattern!r} is not a string")
    found = _PATTERN.match(pattern.strip())
    if not found:
        raise HookError(f"pattern {pattern!r} is not Tool or Tool(spec)")
    tool, spec = found.group("tool"), found.group("spec")
    if spec is None:
        if tool == "*":
            return lambda name, _input, _cwd: True
        if tool.startswith("mcp__") and tool.count("__") == 1:
            return lambda name, _input, _cwd: name == tool or name.startswith(tool + "__")
        return lambda name, _input, _cwd: name == tool
    if tool == "Bash":
        return lambda name, tool_input, _cwd: name == "Bash" and match_bash(spec, str(tool_input.get("command", "")))
    if tool == "WebFetch":
        if spec.strip() in ("", "*"):
            return lambda name, _input, _cwd: name == "WebFetch"
        if not spec.startswith("domain:") or not spec[len("domain:"):].strip():
            raise HookError(f"pattern {pattern!r}: WebFetch takes (domain:host)")
        return lambda name, tool_input, _cwd: name == "WebFetch" and match_domain(spec, str(tool_input.get("url", "")))
    if tool in PATH_TOOLS:
        key = PATH_TOOLS[tool]
        return lambda name, tool_input, cwd: name == tool and match_path(spec, str(tool_input.get(key, "")), cwd)
    raise HookError(f"pattern {pattern!r}: a (spec) is only understood for Bash, WebFetch and "
                    f"{', '.join(PATH_TOOLS)}; use the bare tool name")


def matching_pattern(patterns: Sequence[str], tool_name: str, tool_input: Mapping[str, Any], cwd: str) -> str | None:
    for pattern in patterns:
        if compile_pattern(pattern)(tool_name, tool_input, cwd):
            return pattern
    return None


# --------------------------------------------------------------------------- config and input


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError as error:
        raise HookError(f"cannot read the hook config {path} ({error.strerror})") from None
    except ValueError:
        raise HookError(f"the hook config {path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise HookError(f"the hook config {path} must be a JSON object")
    url = config.get("url")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise HookError(f"{path}: url must be http://host:port")
    patterns = config.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(item, str) for item in patterns):
        raise HookError(f"{path}: patterns must be a list of strings")
    for pattern in patterns:
        compile_pattern(pattern)
    timeout = config.get("timeout_seconds", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 3600:
        raise HookError(f"{path}: timeout_seconds must be an integer from 1 to 3600")
    grace = config.get("grace_seconds", DEFAULT_GRACE_S)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 600:
        raise HookError(f"{path}: grace_seconds must be a number from 0 to 600")
    return {"url": url.rstrip("/"), "patterns": patterns, "timeout_seconds": timeout, "grace_seconds": float(grace)}


def summarize(tool_name: str, tool_input: Mapping[str, Any], cwd: str) -> str:
    if tool_name == "Bash":
        text = str(tool_input.get("command", ""))
        description = str(tool_input.get("description", "") or "")
        if description:
            text += f"  # {description}"
    elif tool_name == "WebFetch":
        text = str(tool_input.get("url", ""))
    elif tool_name in PATH_TOOLS:
        text = f"{tool_name} {tool_input.get(PATH_TOOLS[tool_name], '')}"
    else:
        text = f"{tool_name} {json.dumps(tool_input, ensure_ascii=False, sort_keys=True)}"
    if cwd:
        text += f"  (cwd {cwd})"
    return text if len(text) <= MAX_SUMMARY_CHARS else text[:MAX_SUMMARY_CHARS - 3] + "..."


def bounded_input(tool_input: Mapping[str, Any]) -> dict[str, Any]:
    encoded = json.dumps(tool_input, ensure_ascii=False)
    if len(encoded) <= MAX_INPUT_JSON_CHARS:
        return dict(tool_input)
    return {"_truncated": f"tool input was {len(encoded)} characters; the first {MAX_INPUT_JSON_CHARS} follow",
            "_preview": encoded[:MAX_INPUT_JSON_CHARS]}


# --------------------------------------------------------------------------- HTTP


def opener() -> urllib.request.OpenerDirector:
    """No proxy: the bundle is reached directly, whatever HTTP(S)_PROXY / NO_PROXY say."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Transient(Exception):
    """A failure worth retrying (connection refused or dropped, timeout, 5xx)."""


def call(http: urllib.request.OpenerDirector, method: str, url: str, body: Any = None,
         timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with http.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
        if status >= 500:
            raise Transient(f"HTTP {status}") from None
    except (urllib.error.URLError, OSError, ValueError, HTTPException) as error:
        # refused, reset, timed out, a bad status line, or a body cut short (the bundle restarting mid-answer)
        raise Transient(str(getattr(error, "reason", error)) or type(error).__name__) from None
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Transient(f"HTTP {status} with a body that is not JSON") from None
    return status, document if isinstance(document, dict) else {}


def ask(config: Mapping[str, Any], tool_name: str, tool_input: Mapping[str, Any], cwd: str,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Post the request and wait for its final status. Returns the GET answer, or a synthetic
    {"status": "timeout"} when the deadline passes first."""
    http = opener()
    deadline = clock() + config["timeout_seconds"] + config["grace_seconds"]
    body = {"tool": tool_name, "input": bounded_input(tool_input), "summary": summarize(tool_name, tool_input, cwd),
            "timeout_seconds": config["timeout_seconds"]}
    delay = RETRY_MIN_S
    last_error = ""
    request_id = None
    while request_id is None:
        try:
            status, answer = call(http, "POST", config["url"] + "/v1/requests", body,
                                  timeout=max(1.0, min(10.0, deadline - clock())))
        except Transient as error:
            last_error = str(error)
        else:
            if status == 429:
                raise HookError(f"too many tool calls are waiting for a human already "
                                f"({str(answer.get('error', ''))[:300]}); not asked again. Wait for the "
                                "user to decide the pending ones before retrying")
            if status != 201 or not isinstance(answer.get("id"), str):
                raise HookError(f"the approval service refused the request (HTTP {status}: "
                                f"{str(answer.get('error', answer))[:300]})")
            request_id = answer["id"]
            break
        if clock() + delay >= deadline:
            raise HookError(f"could not reach the approval service at {config['url']} ({last_error})")
        sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)

    poll_url = f"{config['url']}/v1/requests/{urllib.parse.quote(request_id, safe='')}"
    delay = RETRY_MIN_S
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return {"id": request_id, "status": "timeout", "error": last_error}
        wait = int(max(0, min(MAX_WAIT_S, remaining - 1)))
        try:
            status, answer = call(http, "GET", f"{poll_url}?wait={wait}", timeout=wait + 10)
        except Transient as error:
            last_error = str(error)
            sleep(min(delay, max(0.0, deadline - clock())))
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        delay = RETRY_MIN_S
        if status == 404:
            raise HookError(f"the approval service no longer knows request {request_id}")
        if status != 200:
            raise HookError(f"the approval service answered HTTP {status}: {str(answer.get('error', ''))[:300]}")
        if answer.get("status") in ("approved", "denied", "expired"):
            return answer
        if answer.get("status") != "pending":
            raise HookError(f"the approval service answered an unknown status {str(answer.get('status'))[:50]!r}")


# --------------------------------------------------------------------------- decisions to exit codes


def block(message: str) -> int:
    print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)
    return EXIT_BLOCK


def allow(reason: str) -> int:
    print(json.dumps({"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "allow",
                                             "permissionDecisionReason": reason}}), flush=True)
    return 0


def exit_for_decision(answer: Mapping[str, Any], tool_name: str, pattern: str, timeout_seconds: int) -> int:
    """Tell Claude Code what the human decided (``answer`` is the daemon's final status, or a
    synthetic timeout); returns the hook's exit code: 0 allows the call, EXIT_BLOCK blocks it."""
    status = answer.get("status")
    who = str(answer.get("by") or "a human")
    why = str(answer.get("reason") or "").strip()
    request_id = answer.get("id", "?")
    if status == "approved":
        return allow(f"{PREFIX}: approved by {who}" + (f": {why}" if why else "") + f" (request {request_id})")
    if status == "denied":
        return block(f"a human on the host ({who}) denied this {tool_name} call"
                     + (f": {why}" if why else " (no reason given)")
                     + f". Request {request_id}, rule {pattern}. Do not retry it unchanged; "
                       "ask the user how to proceed or take another approach.")
    if status == "expired":
        return block(f"no human approved this {tool_name} call within {timeout_seconds} s, so it was denied "
                     f"(request {request_id} timed out; rule {pattern}). Ask the user to watch for "
                     "supervise requests on the host before retrying.")
    return block(f"no decision arrived for this {tool_name} call within {timeout_seconds} s "
                 f"(request {request_id}; the approval service stopped answering"
                 + (f": {answer.get('error')}" if answer.get("error") else "")
                 + "), so it was blocked.")


def main(argv: Sequence[str] | None = None, stdin: Any = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = args[0] if args else DEFAULT_CONFIG
    try:
        event = json.load(stdin or sys.stdin)
    except ValueError:
        return block("the hook input on stdin is not JSON; the call was blocked")
    if not isinstance(event, dict):
        return block("the hook input on stdin is not a JSON object; the call was blocked")
    tool_name = event.get("tool_name")
    tool_input = event.get("tool_input")
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    cwd = str(event.get("cwd") or "")
    if not isinstance(tool_name, str):
        return block("the hook input has no tool_name; the call was blocked")
    try:
        config = load_config(config_path)
        pattern = matching_pattern(config["patterns"], tool_name, tool_input, cwd)
        if pattern is None:
            return 0
        answer = ask(config, tool_name, tool_input, cwd)
    except HookError as error:
        return block(f"{error}; the {tool_name} call was blocked")
    return exit_for_decision(answer, tool_name, pattern, config["timeout_seconds"])


if __name__ == "__main__":
    sys.exit(main())
