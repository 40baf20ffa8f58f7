"""Secret detection for egress and git-gate: the built-in floor (pipelock's client: pipelock_scan.py).

Both report *which pattern* matched and *where* (``url``, ``header:<name>``, ``body``),
never the matched text: the result goes into logs and block responses.
Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

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
    # Character offsets [start, end) of the match in the text that was scanned, when known: what
    # redaction replaces. Never the matched text itself, which must not reach a log.
    span: tuple[int, int] | None = field(default=None, compare=False)


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
