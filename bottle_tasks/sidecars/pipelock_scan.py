"""Client for pipelock's scan API (pipelock v2.3.0), used by egress and git-gate when pipelock runs in
the bundle (the built-in floor is dlp.py).

API::

    client = PipelockClient(url, bearer_token)
    client.scan(parts)          -> list[DlpMatch]   secrets in a request, before any token is filled
    client.scan_injection(text) -> list[DlpMatch]   prompt injection in a response body or a WebSocket message

Both raise DlpUnavailable whenever pipelock gives no verdict (unreachable, timeout, non-200, bad JSON,
a decision other than allow or deny): callers block (fail closed). Both block on I/O: run them off the
event loop. A DlpMatch names the rule (``pipelock:DLP-<pattern>`` or ``pipelock:INJ-<pattern>``) and
where it was found (``url``, ``header:<name>``, ``header-name`` for a match in a header's name,
which is not repeated, ``body``; ``request`` when only the URL and headers together show it), never
the matched text. A ``body`` finding of ``scan`` carries ``span``, the
``[start, end)`` of the match in characters of ``parts.body``, which egress can redact; ``span`` is
None when the match could not be located (more matches than it locates, see MAX_LOCATE_CALLS), and
the caller must then treat the body as a whole. ``scan_injection`` reads a JSON document as its
decoded strings (pipelock misses "\\u" escapes and, inside a JSON string, every line start) and
Unicode tag characters as the ASCII they hide; it stops at the first chunk with a finding and gives
no spans.

The wire, as v2.3.0 speaks it (internal/scanapi)::

    POST <url>   Authorization: Bearer <token>   (scan_api.auth.bearer_tokens in pipelock.yaml)
    {"kind": "dlp", "input": {"text": "..."}}  or  {"kind": "prompt_injection", "input": {"content": "..."}}
    200 {"status": "completed", "decision": "allow" | "deny", "findings": [{"scanner": "dlp",
         "rule_id": "DLP-AWS Access ID", "severity": ..., "message": ...}, ...]}
    4xx/5xx {"status": "error", "errors": [{"code": ..., "message": ..., "retryable": ...}]}

What the real binary does with a text, and how this client sends one (tests/unit/test_pipelock_real.py):

- Findings are always ``scanner: "dlp"`` (or ``prompt_injection``): the dlp kind does not scan URLs
  mentioned in the text. One rule is listed once per encoding it was found in (plaintext, and
  "subdomain" after pipelock drops the dots), so findings are deduplicated by rule. Evidence carries
  the encoding only, no offsets: spans come from bisecting the text (``_locate``).
- Before matching, pipelock deletes control characters, newlines included. Parts joined with "\\n"
  run together: a card number or key anchored by ``\\b`` at the end of the URL is lost in
  ``...1111Host:``. Parts are joined with SEPARATOR, which pipelock keeps: the spaces give every part
  its word boundaries, and the ";" stops ``\\s*`` from carrying a match across parts while giving the
  next part the start that "Credential in URL" expects. The body is never joined with the head.
- pipelock decodes base64, hex and base32 of the whole text, but within a longer text only of
  segments between "/", "=", "&", "?" and spaces. A header value that decodes whole is therefore sent
  alone too, as it would be seen on its own.
- Any finding in the joined URL and headers is attributed by scanning each part alone.

False positives, which the bottle cannot let block (a Messages API request carries the whole
conversation, so one false positive blocks every later turn):

- pipelock matches "AWS Access ID" case-insensitively, in its immutable core: random base64 holds
  such a string about once in 70,000 characters, so a screenshot in a Messages API body was blocked.
  A run of standard base64 of BLOB_MIN_CHARS or more (an image, an archive) is therefore not sent as
  text. pipelock gets, in its place, what it could hold of a key (its first KEPT_HEAD_CHARS, where a
  key written just before the data runs into it, and its single-case runs of KEPT_RUN_CHARS or
  more, where an upper- or lower-cased key would sit) and, as a separate input,
  the printable strings of its decoded bytes (a base64-encoded file is still read). A key written in
  mixed case inside such a run is not caught: random base64 looks exactly like it. The floor
  still reads the raw text.
- "Environment Variable Secret" matches the bottle's own placeholders (ANTHROPIC_API_KEY=
  bottle-placeholder-ANTHROPIC_API_KEY, where the agent printed its environment): in a body, the
  placeholder prefix is hidden from pipelock. A header's placeholder matches no rule and stays.
- Known documentation keys (AKIAIOSFODNN7EXAMPLE, ...) are hidden from pipelock: they are never live.
- "Credential in URL" (``password=...`` at the start of a text or after ?, & or ;) is kept for URLs and
  headers, where it means a credential in a query or cookie, and dropped for bodies, which carry code
  (``x = 1; token = read()``) and form fields the agent fills in.

Every hidden stretch is replaced by text of the same length, so positions in what pipelock sees are
positions in the body. Stdlib only: this runs inside the bundle image.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Iterator

from bottle_tasks.contract import PLACEHOLDER_PREFIX
from bottle_tasks.sidecars.dlp import DlpMatch, RequestParts, is_documentation_example, is_template_value

# Sizes measured against v2.3.0 (docs/bundle-contract.md, "pipelock"): a dlp or prompt_injection scan
# of 32 Ki characters took at most 1.8 s in the worst case, hex text with four scans at once on a
# loaded 2-core machine, against the 10 s scan timeout of bottle_tasks/templates/pipelock.yaml.j2. UTF-8 and JSON
# escapes keep such a chunk far below the API's 512 KiB field and 1 MiB body limits.
CHUNK_CHARS = 32 * 1024
CHUNK_OVERLAP = 512          # longer than any bounded match, so a match cut by a chunk edge is whole in the next
# Longer than scan_api.timeouts.write (15 s): pipelock's own answer, even "scan_deadline_exceeded", comes first.
TIMEOUT_SECONDS = 20.0
SEPARATOR = " ; "
BLOB_MIN_CHARS = 256         # a standard-base64 run this long is data, not a token
KEPT_RUN_CHARS = 20          # an AWS key id is 20 characters
KEPT_HEAD_CHARS = 64         # where a blob starts, a key may run into it ("SecretAccessKey = <40 chars><data>")
DECODED_MIN_CHARS = 16       # printable strings shorter than this in decoded data are noise
LOCATE_LEAF_CHARS = 1024     # below this, a match is narrowed by bisection directly
MAX_SPANS = 16               # spans located per rule and chunk; more and the rest stays unlocated
MAX_LOCATE_CALLS = 512       # scan calls one scan() may spend on locating, about a second
BODY_DROPPED_RULES = frozenset({"DLP-Credential in URL"})

_B64_RUN = re.compile(rf"[A-Za-z0-9+/]{{{BLOB_MIN_CHARS},}}")
_SINGLE_CASE_RUN = re.compile(rf"[A-Z0-9]{{{KEPT_RUN_CHARS},}}|[a-z0-9]{{{KEPT_RUN_CHARS},}}")
# Where a key can stand as a whole token: a run of letters and digits (an id), or of base64 (a secret key).
_KEY_TOKENS = (re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{16,40}(?![A-Za-z0-9])"),
               re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{16,40}(?![A-Za-z0-9+/])"),
               re.compile(r"(?<![\w.-])eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+(?![\w.-])"))   # a JWT
# An assignment in a body ("NAME=value", "name: value"), whose value may be a template's stand-in.
_ASSIGNED_VALUE = re.compile(r"(?<![\w-])[A-Za-z_][\w-]*[ \t]*[=:][ \t]*[\"']?(<[^<>\n]{1,40}>|[^\s\"',;&]+)")
_PRINTABLE = re.compile(rb"[\x20-\x7e\t\r\n]{%d,}" % DECODED_MIN_CHARS)
_PRINTABLE_WORD = re.compile(rb"[\x21-\x7e]{8,}")  # the shortest a pipelock rule reads
_WHOLE_DECODABLE = re.compile(r"[A-Za-z0-9+/=_\-:,\\ ]{10,}")
_SEGMENT_BREAKS = frozenset("/=? &")
_TAG_CHARACTERS = re.compile("[\U000E0020-\U000E007E]")  # Unicode tags that mirror printable ASCII
_MAX_DECODE_DEPTH = 2           # base64 in base64 is still read; deeper is the floor's


class DlpUnavailable(Exception):
    """The external scanner could not give a verdict; callers block (fail closed)."""


@dataclass(frozen=True)
class _Prepared:
    """A text as pipelock is shown it (same length, benign stretches blanked), and its base64 blobs."""

    text: str
    blobs: tuple[tuple[int, int, bytes], ...]   # (start, end, decoded bytes) of each blob in the text


class PipelockClient:
    """See the module docstring."""

    def __init__(self, url: str, bearer_token: str = "", timeout: float = TIMEOUT_SECONDS,
                 chunk_chars: int = CHUNK_CHARS):
        self.url = url
        self.bearer_token = bearer_token
        self.timeout = timeout
        self.chunk_chars = chunk_chars

    def scan(self, parts: RequestParts, locate: bool = True) -> list[DlpMatch]:
        """Secrets in URL, headers and body. locate: find each body match's span (for redaction;
        it costs scan calls, see _locate); a caller that only blocks passes False. Raises DlpUnavailable."""
        matches = self._scan_body(parts.body, locate) if parts.body.strip() else []
        matches += self._scan_head(parts)
        return list({(m.pattern, m.where, m.span): m for m in matches}.values())

    def scan_injection(self, text: str) -> list[DlpMatch]:
        """Prompt injection in a response body or WebSocket message, as a model would read it
        (_readable). Raises DlpUnavailable."""
        for _, chunk in _chunks(_readable(text), self.chunk_chars):
            rules = self._rules("prompt_injection", chunk)
            if rules:
                return [DlpMatch(f"pipelock:{rule}", "body") for rule in rules]
        return []

    # -- requests -------------------------------------------------------------------------------

    def _scan_head(self, parts: RequestParts) -> list[DlpMatch]:
        items = [("url", _prepare(parts.url, body=False))] if parts.url else []
        items += [(f"header:{name.lower()}", _prepare(f"{name}: {value}", body=False)) for name, value in parts.headers]
        texts = [(where, prepared.text) for where, prepared in items]
        matches = []
        for batch in _batches(texts, self.chunk_chars):
            rules = self._dlp(SEPARATOR.join(text for _, text in batch))
            if len(batch) > 1 and rules:
                attributed = [DlpMatch(f"pipelock:{rule}", where) for where, text in batch for rule in self._dlp(text)]
                # What only the parts together show (one ran into the next) is the request's.
                matches += attributed or [DlpMatch(f"pipelock:{rule}", "request") for rule in rules]
            else:
                matches += [DlpMatch(f"pipelock:{rule}", batch[0][0]) for rule in rules]
        for where, prepared in items:
            matches += [DlpMatch(f"pipelock:{rule}", where) for _, _, rule in self._blob_rules(prepared, body=False)]
        for name, value in parts.headers:
            alone = _prepare(value, body=False).text.strip()
            if _decodes_only_whole(alone):
                matches += [DlpMatch(f"pipelock:{rule}", f"header:{name.lower()}") for rule in self._dlp(alone)]
        return self._names_withheld(matches, parts.headers)

    def _names_withheld(self, matches: list[DlpMatch], headers: tuple[tuple[str, str], ...]) -> list[DlpMatch]:
        """A match in a header's name is placed at "header-name": the name itself must not reach a log."""
        names = {f"header:{name.lower()}": name for name, _ in headers}
        in_name: dict[str, list[str]] = {}
        placed = []
        for match in matches:
            name = names.get(match.where)
            if name is not None and match.where not in in_name:
                in_name[match.where] = [f"pipelock:{rule}" for rule in self._dlp(_prepare(name, body=False).text)]
            placed.append(DlpMatch(match.pattern, "header-name") if match.pattern in in_name.get(match.where, ()) else match)
        return placed

    def _scan_body(self, body: str, locate: bool) -> list[DlpMatch]:
        prepared = _prepare(body, body=True)
        budget = [MAX_LOCATE_CALLS if locate else 0]
        matches = []
        for offset, chunk in _chunks(prepared.text, self.chunk_chars):
            for rule in self._dlp(chunk, body=True):
                spans, whole = self._locate(chunk, rule, budget) if locate else ([], False)
                matches += [DlpMatch(f"pipelock:{rule}", "body", (offset + a, offset + b)) for a, b in spans]
                if not whole:
                    matches.append(DlpMatch(f"pipelock:{rule}", "body"))
        matches += [DlpMatch(f"pipelock:{rule}", "body", (start, end))
                    for start, end, rule in self._blob_rules(prepared, body=True)]
        return _merged_body_spans(matches)

    def _blob_rules(self, prepared: _Prepared, body: bool, depth: int = 0) -> Iterator[tuple[int, int, str]]:
        """(start, end, rule) for each rule pipelock finds in the printable strings of a blob's
        decoded bytes; blobs inside those strings are decoded in turn, to _MAX_DECODE_DEPTH."""
        if depth >= _MAX_DECODE_DEPTH:
            return
        for start, end, data in prepared.blobs:
            strings = SEPARATOR.join(s.decode("ascii") for s in _PRINTABLE.findall(data))
            if not strings:
                continue
            inner = _prepare(strings, body)
            rules = [rule for _, chunk in _chunks(inner.text, self.chunk_chars) for rule in self._dlp(chunk, body)]
            rules += [rule for _, _, rule in self._blob_rules(inner, body, depth + 1)]
            for rule in dict.fromkeys(rules):
                yield start, end, rule

    # -- locating a match -----------------------------------------------------------------------

    def _locate(self, text: str, rule: str, budget: list[int]) -> tuple[list[tuple[int, int]], bool]:
        """Spans of text that each show rule on their own, and whether that is all of it (with the
        spans blanked, pipelock finds rule no more). Found by halving: pipelock gives no offsets.
        budget: scan calls left for locating in this scan(); past it, what is found so far."""
        spans: list[tuple[int, int]] = []

        def has(piece: str) -> bool:
            if budget[0] <= 0:
                raise _OutOfBudget
            budget[0] -= 1
            return rule in self._dlp(piece, body=True)

        def narrow(lo: int, hi: int) -> tuple[int, int]:
            # The shortest prefix of text[lo:hi] that shows rule, then the shortest suffix of that prefix.
            a, b = lo, hi
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (a, mid) if has(text[lo:mid]) else (mid, b)
            end, a, b = b, lo, b
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (mid, b) if has(text[mid:end]) else (a, mid)
            return a, end

        def find(lo: int, hi: int) -> None:
            if len(spans) >= MAX_SPANS:
                return
            if hi - lo <= LOCATE_LEAF_CHARS:
                spans.append(narrow(lo, hi))
                return
            mid, reach = (lo + hi) // 2, CHUNK_OVERLAP // 2
            hits = [(a, b) for a, b in ((lo, mid + reach), (mid - reach, hi)) if has(text[a:b])]
            for half in hits:
                find(*half)
            if not hits:  # only the whole range shows it: a match across the middle, or a whole-text decoding
                spans.append(narrow(lo, hi))

        try:
            find(0, len(text))
            spans = _merged(spans)
            return spans, not has(_blanked(text, spans))
        except _OutOfBudget:
            return _merged(spans), False

    # -- the wire -------------------------------------------------------------------------------

    def _dlp(self, text: str, body: bool = False) -> list[str]:
        rules = self._rules("dlp", text)
        return [rule for rule in rules if rule not in BODY_DROPPED_RULES] if body else rules

    def _rules(self, kind: str, text: str) -> list[str]:
        """The rule ids pipelock finds in text, each once; [] when it allows the text."""
        if not text.strip():
            return []  # pipelock refuses an empty input
        field = "text" if kind == "dlp" else "content"
        verdict = self._post({"kind": kind, "input": {field: text}})
        if not isinstance(verdict, dict) or verdict.get("status") != "completed":
            raise DlpUnavailable("pipelock scan API did not complete the scan")
        decision = verdict.get("decision")
        if decision == "allow":
            return []
        if decision != "deny":
            raise DlpUnavailable("pipelock scan API gave an unknown decision")
        findings = verdict.get("findings") or []
        if not isinstance(findings, list):
            raise DlpUnavailable("pipelock scan API gave malformed findings")
        rules = [_safe_name(str(f.get("rule_id") or f.get("scanner") or "unknown")) for f in findings if isinstance(f, dict)]
        return list(dict.fromkeys(rules)) or ["deny"]  # a deny without a reason still blocks

    def _post(self, payload: dict) -> object:
        # "replace": a lone surrogate (a header decoded with surrogateescape) cannot be UTF-8; it goes as "?".
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.bearer_token:
            headers["Authorization"] = f"Bearer {self.bearer_token}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
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
            return json.loads(raw)
        except ValueError:
            raise DlpUnavailable("pipelock scan API answered with invalid JSON") from None


class _OutOfBudget(Exception):
    pass


def _prepare(text: str, body: bool) -> _Prepared:
    """text with the stretches that are not secrets blanked, same length (see the module docstring).
    Placeholders and templates' stand-in values only in a body: pipelock sees a header exactly as it
    goes out, but for the token."""
    edits: list[tuple[int, int, str]] = []
    start = text.find(PLACEHOLDER_PREFIX) if body else -1
    while start >= 0:
        edits.append((start, start + len(PLACEHOLDER_PREFIX), _filler("ph", len(PLACEHOLDER_PREFIX))))
        start = text.find(PLACEHOLDER_PREFIX, start + len(PLACEHOLDER_PREFIX))
    for value in _ASSIGNED_VALUE.finditer(text) if body else ():
        if is_template_value(value.group(1)):
            edits.append((value.start(1), value.end(1), _filler("tv", len(value.group(1)))))
    for tokens in _KEY_TOKENS:
        for token in tokens.finditer(text):
            if is_documentation_example(token.group()):
                edits.append((token.start(), token.end(), _filler("ex", len(token.group()))))
    blobs = []
    for run in _B64_RUN.finditer(text):
        blob = run.group()
        if "+" not in blob and "/" not in blob:
            continue  # letters and digits only: a long identifier, not base64 data
        kept = list(blob[:KEPT_HEAD_CHARS]) + [" "] * (len(blob) - KEPT_HEAD_CHARS)
        for piece in _SINGLE_CASE_RUN.finditer(blob):
            kept[piece.start():piece.end()] = piece.group()
        edits.append((run.start(), run.end(), "".join(kept)))
        blobs.append((run.start(), run.end(), _b64decode(blob)))
    out, last = [], 0
    for start, end, replacement in sorted(edits, key=lambda edit: (edit[0], -edit[1])):  # the outer first
        if start < last:
            continue  # inside a stretch already blanked
        out += [text[last:start], replacement]
        last = end
    out.append(text[last:])
    return _Prepared("".join(out), tuple(blobs))


def _readable(text: str) -> str:
    """text as a model reads it: a JSON document (an MCP result, package metadata) as its strings,
    decoded and one per line, and Unicode tag characters, invisible, as the ASCII they smuggle."""
    if text.lstrip()[:1] in ("{", "["):
        try:
            text = "\n".join(_json_strings(json.loads(text)))
        except (ValueError, RecursionError):
            pass  # not JSON after all: read as it is
    return _TAG_CHARACTERS.sub(lambda tag: chr(ord(tag.group()) - 0xE0000), text)


def _json_strings(document: object) -> Iterator[str]:
    """Every string of a JSON document, keys too, in document order."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            stack += [item for pair in reversed(value.items()) for item in reversed(pair)]
        elif isinstance(value, list):
            stack += reversed(value)


def _filler(tag: str, length: int) -> str:
    # A short word and spaces: "KEY=" + filler cannot pass for a value of 8 characters or more.
    return (tag + " " * length)[:length]


def _b64decode(blob: str) -> bytes:
    try:
        return base64.b64decode(blob[: len(blob) - len(blob) % 4])
    except binascii.Error:
        return b""


def _decodes_only_whole(value: str) -> bool:
    """Whether pipelock reads something in value only when it is the whole text: value decodes whole
    (hex, base64 or base32, as Go's decoders take them) to a printable string, and holds a character
    that splits pipelock's segments, so within a longer text that decoding is lost."""
    if not _WHOLE_DECODABLE.fullmatch(value) or not _SEGMENT_BREAKS.intersection(value):
        return False
    return any(_PRINTABLE_WORD.search(decoded) for decoded in _whole_decodings(value))


def _whole_decodings(value: str) -> Iterator[bytes]:
    hex_digits = re.sub(r"\\x|0x|[:\- ,]", "", value)
    if re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", hex_digits):
        yield bytes.fromhex(hex_digits)
    unpadded = value.rstrip("=")
    if unpadded == value and len(value) % 4 == 1 or unpadded != value and len(value) % 4:
        return  # neither padded nor unpadded base64, nor base32 (its length is a multiple of 8)
    for alphabet, decode in (("[A-Za-z0-9+/]+", base64.b64decode), ("[A-Za-z0-9_-]+", base64.urlsafe_b64decode),
                             ("[A-Z2-7]+", base64.b32decode)):
        if re.fullmatch(alphabet, unpadded):
            with contextlib.suppress(binascii.Error, ValueError):
                yield decode(unpadded + "=" * (-len(unpadded) % (8 if decode is base64.b32decode else 4)))


def _chunks(text: str, size: int) -> Iterator[tuple[int, str]]:
    """(offset, chunk) covering text; each chunk repeats the last CHUNK_OVERLAP characters of the one before."""
    step = size - min(CHUNK_OVERLAP, size // 4)
    for start in range(0, max(len(text), 1), step):
        yield start, text[start : start + size]
        if start + size >= len(text):
            return


def _batches(items: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    """The (where, text) items in groups whose joined text fits a chunk; a longer item by itself, in chunks."""
    batch: list[tuple[str, str]] = []
    length = 0
    for where, text in items:
        if len(text) > size:
            yield from ([(where, chunk)] for _, chunk in _chunks(text, size))
            continue
        if batch and length + len(SEPARATOR) + len(text) > size:
            yield batch
            batch, length = [], 0
        batch.append((where, text))
        length += len(text) + len(SEPARATOR)
    if batch:
        yield batch


def _merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _blanked(text: str, spans: list[tuple[int, int]]) -> str:
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def _merged_body_spans(matches: list[DlpMatch]) -> list[DlpMatch]:
    """One match per stretch and rule: chunks overlap, so a match in the overlap is located twice."""
    located: dict[str, list[tuple[int, int]]] = {}
    rest = []
    for match in matches:
        if match.span is None:
            rest.append(match)
        else:
            located.setdefault(match.pattern, []).append(match.span)
    return [DlpMatch(pattern, "body", span) for pattern, spans in located.items() for span in _merged(spans)] + rest


def _safe_name(rule: str) -> str:
    # Rule ids are pattern names, but they go into logs and headers: keep them tame.
    return re.sub(r"[^A-Za-z0-9_.:\- ]", "_", rule)[:80]


def _error_code(exc: urllib.error.HTTPError) -> str:
    try:
        errors = json.loads(exc.read(65536)).get("errors") or []
        return f" ({_safe_name(str(errors[0].get('code')))})" if errors else ""
    except (ValueError, AttributeError, IndexError, OSError):
        return ""
