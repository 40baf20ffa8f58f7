"""Secret detection for egress: a small built-in scanner plus a client for pipelock's scan API.

Both report *which pattern* matched and *where* (``url``, ``header:<name>``, ``body``),
never the matched text: the result goes into logs and block responses.
Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterable

# Patterns are kept specific (prefixes that real providers use) so ordinary traffic does not trip
# them; each needs enough trailing entropy that a placeholder such as "sk-ant-placeholder" does not.
BUILTIN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("aws_access_key_id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    (
        "aws_secret_access_key",
        re.compile(
            r"(?i)aws[_\-. ]?secret[_\-. ]?(?:access[_\-. ]?)?key[\"'\s]*[:=]\s*[\"']?"
            r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
        ),
    ),
    ("github_token", re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,255}")),
    ("github_pat", re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}")),
    ("anthropic_api_key", re.compile(r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{20,}")),
    ("openai_api_key", re.compile(r"(?<![A-Za-z0-9_-])sk-(?!ant-)(?:[A-Za-z0-9]+-)?[A-Za-z0-9_-]{20,}")),
    ("slack_token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}")),
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("google_api_key", re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])")),
)

# Where a match of a built-in pattern with no length bound inside it may begin in text that ends
# before the match does: aws_secret_access_key allows any run of quotes and spaces around "=",
# private_key any number of words in its BEGIN line. Every other pattern is found whole in a few
# hundred characters (its tail repeats, but a match needs only the first ones). A scan that cuts
# text into windows (bodies.WindowScanner) carries text from here into the next window.
OPEN_PREFIXES: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?i)aws[_\-. ]?secret[_\-. ]?(?:access[_\-. ]?)?key[\"'\s]*(?:[:=]\s*[\"']?[A-Za-z0-9/+]{0,40})?\Z"),
    re.compile(r"-----BEGIN [A-Z0-9 ]*-{0,4}\Z"),
)
_PARTIAL_ESCAPE = re.compile(r"%[0-9A-Fa-f]?\Z")

# Percent-decoding rounds: catches %41KIA... and double-encoded %2541KIA... without looping forever.
_MAX_DECODE_ROUNDS = 3


@dataclass(frozen=True)
class DlpMatch:
    pattern: str  # pattern name, e.g. "aws_access_key_id" or "pipelock:DLP-AWS Access Key"
    where: str  # "url", "header:<name>", "body", "request"


class DlpUnavailable(Exception):
    """The external scanner could not give a verdict; callers block (fail closed)."""


def decoded_views(text: str) -> list[str]:
    """text plus its distinct percent-decoded forms (``%xx`` and ``+``)."""
    views = [text]
    current = text
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in current and "+" not in current:
            break
        decoded = urllib.parse.unquote_plus(current, errors="replace")
        if decoded == current:
            break
        views.append(decoded)
        current = decoded
    return views


def matching_pattern_names(text: str) -> list[str]:
    """Names of the built-in patterns found in text or its URL-decoded forms (decoded once: a git
    diff can be megabytes)."""
    views = decoded_views(text)
    return [name for name, pattern in BUILTIN_PATTERNS if any(pattern.search(view) for view in views)]


def scan_text(text: str, where: str) -> list[DlpMatch]:
    """Built-in patterns over text and its URL-decoded forms; at most one match per pattern."""
    return [DlpMatch(name, where) for name in matching_pattern_names(text)]


def open_match_start(text: str) -> int:
    """The earliest index at which an OPEN_PREFIXES match runs to the end of text, len(text) if none.
    In a URL-decoded form positions do not map back, so a prefix found only there gives 0."""
    # A window can end inside an escape ("%2"); a decoded form keeps it literally, which would close the prefix.
    views = [_PARTIAL_ESCAPE.sub("", view) for view in decoded_views(text)[1:]]
    if any(prefix.search(view) for prefix in OPEN_PREFIXES for view in views):
        return 0
    return min((found.start() for prefix in OPEN_PREFIXES if (found := prefix.search(text))), default=len(text))


def redact(text: str) -> str:
    """text with every built-in match replaced by ``[REDACTED:<pattern>]`` (for log lines)."""
    for name, pattern in BUILTIN_PATTERNS:
        text = pattern.sub(f"[REDACTED:{name}]", text)
    return text


def body_text(body: bytes) -> str:
    # Secrets are ASCII; "replace" keeps ASCII runs of a binary body intact for the patterns.
    return body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class RequestParts:
    """What DLP sees of one request, before any token is filled."""

    url: str  # host + path + query, no scheme (pipelock would scan a full URL for SSRF)
    headers: tuple[tuple[str, str], ...]
    body: str

    def as_text(self) -> str:
        head = "\n".join(f"{name}: {value}" for name, value in self.headers)
        return f"{self.url}\n{head}\n\n{self.body}"


def scan_request(parts: RequestParts) -> list[DlpMatch]:
    matches = scan_text(parts.url, "url")
    for name, value in parts.headers:
        matches += scan_text(value, f"header:{name.lower()}")
    if parts.body:
        matches += scan_text(parts.body, "body")
    return matches


class PipelockScanner:
    """Client for pipelock's scan API (``scan_api`` in pipelock.yaml, pipelock >= 2.3).

    Assumed shape, read from pipelock's source (internal/scanapi/types.go, handler.go, scan.go);
    it could not be exercised against a real pipelock binary here:

        POST <pipelock_scan_url>                  e.g. http://127.0.0.1:8889/api/v1/scan
        Authorization: Bearer <token>             scan_api.auth.bearer_tokens (required by pipelock)
        Content-Type: application/json
        {"kind": "dlp", "input": {"text": "<text>"}}      (unknown fields are rejected)

        200 {"status": "completed", "decision": "allow" | "warn" | "deny",
             "kind": "dlp", "scan_id": "...", "engine_version": "...",
             "findings": [{"scanner": "dlp", "rule_id": "DLP-<pattern>", "severity": "...",
                           "message": "..."}]}
        4xx/5xx {"status": "error", "errors": [{"code": "...", "message": "...", "retryable": bool}]}

    One request is sent per egress request (URL + headers + body as one text, so pipelock's
    default 600 requests/minute budget is not spent three times); a body longer than
    ``chunk_chars`` is sent in overlapping chunks (pipelock's default ``input.text`` limit is 512 KB).

    Verdicts: ``allow`` and ``warn`` pass. ``deny`` blocks when any finding is a secret finding
    (``rule_id`` "DLP-*"/"CEE-*" or scanner "dlp"/"cross_request_fragment"), or when it has no
    findings at all. A ``deny`` whose findings are all about *URLs mentioned in the text*
    (scanner "url": SSRF, blocklist, entropy) is reported as advisory, not a block: the dlp kind
    scans every http(s) URL it finds in the text, so a prompt that mentions http://localhost
    would otherwise block the agent. Anything else (connection error, timeout, non-200, bad JSON,
    unknown decision) raises DlpUnavailable, and egress blocks with reason ``dlp_unavailable``.
    """

    def __init__(self, url: str, bearer_token: str = "", timeout: float = 10.0, chunk_chars: int = 100_000):
        self.url = url
        self.bearer_token = bearer_token
        self.timeout = timeout
        self.chunk_chars = chunk_chars

    def scan(self, parts: RequestParts) -> tuple[list[DlpMatch], list[str]]:
        """(blocking matches, advisory rule ids). Raises DlpUnavailable. Blocking I/O: run in a thread."""
        matches: list[DlpMatch] = []
        advisories: list[str] = []
        for chunk in _chunks(parts.as_text(), self.chunk_chars, overlap=512):
            chunk_matches, chunk_advisories = self._scan_text(chunk)
            matches += chunk_matches
            advisories += chunk_advisories
            if matches:
                break
        return matches, advisories

    def _scan_text(self, text: str) -> tuple[list[DlpMatch], list[str]]:
        payload = json.dumps({"kind": "dlp", "input": {"text": text}}, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.bearer_token:
            headers["Authorization"] = f"Bearer {self.bearer_token}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        # No proxy: the scan API is on the bundle's loopback, and HTTP(S)_PROXY must not divert it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read(4 << 20)
        except urllib.error.HTTPError as exc:
            raise DlpUnavailable(f"pipelock scan API answered HTTP {exc.code}{_error_code(exc)}") from None
        except (OSError, ValueError) as exc:
            raise DlpUnavailable(f"pipelock scan API unreachable: {type(exc).__name__}") from None
        if status != 200:
            raise DlpUnavailable(f"pipelock scan API answered HTTP {status}")
        try:
            verdict = json.loads(raw)
        except ValueError:
            raise DlpUnavailable("pipelock scan API answered with invalid JSON") from None
        return _interpret(verdict)


def _interpret(verdict: object) -> tuple[list[DlpMatch], list[str]]:
    if not isinstance(verdict, dict) or verdict.get("status") != "completed":
        raise DlpUnavailable("pipelock scan API did not complete the scan")
    decision = verdict.get("decision")
    if decision in ("allow", "warn"):
        return [], []
    if decision != "deny":
        raise DlpUnavailable("pipelock scan API gave an unknown decision")
    findings = verdict.get("findings") or []
    if not isinstance(findings, list):
        raise DlpUnavailable("pipelock scan API gave malformed findings")
    secret_rules: list[str] = []
    url_rules: list[str] = []
    for finding in findings:
        if not isinstance(finding, dict):
            continue
        rule = _safe_name(str(finding.get("rule_id") or finding.get("scanner") or "unknown"))
        scanner = str(finding.get("scanner") or "")
        if scanner == "url" and not rule.startswith("DLP-"):
            url_rules.append(rule)
        else:
            secret_rules.append(rule)
    if secret_rules or not url_rules:
        return [DlpMatch(f"pipelock:{secret_rules[0] if secret_rules else 'deny'}", "request")], []
    return [], url_rules


def _safe_name(rule: str) -> str:
    # Rule ids are pattern names, but they go into logs and headers: keep them tame.
    return re.sub(r"[^A-Za-z0-9_.:\- ]", "_", rule)[:80]


def _error_code(exc: urllib.error.HTTPError) -> str:
    try:
        errors = json.loads(exc.read(65536)).get("errors") or []
        return f" ({_safe_name(str(errors[0].get('code')))})" if errors else ""
    except (ValueError, AttributeError, IndexError, OSError):
        return ""


def _chunks(text: str, size: int, overlap: int) -> Iterable[str]:
    if len(text) <= size:
        yield text
        return
    step = size - min(overlap, size // 4)  # overlap: a secret straddling a cut is still whole once
    for start in range(0, len(text), step):
        yield text[start : start + size]
        if start + size >= len(text):
            return
