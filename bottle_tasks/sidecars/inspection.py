"""What egress does with content: DLP on requests (with the route's block, redact or log action),
prompt-injection scans of responses, and both for WebSocket messages.

Everything here that scans is blocking work (regexes, decoding, pipelock's scan API): egress calls
it from a worker thread (``asyncio.to_thread``), except ``SseInjectionFilter``, which mitmproxy
calls synchronously for a streamed response (see its docstring).

A request is scanned as sent, before any token is filled: the floor (dlp.py) on the URL, every
header name and value, the trailers and the body window by window, and pipelock (when it runs) on
the same parts. What a match then does is the route's ``dlp``:

- ``block``: the request never leaves (403 dlp_match).
- ``log``: it leaves as sent; the match is logged (pattern and place, never the text).
- ``redact``: it leaves with each match replaced by ``[REDACTED:<pattern>]``: the body is decoded
  whole (within max_body_bytes), redacted by the floor (JSON through its strings, so the result
  is the same document), then by pipelock's evidence spans, and sent uncompressed; a header whose
  *name* carries a secret is dropped. The redacted request is scanned again, floor and pipelock,
  and is refused unless that scan is clean: a match that cannot be cut out (one only visible
  once two fields are joined, a binary body) still blocks. The model API defaults to redact: its
  requests carry the whole conversation, so a secret the agent once read would otherwise block
  every later turn and end the session.

Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Callable

from bottle_tasks.contract import Route
from bottle_tasks.sidecars import bodies, dlp
from bottle_tasks.sidecars.pipelock_scan import DlpUnavailable, PipelockClient

# Response bodies are scanned for prompt injection up to this many decoded bytes; a larger textual
# response is refused on a route whose responses action is block (it could hide anything). pipelock
# spends 8 to 16 s of CPU per million characters here (docs/bundle-contract.md, "pipelock").
RESPONSE_SCAN_LIMIT = 2 << 20
# A server-sent event is scanned once complete; one that grows past this is scanned as it stands.
SSE_EVENT_LIMIT = 64 << 10
# Content types never scanned for injection: media and archives, whose text would only be noise.
_UNSCANNED_TYPES = ("image/", "audio/", "video/", "font/", "application/octet-stream", "application/gzip",
                    "application/x-gzip", "application/zip", "application/x-tar", "application/wasm",
                    "application/zstd", "application/x-xz", "application/x-bzip2")


@dataclass(frozen=True)
class Block:
    """Why egress refuses a request or response: its reason code, detail and HTTP status."""

    reason: str
    detail: str
    status: int = 403
    pattern: str = ""
    where: str = ""
    log_host: str = ""  # what the log names as the host, when the host itself must not be logged
    size: int | None = None  # body_too_large: the size seen, for the advice on max_body_bytes


@dataclass(frozen=True)
class RequestVerdict:
    """What egress does with one request: ``action`` is "pass" (nothing found), "log" (send it as
    sent), "redact" (send the parts below instead) or "block" (``refusal`` says why). ``found``:
    the matches in the request as sent."""

    action: str = "pass"
    found: tuple[dlp.DlpMatch, ...] = ()
    refusal: Block | None = None
    # redact: the parts to send instead (None: that part unchanged)
    path: str | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    trailers: tuple[tuple[str, str], ...] | None = None
    body: bytes | None = None                   # decoded, to be sent without Content-Encoding
    redacted: tuple[dlp.DlpMatch, ...] = ()


@dataclass(frozen=True)
class OutgoingRequest:
    """A request as the guest sent it; what DLP reads. path includes the query."""

    host: str
    path: str
    headers: tuple[tuple[str, str], ...]
    trailers: tuple[tuple[str, str], ...]
    raw_body: bytes
    content_encoding: str
    content_type: str

    def head(self) -> dlp.RequestParts:
        return dlp.RequestParts(url=f"{self.host}{self.path}", headers=self.headers + self.trailers, body="")


class Inspector:
    """DLP and injection scans for egress; ``pipelock`` None means the floor alone."""

    def __init__(self, pipelock: PipelockClient | None):
        self.pipelock = pipelock

    # -- requests -----------------------------------------------------------------------------

    def inspect_request(self, request: OutgoingRequest, route: Route) -> RequestVerdict:
        try:
            found = self._find(request, route.max_body_bytes)
            if not found:
                return RequestVerdict()
            if route.dlp == "log":
                return RequestVerdict(action="log", found=tuple(found))
            if route.dlp == "redact":
                return self._redact(request, route, found)
        except bodies.BodyRefused as refused:
            return _blocked(Block(refused.reason, refused.detail, refused.status))
        except DlpUnavailable as exc:
            return _blocked(Block("dlp_unavailable", str(exc)))
        return _blocked(_match_refusal(found[0]), found)

    def _find(self, request: OutgoingRequest, limit: int) -> list[dlp.DlpMatch]:
        """The floor on URL, headers and trailers, then on each body window; each window also goes to
        pipelock (URL and headers with the first, alone when there is no body)."""
        head = request.head()
        found = dlp.scan_request(head)
        if found:
            return found
        unsent = [head]

        def scan_window(text: str) -> list[dlp.DlpMatch] | None:
            matches = dlp.scan_text(text, "body")
            if not matches and self.pipelock is not None:
                parts = unsent.pop() if unsent else dlp.RequestParts(url="", headers=(), body="")
                matches = self.pipelock.scan(replace(parts, body=text), locate=False)
            return matches or None

        found = bodies.scan_body(request.raw_body, request.content_encoding, limit, scan_window,
                                 content_type=request.content_type) or []
        if not found and unsent and self.pipelock is not None:
            found = self.pipelock.scan(head, locate=False)
        return found

    def _redact(self, request: OutgoingRequest, route: Route, found: list[dlp.DlpMatch]) -> RequestVerdict:
        redacted: list[dlp.DlpMatch] = []

        def cut(text: str, content_type: str) -> str | None:
            result = dlp.redact_body(text, content_type)
            redacted.extend(result.redacted)
            return None if result.unredactable else result.text

        path = cut(request.path, "text/plain")
        headers = _redact_fields(request.headers, cut, redacted)
        trailers = _redact_fields(request.trailers, cut, redacted)
        body_text = _whole_text(request, route.max_body_bytes)
        body = None if body_text is None else cut(body_text, request.content_type)
        if path is None or headers is None or trailers is None or body is None:
            return _blocked(_unredactable(found[0]), found)
        if self.pipelock is not None:
            body = self._cut_pipelock_spans(request, path, headers + trailers, body, redacted)
            if body is None:
                return _blocked(_unredactable(found[0]), found)
        after = replace(request, path=path, headers=headers, trailers=trailers, raw_body=body.encode(),
                        content_encoding="")
        left = self._find(after, route.max_body_bytes)
        if left:
            return _blocked(_unredactable(left[0]), found)
        return RequestVerdict(action="redact", found=tuple(found), path=path, headers=headers, trailers=trailers,
                              body=body.encode() if request.raw_body else None, redacted=tuple(redacted))

    def _cut_pipelock_spans(self, request: OutgoingRequest, path: str, headers: tuple[tuple[str, str], ...],
                            body: str, redacted: list[dlp.DlpMatch]) -> str | None:
        """body with pipelock's body findings cut out by their spans; None when a finding has no
        span, is outside the body, or cutting it would break a JSON body."""
        matches = self.pipelock.scan(dlp.RequestParts(url=f"{request.host}{path}", headers=headers, body=body),
                                     locate=True)
        if not matches:
            return body
        if any(m.span is None or m.where != "body" for m in matches):
            return None
        for match in sorted(matches, key=lambda m: m.span[0], reverse=True):
            start, end = match.span
            body = body[:start] + f"[REDACTED:{_marker_name(match.pattern)}]" + body[end:]
            redacted.append(match)
        if _is_json(request.content_type) and not _parses_as_json(body):
            return None
        return body

    # -- responses ----------------------------------------------------------------------------

    def scans_responses(self, route: Route | None, content_type: str) -> bool:
        """Whether a response of this type on this route is scanned for prompt injection."""
        if self.pipelock is None or route is None or route.responses == "off":
            return False
        kind = content_type.split(";", 1)[0].strip().lower()
        return not kind.startswith(_UNSCANNED_TYPES)

    def injection_in(self, text: str) -> list[dlp.DlpMatch]:
        """pipelock's prompt-injection findings in text. Raises DlpUnavailable."""
        assert self.pipelock is not None
        return self.pipelock.scan_injection(text)

    # -- WebSocket ----------------------------------------------------------------------------

    def inspect_message_to_server(self, text: str, route: Route) -> tuple[list[dlp.DlpMatch], str | None]:
        """(matches, text to send instead): None as the text means drop the message (block, or a
        redaction that did not come out clean). Raises DlpUnavailable."""
        matches = dlp.scan_text(text, "websocket")
        if not matches and self.pipelock is not None:
            matches = [replace(m, where="websocket") for m in
                       self.pipelock.scan(dlp.RequestParts(url="", headers=(), body=text), locate=False)]
        if not matches or route.dlp == "log":
            return matches, text
        if route.dlp == "block":
            return matches, None
        result = dlp.redact_body(text, "application/json" if _parses_as_json(text) else "text/plain")
        if result.unredactable or dlp.scan_text(result.text, "websocket"):
            return matches, None
        if self.pipelock is not None and self.pipelock.scan(dlp.RequestParts(url="", headers=(), body=result.text),
                                                            locate=False):
            return matches, None
        return matches, result.text


class SseInjectionFilter:
    """A response stream callable for text/event-stream on a scanned route: each complete event
    (up to SSE_EVENT_LIMIT) is scanned before it is passed on. mitmproxy calls stream callables on
    its event loop, so the scan blocks it for the length of one scan API call of one event (a few
    ms; ``scan`` should carry a short timeout). On a finding with action block, or when the scan
    fails, the event is replaced by a comment line naming the reason and the rest of the stream is
    dropped; with warn the event passes and ``report`` is told."""

    def __init__(self, scan: Callable[[str], list[dlp.DlpMatch]], action: str,
                 report: Callable[[str, list[dlp.DlpMatch]], None]):
        self._scan, self._action, self._report = scan, action, report
        self._pending = b""
        self._stopped = False

    def __call__(self, chunk: bytes) -> bytes:
        if self._stopped:
            return b""
        self._pending += chunk
        out = []
        while True:
            cut = _event_end(self._pending)
            if cut < 0 and (len(self._pending) > SSE_EVENT_LIMIT or (not chunk and self._pending)):
                cut = len(self._pending)  # an oversized event, or the stream's end: scan what there is
            if cut < 0:
                break
            event, self._pending = self._pending[:cut], self._pending[cut:]
            passed = self._event(event)
            if passed is None:
                self._stopped = True
                self._pending = b""
                out.append(b": claude-bottle egress stopped this stream: response_injection\n\n")
                break
            out.append(passed)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        try:
            matches = self._scan(event.decode("utf-8", errors="replace"))
        except DlpUnavailable:
            self._report("dlp_unavailable", [])
            return None
        if not matches:
            return event
        self._report("response_injection", matches)
        return event if self._action == "warn" else None


def _event_end(data: bytes) -> int:
    """Index just past the first complete SSE event (blank line), -1 if none."""
    ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := data.find(sep)) >= 0]
    return min(ends) if ends else -1


def _redact_fields(fields: tuple[tuple[str, str], ...], cut: Callable[[str, str], str | None],
                   redacted: list[dlp.DlpMatch]) -> tuple[tuple[str, str], ...] | None:
    """Header values redacted; a header whose name carries a secret is dropped. None: unredactable."""
    kept = []
    for name, value in fields:
        in_name = dlp.scan_text(name, "header-name")
        if in_name:
            redacted.extend(in_name)
            continue
        new_value = cut(value, "text/plain")
        if new_value is None:
            return None
        kept.append((name, new_value))
    return tuple(kept)


def _whole_text(request: OutgoingRequest, limit: int) -> str | None:
    """The decoded body as text; None when it is not UTF-8 (a binary body cannot be redacted)."""
    data = b"".join(bodies.decoded_pieces(request.raw_body, request.content_encoding, limit))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _blocked(refusal: Block, found: list[dlp.DlpMatch] = ()) -> RequestVerdict:
    return RequestVerdict(action="block", found=tuple(found), refusal=refusal)


def _match_refusal(match: dlp.DlpMatch) -> Block:
    return Block("dlp_match", f"pattern {match.pattern} in {match.where}", pattern=match.pattern, where=match.where)


def _unredactable(match: dlp.DlpMatch) -> Block:
    return Block("dlp_match", f"pattern {match.pattern} in {match.where}, which redaction could not cut out",
                   pattern=match.pattern, where=match.where)


def _marker_name(pattern: str) -> str:
    """A pattern name fit for a [REDACTED:...] marker (pipelock's rule ids have spaces)."""
    return "".join(c if c.isalnum() or c in "_-:." else "_" for c in pattern).strip("_") or "secret"


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
