"""Client for pipelock's scan API, used by egress and git-gate when pipelock runs in the bundle.

Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Iterable

from bottle_tasks.sidecars.dlp import DlpMatch, RequestParts


class DlpUnavailable(Exception):
    """The external scanner could not give a verdict; callers block (fail closed)."""


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
