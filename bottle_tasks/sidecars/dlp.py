"""Secret detection for egress and git-gate: the built-in floor (pipelock's client: pipelock_scan.py).

Everything here reports *which pattern* matched and *where* (``url``, ``header:<name>``,
``header-name:#<index>``, ``headers``, ``body``, ...), never the matched text: results go into
logs and block responses. Stdlib only: this runs inside the bundle image.

Why not a detector library: bc-detect-secrets 1.5.52 (Yelp's detect-secrets, maintained), measured
in a scratch venv with its default plugins, line by line as it scans: 8.5 ms for a 2 KB JSON request
and 6.6 s for 1 MB of prose, against 0.8 ms and 41 ms here (bench/proxy_overhead.py --scan-cost),
so a Messages API body would wait seconds. It decodes nothing: a key in base64, hex, a JSON escape
or lower case is reported only by its entropy plugins, which also fire on every image, hash and
lockfile, so they cannot block. Its provider plugins (Twilio, Mailchimp, ...) are worth porting as rules.

Rules (``BUILTIN_PATTERNS``)
    Provider formats: a fixed prefix and enough characters after it that a placeholder such as
    "sk-ant-placeholder" does not match. Case: an AWS access key ID is upper-case base32, so a
    receiver can upper-case a lower-cased one. Lower-case IDs match; mixed-case ones match where
    they stand alone, not next to base64 characters (pipelock's case-insensitive rule matches
    random base64 images). Private-key headers match in any case. The other tokens are
    case-sensitive base62/base64, which a change of case destroys. Known documentation keys
    (``DOCUMENTATION_KEYS``) never match (``is_documentation_example``).

Views (``analyse``, ``decoded_views``)
    The rules also run over what the text says once decoded, and what that says once decoded,
    to ``MAX_DEPTH`` decodings (base64 of percent-encoded hex ...):

    - percent escapes (``%41``, ``%u0041``) and JSON/JavaScript/HTML escapes (``\\u0041``,
      surrogate pairs, ``\\u{41}``, ``\\x41``, octal, ``\\/``, ``&#65;``) are decoded in place,
      with ``ESCAPE_CONTEXT`` characters of the text around each cluster of them (escaped quotes
      alone open none: the rules that need quotes take escaped ones);
    - base64 (standard and URL-safe, any padding, lines wrapped or not) and hex (plain, or bytes
      separated by ``:``, ``-``, ``,`` or spaces, with or without ``0x``) are decoded run by run:
      every run of the alphabet ``MIN_BASE64_RUN``/``MIN_HEX_RUN`` characters long or more, at
      every alignment (4 for base64, 2 for hex). So a secret encoded on its own and pasted into
      a longer run, or a body window that starts in the middle of a run, still decodes. Decoded
      bytes count only where they hold text (``MIN_TEXT`` printable ASCII or UTF-16 characters
      in a row); gzip and zlib streams are inflated first.

    A match found in a view is reported with the span of what carries it in the text: the escape
    or the whole encoded run (what redaction replaces). Bounds: at most ``MAX_DEPTH`` decodings
    deep, and at most ``WORK_FACTOR`` times the text's length (plus ``WORK_FLOOR``) of decoded
    characters in all. Ordinary text and images stay well under it (base64 costs three times its
    length, hex once). A text built to go past it matches the pseudo-pattern ``decode_limit``:
    what was not decoded was not scanned. Cost on a 2-core machine: 10 to 40 ms per MB of text,
    code or base64 images; text dense with ids and hashes (a lockfile) up to about 150 ms.

Fields (``body_fields``, ``url_fields``, ``reassembled``, ``scan_body_text``, ``scan_request``)
    The strings of a JSON body (keys too), the fields of a form or multipart body, a URL's path
    segments and query fields, and a request's headers, each scanned, and joined end to end
    (``JoinedText``) so that a secret split across two of them is seen whole: all the values
    in order, all the keys, the values of each key (``"text"`` across content blocks), and the
    values that are whole base64 or hex, decoded. Where one field ends and the next begins is a
    seam: there a rule's "not next to a letter" checks are waived, since the receiver joins the
    fields there.

Redaction (``redact_body``, ``redact_text``): each match replaced by ``[REDACTED:<pattern>]``;
what has no single place to cut (a split secret) is reported as unredactable.

Hostnames (``hostname_problem``): the names a wildcard route lets the agent choose.

Known limits: a split secret whose pieces sit next to letters inside their fields; pieces of
one secret encoded separately inside one field or text (as whole fields they join); escapes
more than ``ESCAPE_CONTEXT`` characters from the rest of their match; decoded text shows up
only in runs of ``MIN_TEXT`` characters, and the garbage characters a misaligned decoding puts
next to it can defeat a rule's boundary check; base32 is decoded only in hostnames; encryption,
other compression, and any encoding the agent and a receiver agree on beforehand are not seen.
"""

from __future__ import annotations

import binascii
import bisect
import functools
import itertools
import json
import re
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

# -- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    name: str
    # Starts with a literal, so the regex engine skips ahead to it: a rule costs about 0.5 ms per
    # MB of text. Group "secret", when present, is the secret (what redaction replaces).
    core: str
    before: str | None = None  # a character class that may not come right before the match
    after: str | None = None   # ... nor right after it
    folded: bool = False       # core and classes are lower case and run on the ASCII-lower-cased text
    at_seams: bool = True      # before/after are waived at a seam (JoinedText)
    in_base64: bool = False    # can match inside a long run of standard base64 (see _hits)

    @property
    def regex(self) -> str:
        """The rule as one regex over plain text (with the boundaries as lookarounds)."""
        before = f"(?<!{self.before})" if self.before else ""
        after = f"(?!{self.after})" if self.after else ""
        return f"{before}{self.core}{after}"


# Two spellings of the name, each a rule of its own so that each starts with a literal. Quotes
# may be escaped (JSON inside a JSON string) and "+" stands for a space in a form.
_AWS_SECRET_NAMES = (r"aws[_\-. +]?secret[_\-. +]?(?:access[_\-. +]?)?key", r"secret[_\-. +]?access[_\-. +]?key")
_AWS_SECRET_VALUE = r"[\\\"'\s+]*[:=][\\\s+]*[\\\"']{0,3}(?P<secret>[a-z0-9/+]{40})"
_RULES: tuple[_Rule, ...] = (
    _Rule("aws_access_key_id", r"(?:AKIA|ASIA)[A-Z0-9]{16}", in_base64=True),
    # Real IDs are base32 after the prefix ([A-Z2-7]); the lower- and mixed-case forms ask for
    # that, which keeps lower-case base32 words (Azure account names, IPFS ids) out.
    _Rule("aws_access_key_id", r"(?:akia|asia)[a-z2-7]{16}", before="[a-z0-9]", after="[a-z0-9]", in_base64=True),
    _Rule("aws_access_key_id", r"(?:akia|asia)[a-z2-7]{16}", before="[a-z0-9+/_-]", after="[a-z0-9+/=_-]",
          folded=True, at_seams=False),
    *(_Rule("aws_secret_access_key", name + _AWS_SECRET_VALUE, after="[a-z0-9/+]", folded=True)
      for name in _AWS_SECRET_NAMES),
    # A prefix glued to a word by "-" or "_" ("agent-xoxb-...", "id_ghp_...") still starts a token.
    _Rule("github_token", r"gh[pousr]_[A-Za-z0-9]{36,255}", before="[A-Za-z0-9]"),
    _Rule("github_pat", r"github_pat_[A-Za-z0-9_]{22,255}", before="[A-Za-z0-9]"),
    _Rule("anthropic_api_key", r"sk-ant-[A-Za-z0-9_-]{20,}", before="[A-Za-z0-9]"),
    _Rule("openai_api_key", r"sk-(?!ant-)(?:[A-Za-z0-9]+-)?[A-Za-z0-9_-]{20,}", before="[A-Za-z0-9]"),
    _Rule("slack_token", r"xox[abposr]-[A-Za-z0-9-]{10,}", before="[A-Za-z0-9]"),
    _Rule("slack_webhook", r"hooks\.slack\.com/services/T[A-Za-z0-9]{8,}/B[A-Za-z0-9]{8,}/[A-Za-z0-9]{24}"),
    _Rule("private_key", r"-----begin[ +](?:[a-z0-9]+[ +])*private[ +]key(?:[ +]block)?-----", folded=True),
    # "+" and "/" before: inside a base64 run (an image) "AIza" plus 35 characters is common.
    _Rule("google_api_key", r"AIza[0-9A-Za-z_-]{35}", before="[A-Za-z0-9_+/-]", after="[0-9A-Za-z_-]"),
    *(_Rule("stripe_key", prefix + r"_(?:live|test)_[A-Za-z0-9]{20,}", before="[A-Za-z0-9]") for prefix in ("sk", "rk")),
    _Rule("gitlab_token", r"glpat-[A-Za-z0-9_-]{20,}", before="[A-Za-z0-9]"),
    _Rule("npm_token", r"npm_[A-Za-z0-9]{36}", before="[A-Za-z0-9]", after="[A-Za-z0-9]"),
    _Rule("pypi_token", r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
    _Rule("huggingface_token", r"hf_[A-Za-z]{34}", before="[A-Za-z0-9_]", after="[A-Za-z0-9]"),
    _Rule("sendgrid_api_key", r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}", before="[A-Za-z0-9]"),
)

# (name, regex) per rule, each a single regex over plain text; a name can have several.
BUILTIN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (rule.name, re.compile(rule.regex, re.IGNORECASE if rule.folded else 0)) for rule in _RULES)
PATTERN_NAMES: tuple[str, ...] = tuple(dict.fromkeys(rule.name for rule in _RULES))

# Reported when a text needs more decoding than the bound allows (see the module docstring).
DECODE_LIMIT = "decode_limit"


class _Compiled(NamedTuple):
    rule: _Rule
    core: re.Pattern[str]
    before: re.Pattern[str] | None
    after: re.Pattern[str] | None
    has_secret: bool


_COMPILED = tuple(
    _Compiled(rule, re.compile(rule.core), re.compile(rule.before) if rule.before else None,
              re.compile(rule.after) if rule.after else None, "(?P<secret>" in rule.core)
    for rule in _RULES)
_IN_BASE64 = tuple(compiled for compiled in _COMPILED if compiled.rule.in_base64)
_NOT_IN_BASE64 = tuple(compiled for compiled in _COMPILED if not compiled.rule.in_base64)

# Where a match of a rule with no length bound inside it may begin in text that ends before the
# match does: aws_secret_access_key allows any run of quotes and spaces around "=", private_key
# any number of words in its BEGIN line. Every other match is found whole in a few hundred
# characters. A scan that cuts text into windows (bodies.WindowScanner) carries text from here.
_OPEN_PREFIX_SOURCES = (
    *(name + r"[\\\"'\s+]*(?:[:=][\\\s+]*[\\\"']{0,3}[a-z0-9/+]{0,40})?\Z" for name in _AWS_SECRET_NAMES),
    r"-----begin[ +][a-z0-9 +]*-{0,4}\Z",
)
OPEN_PREFIXES: tuple[re.Pattern[str], ...] = tuple(re.compile(source, re.IGNORECASE) for source in _OPEN_PREFIX_SOURCES)
_FOLDED_OPEN_PREFIXES = tuple(re.compile(source) for source in _OPEN_PREFIX_SOURCES)
# A window can end inside an escape ("%2", "\u00"); a decoded view keeps it literally, which would close the prefix.
_PARTIAL_ESCAPE = re.compile(r"(?:%[0-9A-Fa-f]?|%[uU][0-9A-Fa-f]{0,3}|\\(?:u\{?[0-9A-Fa-f]{0,5}|x[0-9A-Fa-f]?)?"
                             r"|&#[xX]?[0-9A-Fa-f]{0,6})\Z")

# Keys that providers publish in their documentation: never live, and shipped in SDK tests, so an
# agent that reads one must not brick a session. Only whole keys: a rule such as "ends in EXAMPLE"
# would let an agent send a real key in pieces, each padded to look like one.
DOCUMENTATION_KEYS: frozenset[str] = frozenset({
    # AWS, "Managing access keys" and the STS examples
    "AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE", "AKIAI44QH8DHBEXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    # Stripe's published test key, Slack's documentation token
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc", "xoxb-not-a-real-token-this-will-not-work",
    # jwt.io's example token (HS256, "John Doe"), quoted in every JWT tutorial
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
})
_CASELESS_DOCUMENTATION_KEYS = frozenset(key.upper() for key in DOCUMENTATION_KEYS if re.fullmatch(r"A[KS]IA\w{16}", key))
_LAST_TOKEN = re.compile(r"[A-Za-z0-9/+_-]+\Z")


def is_documentation_example(matched_text: str) -> bool:
    """True when matched_text is a provider's documented example key, or ends in one after a key
    name ("aws_secret_access_key = <example>"): the same test for pipelock's findings and ours."""
    text = matched_text.strip().strip("\"'")
    if text in DOCUMENTATION_KEYS:
        return True
    token = _LAST_TOKEN.search(text)
    candidate = token.group() if token else text
    return candidate in DOCUMENTATION_KEYS or candidate.upper() in _CASELESS_DOCUMENTATION_KEYS


# What templates and docs write where a secret goes: "<token>", "${TOKEN}", "{{ token }}", "xxxx",
# "sk-..." or lower-case words with one that says so ("your-api-key", "ghp_your_token_here").
# Digits never qualify, nor capitals but in a $VARIABLE_NAME of words, so no key (nor a key with such
# words around it) does.
_TEMPLATE_VALUE = re.compile(r"<[a-z_ .-]{1,40}>|\$\{?[A-Z]+(?:_[A-Z]+)+\}?|\{\{ ?[a-z_.]+ ?\}\}"
                             r"|[xX*.]{3,}|[a-z]{1,4}[-_]\.{3}|[a-z]+(?:[-_][a-z]+)*")
_TEMPLATE_WORDS = frozenset({"your", "here", "example", "placeholder", "changeme", "replace", "insert",
                             "dummy", "redacted", "todo"})


def is_template_value(value: str) -> bool:
    """True when value (an assignment's right side) is a stand-in for a secret, not one."""
    value = value.strip().strip("\"'")
    if not _TEMPLATE_VALUE.fullmatch(value):
        return False
    if value[0] in "<${xX*." or value.endswith("..."):
        return True
    return any(word in _TEMPLATE_WORDS for word in re.split(r"[-_]", value))


def _fold(text: str) -> str:
    """text with ASCII letters in lower case, positions unchanged."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return text.encode("latin-1", "replace").lower().decode("latin-1")  # "İ" lower-cases to two characters


_NO_SEAMS: frozenset[int] = frozenset()


def _rule_hits(text: str, seams: frozenset[int] = _NO_SEAMS, skip: set[str] | None = None,
               rules: Sequence[_Compiled] = _COMPILED) -> Iterator[tuple[str, int, int]]:
    """(pattern name, start, end) of every match of rules in text, the span being the secret's;
    documentation keys left out. With skip, one hit per name, and names in skip are not looked for."""
    folded: str | None = None
    size = len(text)
    for compiled in rules:
        rule = compiled.rule
        if skip is not None and rule.name in skip:
            continue
        haystack = text
        if rule.folded:
            folded = folded if folded is not None else _fold(text)
            haystack = folded
        for found in compiled.core.finditer(haystack):
            start, end = found.span()
            if (compiled.before is not None and start > 0 and compiled.before.match(haystack, start - 1)
                    and not (rule.at_seams and start in seams)):
                continue
            if (compiled.after is not None and end < size and compiled.after.match(haystack, end)
                    and not (rule.at_seams and end in seams)):
                continue
            if compiled.has_secret:
                start, end = found.span("secret")
            if is_documentation_example(text[start:end]):
                continue
            yield rule.name, start, end
            if skip is not None:
                skip.add(rule.name)
                break


# -- views -----------------------------------------------------------------------------------

MAX_DEPTH = 4            # decodings stacked on one another
WORK_FACTOR = 16         # decoded characters allowed per character of the text ...
WORK_FLOOR = 64 << 10    # ... plus this many
MIN_BASE64_RUN = 20      # characters: 15 bytes, the shortest secret a rule matches
MIN_HEX_RUN = 30
MIN_TEXT = 15            # printable characters in a row for decoded bytes to count as text
ESCAPE_CONTEXT = 512     # text kept around a cluster of escapes when they are decoded in place
MAX_INFLATE = 1 << 20    # bytes inflated from one gzip/zlib stream (also bounded by the work left)
ELIDE_RUN = 4096         # a standard-base64 run this long is kept whole only for the rules that can match inside one


class _Root:
    def to_root(self, start: int, end: int) -> tuple[int, int]:
        return start, end

    def repeats(self, start: int, end: int) -> bool:
        """Whether [start, end) of the view is a copy of what its parent had (decoded there already)."""
        return False


@dataclass(frozen=True)
class _Seamed(_Root):
    """The root of a JoinedText: what lies inside one field was decoded when the field was scanned
    on its own, so only what crosses a seam is new."""
    seams: tuple[int, ...]  # sorted

    def repeats(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.seams, start)
        return i == len(self.seams) or self.seams[i] >= end


@dataclass(frozen=True)
class _Run(_Root):
    """A view decoded from a run: any place in it maps to the whole run."""
    span: tuple[int, int]

    def to_root(self, start: int, end: int) -> tuple[int, int]:
        return self.span


@dataclass(frozen=True)
class _Unescaped(_Root):
    """A region of a parent view with its escapes decoded in place: positions map back exactly,
    a position inside a decoded escape to the whole escape."""
    parent: _View
    base: int                      # where the region starts in the parent
    out_starts: tuple[int, ...]    # per decoded escape run: where its decoding sits in this view ...
    out_ends: tuple[int, ...]
    in_starts: tuple[int, ...]     # ... and where the escapes sat in the parent
    in_ends: tuple[int, ...]

    def _back_start(self, at: int) -> int:
        i = bisect.bisect_right(self.out_starts, at) - 1
        if i < 0:
            return self.base + at
        return self.in_starts[i] if at < self.out_ends[i] else self.in_ends[i] + at - self.out_ends[i]

    def _back_end(self, at: int) -> int:
        i = bisect.bisect_left(self.out_ends, at)
        if i < len(self.out_ends) and self.out_starts[i] < at:
            return self.in_ends[i]
        return self.base + at if i == 0 else self.in_ends[i - 1] + at - self.out_ends[i - 1]

    def to_root(self, start: int, end: int) -> tuple[int, int]:
        return self.parent.origin.to_root(self._back_start(start), self._back_end(end))

    def repeats(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.out_starts, end - 1) - 1
        return not (i >= 0 and self.out_ends[i] > start)  # touches no decoded escape


@dataclass(frozen=True)
class _Joined:
    """Views joined by NUL (which no rule or decoder crosses) to be decoded in one pass."""
    members: tuple[_View, ...]
    starts: tuple[int, ...]

    def _local(self, start: int, end: int) -> tuple[_View, int, int]:
        i = bisect.bisect_right(self.starts, start) - 1
        return self.members[i], start - self.starts[i], min(end - self.starts[i], len(self.members[i].text))

    def to_root(self, start: int, end: int) -> tuple[int, int]:
        member, local_start, local_end = self._local(start, end)
        return member.origin.to_root(local_start, local_end)

    def repeats(self, start: int, end: int) -> bool:
        member, local_start, local_end = self._local(start, end)
        return member.origin.repeats(local_start, local_end)


@dataclass(frozen=True)
class _View:
    text: str
    origin: _Root | _Run | _Unescaped | _Joined
    depth: int = 0

    def repeats_parent(self, start: int, end: int) -> bool:
        return self.origin.repeats(start, end)


class _Budget:
    def __init__(self, size: int):
        self.left = WORK_FACTOR * size + WORK_FLOOR
        self.spent = 0
        self.exhausted = False

    def take(self, amount: int) -> bool:
        if amount > self.left:
            self.exhausted = True
            return False
        self.left -= amount
        self.spent += amount
        return True


@dataclass(frozen=True)
class Analysis:
    """A text and every view decoded from it (``analyse``)."""
    views: tuple[_View, ...]  # the text itself first
    exhausted: bool           # the decode bound was reached: some views are missing
    work: int                 # decoded characters and bytes produced
    base64_stretches: tuple[tuple[int, int], ...] = ()  # runs of the text of ELIDE_RUN standard base64 or more


def analyse(text: str) -> Analysis:
    """text and its decoded views, breadth first, within the bounds of the module docstring. For a
    JoinedText, only what crosses a seam is decoded (the fields were each decoded on their own)."""
    return _analyse(text, tuple(sorted(getattr(text, "seams", ()))))


@functools.lru_cache(maxsize=2)  # scan_text and then open_match_start look at the same window
def _analyse(text: str, seams: tuple[int, ...]) -> Analysis:
    budget = _Budget(len(text))
    root = _View(str(text), _Seamed(seams) if seams else _Root())
    stretches: list[tuple[int, int]] = []
    views = [root]
    following = _decode(root, 1, budget, stretches)
    for depth in range(2, MAX_DEPTH + 2):
        views.extend(following)
        if not following or budget.exhausted or depth > MAX_DEPTH:
            break
        # One pass over the layer's views joined: many small views (JWT payloads, say) would each
        # pay the decoders' fixed cost.
        starts = tuple(_cumulative([0, *(len(view.text) + 1 for view in following[:-1])]))
        layer = _View("\x00".join(view.text for view in following), _Joined(tuple(following), starts), depth - 1)
        following = _decode(layer, depth, budget, None)
    return Analysis(tuple(views), budget.exhausted, budget.spent, tuple(stretches))


analyse.cache_clear = _analyse.cache_clear  # type: ignore[attr-defined]  # for tests and the bench


def decoded_views(text: str) -> list[str]:
    """text plus every decoded form of it the rules look at."""
    return [view.text for view in analyse(text).views]


def _decode(view: _View, depth: int, budget: _Budget, stretches: list[tuple[int, int]] | None) -> list[_View]:
    text = view.text
    found: list[_View] = []
    for stage in _ESCAPE_STAGES:
        if stage.literal in text:
            found += _unescape(view, depth, budget, stage)
    found += _decode_runs(view, depth, budget, stretches)
    return found


# Escapes, decoded in place. Each regex starts with a literal (the engine skips ahead to it).
# A region is opened around escapes that can stand for a secret's characters; inside a region
# every escape is decoded. Escaped quotes alone open none: the rules that need quotes allow
# escaped ones, and in a JSON body they are everywhere.
class _EscapeStage(NamedTuple):
    literal: str
    opens: re.Pattern[str]   # an escape that opens a region
    run: re.Pattern[str]     # a run of escapes, decoded as one
    decode: Callable[[str], str]


_PERCENT = r"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})"
_BACKSLASH = r"\\(?:u\{[0-9A-Fa-f]{1,6}\}|u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|[0-7]{1,3}|[^\r\n])"
_ENTITY = r"&#(?:[xX][0-9A-Fa-f]{1,6}|[0-9]{1,7});"
_PERCENT_ONE = re.compile(r"%(?:[uU]([0-9A-Fa-f]{4})|([0-9A-Fa-f]{2}))")
_ESCAPE_ONE = re.compile(r"\\(?:u\{([0-9A-Fa-f]{1,6})\}|u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2})|([0-7]{1,3})|(.))"
                         r"|&#(?:[xX]([0-9A-Fa-f]{1,6})|([0-9]{1,7}));", re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}


def _from_code_units(units: list[int]) -> str:
    """Code points, with UTF-16 surrogate pairs joined; lone surrogates and bad values become U+FFFD."""
    out, i = [], 0
    while i < len(units):
        unit = units[i]
        if 0xD800 <= unit < 0xDC00 and i + 1 < len(units) and 0xDC00 <= units[i + 1] < 0xE000:
            out.append(chr(0x10000 + ((unit - 0xD800) << 10) + units[i + 1] - 0xDC00))
            i += 2
            continue
        out.append("\ufffd" if 0xD800 <= unit < 0xE000 or unit > 0x10FFFF else chr(unit))
        i += 1
    return "".join(out)


def _decode_percent(run: str) -> str:
    if "u" not in run and "U" not in run:
        return bytes.fromhex(run.replace("%", "")).decode("utf-8", "replace")
    pieces, pending = [], bytearray()
    for one in _PERCENT_ONE.finditer(run):
        if one.group(2):
            pending.append(int(one.group(2), 16))
            continue
        pieces.append(pending.decode("utf-8", "replace"))
        pending.clear()
        pieces.append(chr(int(one.group(1), 16)) if not 0xD800 <= int(one.group(1), 16) < 0xE000 else "\ufffd")
    pieces.append(pending.decode("utf-8", "replace"))
    return "".join(pieces)


def _decode_escapes(run: str) -> str:
    if "\\x" not in run and "\\u{" not in run and "&#" not in run:
        try:  # JSON's own escapes, the common case: the json module decodes them in C
            return json.loads(f'"{run}"')
        except ValueError:
            pass  # octal, \' or \v: JavaScript's, below
    units: list[int] = []
    for one in _ESCAPE_ONE.finditer(run):
        braced, four, byte, octal, simple, html_hex, html_dec = one.groups()
        if simple is not None:
            units.extend(map(ord, _SIMPLE_ESCAPES.get(simple, simple)))
        else:
            number = braced or four or byte or html_hex
            units.append(int(number, 16) if number else int(octal or html_dec, 8 if octal else 10))
    return _from_code_units(units)


_ESCAPE_STAGES = (
    _EscapeStage("%", re.compile(_PERCENT), re.compile(f"{_PERCENT}(?:{_PERCENT})*"), _decode_percent),
    # \u..., \x.., octal, \/ (base64 and AWS secrets have slashes), and backslashes before
    # those (an escape escaped again, decoded one level at a time)
    _EscapeStage("\\", re.compile(r"\\(?:u\{?[0-9A-Fa-f]|x[0-9A-Fa-f]{2}|[0-7]|/|\\+(?=[ux0-7/]))"),
                 re.compile(f"{_BACKSLASH}(?:{_BACKSLASH})*"), _decode_escapes),
    _EscapeStage("&#", re.compile(_ENTITY), re.compile(f"{_ENTITY}(?:{_ENTITY})*"), _decode_escapes),
)


def _unescape(view: _View, depth: int, budget: _Budget, stage: _EscapeStage) -> list[_View]:
    """Views of the regions of view around the escapes that open one, decoded in place."""
    text = view.text
    opening = [found.span() for found in stage.opens.finditer(text) if not view.repeats_parent(*found.span())]
    views: list[_View] = []
    i = 0
    while i < len(opening):
        region_start = max(0, opening[i][0] - ESCAPE_CONTEXT)
        j = i
        while j + 1 < len(opening) and opening[j + 1][0] - opening[j][1] <= 2 * ESCAPE_CONTEXT:
            j += 1
        region_end = min(len(text), opening[j][1] + ESCAPE_CONTEXT)
        i = j + 1
        runs = [found.span() for found in stage.run.finditer(text, region_start, region_end)]
        pieces, out_starts, out_ends, length, at = [], [], [], 0, region_start
        for start, end in runs:
            decoded = stage.decode(text[start:end])
            pieces += [text[at:start], decoded]
            out_starts.append(length + start - at)
            length += start - at + len(decoded)
            out_ends.append(length)
            at = end
        pieces.append(text[at:region_end])
        decoded_text = "".join(pieces)
        if not budget.take(len(decoded_text)):
            break
        origin = _Unescaped(view, region_start, tuple(out_starts), tuple(out_ends),
                            tuple(start for start, _ in runs), tuple(end for _, end in runs))
        views.append(_View(decoded_text, origin, depth))
    return views


# Base64 and hex runs, decoded at every alignment.
_B64_CLASS = bytes(1 if chr(i).isascii() and (chr(i).isalnum() or chr(i) in "+/-_\r\n") else 0 for i in range(256))
_HEX_RUN_CLASS = bytes(1 if chr(i) in "0123456789abcdefABCDEF\r\n" else 0 for i in range(256))
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_HEX_ONLY = re.compile(r"[0-9A-Fa-f]+")
_SEPARATED_HEX = re.compile(r"(?:(?:0[xX])?[0-9A-Fa-f]{2}(?:, ?|[ :;-])){14,}(?:0[xX])?[0-9A-Fa-f]{2}")
# Hex digits as h, separators as s, x as x: where hex bytes stand three in a row, separated.
_HEX_CLASS = bytes(ord("h") if chr(i) in "0123456789abcdefABCDEF" else ord("s") if chr(i) in " :;,-"
                   else ord("x") if chr(i) in "xX" else ord(".") for i in range(256))
_SEPARATED_HEX_HINTS = (b"hhshhshh", b"hhsshhsshh", b"hhshxhhshxhh", b"hhsshxhhsshxhh")
_NOT_HEX = re.compile(r"0[xX]|[^0-9A-Fa-f]")
# Decoded bytes by class: p printable ASCII (tab, CR and LF too), z NUL (the other half of
# UTF-16 ASCII), . anything else.
_TEXT_CLASS = bytes(ord("p") if 32 <= i < 127 or i in (9, 10, 13) else ord("z") if i == 0 else ord(".")
                    for i in range(256))
_UTF16_RUNS = re.compile(rb"(?:pz){%d,}|(?:zp){%d,}" % (MIN_TEXT, MIN_TEXT))


def _without_breaks(run: bytes) -> bytes:
    return run.replace(b"\r", b"").replace(b"\n", b"") if b"\n" in run or b"\r" in run else run


def _alphabet_runs(classes: bytes, min_length: int) -> list[tuple[int, int]]:
    """Spans of the runs of 1s at least min_length long in classes (a text translated by a class table)."""
    needle, runs, at = b"\x01" * min_length, [], 0
    while (start := classes.find(needle, at)) >= 0:
        end = classes.find(b"\x00", start + min_length)
        end = len(classes) if end < 0 else end
        runs.append((start, end))
        at = end
    return runs


def _text_spans(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, encoding) of each stretch of data that reads as text."""
    classes = data.translate(_TEXT_CLASS)
    needle, at = b"p" * MIN_TEXT, 0
    while (start := classes.find(needle, at)) >= 0:
        ends = [found for found in (classes.find(b".", start), classes.find(b"z", start)) if found >= 0]
        end = min(ends, default=len(classes))
        yield start, end, "latin-1"
        at = end
    if b"pz" * MIN_TEXT in classes or b"zp" * MIN_TEXT in classes:
        for found in _UTF16_RUNS.finditer(classes):
            start, end = found.span()
            yield start, end, "utf-16-le" if classes[start] == 0x70 else "utf-16-be"


def _inflate(data: bytes, budget: _Budget) -> bytes | None:
    """data inflated if it starts as a gzip or zlib stream, within MAX_INFLATE and the budget."""
    if data[:2] == b"\x1f\x8b":
        wbits = 16 + zlib.MAX_WBITS
    elif len(data) >= 2 and data[0] == 0x78 and (data[0] << 8 | data[1]) % 31 == 0:
        wbits = zlib.MAX_WBITS
    else:
        return None
    limit = min(MAX_INFLATE, budget.left)
    try:
        inflated = zlib.decompressobj(wbits).decompress(data, limit)
    except zlib.error:
        return None
    return inflated if budget.take(len(inflated)) else None


def _decode_runs(view: _View, depth: int, budget: _Budget, stretches: list[tuple[int, int]] | None) -> list[_View]:
    """Views of the base64 and hex runs of view; the long standard-base64 ones go into stretches."""
    text = view.text
    base64_runs: list[tuple[int, int, bytes]] = []
    hex_runs: list[tuple[int, int, bytes]] = []
    octets = text.encode("latin-1", "replace")  # one octet per character: positions stay
    hex_marks = octets.translate(_HEX_RUN_CLASS)
    # The loops below run once per run (tens of thousands in a lockfile): kept lean.
    repeats = None if type(view.origin) in (_Root, _Run) else view.repeats_parent
    breaks = b"\n" in octets or b"\r" in octets
    for start, end in _alphabet_runs(octets.translate(_B64_CLASS), MIN_BASE64_RUN):
        if (repeats is not None and repeats(start, end)) or hex_marks.find(0, start, end) < 0:
            continue  # hex is base64 too, but base64 of a secret is never hex: the hex runs below do
        run = _without_breaks(octets[start:end]) if breaks else octets[start:end]
        if len(run) < MIN_BASE64_RUN:
            continue
        padded = end + 2 if text.startswith("==", end) else end + 1 if text.startswith("=", end) else end
        base64_runs.append((start, padded, run))  # the padding is part of what carries it
        if stretches is not None and end - start >= ELIDE_RUN and len(run) == end - start and not (b"-" in run or b"_" in run):
            stretches.append((start, end))
    # Hex runs on their own, so that hex pasted after other letters ("x414b...") still decodes.
    for start, end in _alphabet_runs(hex_marks, MIN_HEX_RUN):
        run = _without_breaks(octets[start:end]) if breaks else octets[start:end]
        if len(run) >= MIN_HEX_RUN and not (repeats is not None and repeats(start, end)):
            hex_runs.append((start, end, run))
    for start, end in _separated_hex_stretches(octets):
        for found in _SEPARATED_HEX.finditer(text, start, end):
            if not (repeats is not None and repeats(*found.span())):
                hex_runs.append((*found.span(), _NOT_HEX.sub("", found.group()).encode()))
    views: list[_View] = []
    for alignment in range(4):
        views += _decode_batch(view, depth, budget, base64_runs, alignment, _BASE64)
    for alignment in range(2):
        views += _decode_batch(view, depth, budget, hex_runs, alignment, _HEX)
    return views


def _separated_hex_stretches(octets: bytes) -> Iterator[tuple[int, int]]:
    """Stretches of hex digits, separators and x around each place where separated hex bytes
    stand three in a row (the regex that reads them has no literal to skip ahead to)."""
    classes = octets.translate(_HEX_CLASS)
    if b"s" not in classes:
        return
    at = 0
    while True:
        hints = [found for found in (classes.find(hint, at) for hint in _SEPARATED_HEX_HINTS) if found >= 0]
        if not hints:
            return
        hint = min(hints)
        start = classes.rfind(b".", 0, hint) + 1
        end = classes.find(b".", hint)
        end = len(classes) if end < 0 else end
        yield start, end
        at = end


def _a2b_base64(chunk: bytes) -> bytes:
    if b"-" in chunk or b"_" in chunk:
        chunk = chunk.translate(_URLSAFE_TO_STANDARD)
    return binascii.a2b_base64(chunk)


class _Codec(NamedTuple):
    group: int                    # characters per group
    group_bytes: int              # bytes a group decodes to
    cut: tuple[int, ...]          # per length % group of a run's tail: characters cut from it ...
    fill: tuple[bytes, ...]       # ... or added to it, to make whole groups
    decode: Callable[[bytes], bytes]


# A base64 tail of 2 or 3 characters is filled with "A": it decodes to its bytes and then NULs,
# where "=" would end the whole decoder call (runs are decoded many to a call). A tail of 1
# character (6 bits, no byte) is cut, as is an odd hex digit.
_BASE64 = _Codec(4, 3, (0, 1, 0, 0), (b"", b"", b"AA", b"A"), lambda chunk: _a2b_base64(chunk))
_HEX = _Codec(2, 1, (0, 1), (b"", b""), binascii.a2b_hex)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x78\x9c", b"\x78\xda", b"\x78\x01", b"\x78\x5e")  # gzip, zlib


def _decode_batch(view: _View, depth: int, budget: _Budget, runs: list[tuple[int, int, bytes]], alignment: int,
                  codec: _Codec) -> list[_View]:
    """Views of the text in runs decoded from alignment on, all runs in one decoder call."""
    group, cut, fill = codec.group, codec.cut, codec.fill
    # Inline, no call per run: a lockfile has tens of thousands of runs.
    chunks = [run[alignment:len(run) - cut[tail]] + fill[tail] for _, _, run in runs
              for tail in ((len(run) - alignment) % group,)]
    if not chunks:
        return []
    ends = [chars // group * codec.group_bytes for chars in itertools.accumulate(map(len, chunks))]
    if not budget.take(ends[-1]):
        return []
    data = codec.decode(b"".join(chunks))
    views: list[_View] = []

    def add(piece: bytes, encoding: str, run_index: int) -> None:
        start, end, _ = runs[run_index]
        views.append(_View(piece.decode(encoding, "replace"), _Run(view.origin.to_root(start, end)), depth))

    for start, end, encoding in _text_spans(data):
        first = bisect.bisect_right(ends, start)
        while start < end:  # a stretch that runs from one run's decoding into the next is cut there
            stop = min(end, ends[first])
            if stop - start >= MIN_TEXT:
                add(data[start:stop], encoding, first)
            start, first = stop, first + 1
    for index, start in enumerate([0, *ends[:-1]]):  # a gzip or zlib stream where a run's decoding starts
        if data.startswith(_COMPRESSED_MAGIC, start) and (inflated := _inflate(data[start:ends[index]], budget)):
            for text_start, text_end, encoding in _text_spans(inflated):
                add(inflated[text_start:text_end], encoding, index)
    return views


def _cumulative(sizes: Iterable[int]) -> Iterator[int]:
    total = 0
    for size in sizes:
        total += size
        yield total


# -- scanning ------------------------------------------------------------------------------------


class JoinedText(str):
    """Field values joined end to end; ``seams`` are the offsets where a field begins or ends."""

    seams: frozenset[int]

    def __new__(cls, text: str, seams: Iterable[int]) -> JoinedText:
        joined = super().__new__(cls, text)
        joined.seams = frozenset(seams)
        return joined


@dataclass(frozen=True)
class DlpMatch:
    pattern: str  # pattern name, e.g. "aws_access_key_id" or "pipelock:DLP-AWS Access Key"
    where: str  # "url", "header:<name>", "header-name:#<index>", "body", "request"
    # Character offsets [start, end) in the text that was scanned of what carries the match: the
    # secret, or the whole encoded run or escape it was decoded from. Never the matched text
    # itself, which must not reach a log.
    span: tuple[int, int] | None = field(default=None, compare=False)


def _hits(text: str, first_only: bool) -> list[tuple[str, tuple[int, int] | None]]:
    """(pattern, span in text) of the matches in text and its views; one per pattern if first_only."""
    analysis = analyse(text)
    skip: set[str] | None = set() if first_only else None
    seams = getattr(text, "seams", _NO_SEAMS)
    found: list[tuple[str, tuple[int, int] | None]] = []
    if analysis.base64_stretches and not seams:
        # A base64 image is most of a large Messages API body, and only the AWS ID rules can
        # match inside a standard-base64 run: the others need "-", "_", "." or a boundary that
        # no run has inside it. So they see the text with each long run cut to its two ends.
        found += [(name, (start, end)) for name, start, end in _rule_hits(text, seams, skip, _IN_BASE64)]
        kept, at = [], 0
        for start, end in analysis.base64_stretches:
            kept.append((at, start + FIELD_EDGE))
            at = end - FIELD_EDGE
        kept.append((at, len(text)))
        elided = "\x00".join(text[start:end] for start, end in kept)
        starts = [0, *_cumulative(end - start + 1 for start, end in kept)]
        for name, start, end in _rule_hits(elided, seams, skip, _NOT_IN_BASE64):
            index = bisect.bisect_right(starts, start) - 1
            shift = kept[index][0] - starts[index]
            found.append((name, (start + shift, end + shift)))
    else:
        found += [(name, (start, end)) for name, start, end in _rule_hits(text, seams, skip)]
    derived = analysis.views[1:]
    if derived:
        joined = "\x00".join(view.text for view in derived)  # no rule matches across a NUL
        starts = [0, *_cumulative(len(view.text) + 1 for view in derived)]
        for name, start, end in _rule_hits(joined, _NO_SEAMS, skip):
            index = bisect.bisect_right(starts, start) - 1
            found.append((name, derived[index].origin.to_root(start - starts[index], end - starts[index])))
    if analysis.exhausted:
        found.append((DECODE_LIMIT, None))
    return list(dict.fromkeys(found))  # a match in a region decoded in place is also in the text


def scan_text(text: str, where: str) -> list[DlpMatch]:
    """Rules over text and its decoded views; at most one match per pattern."""
    return [DlpMatch(name, where, span) for name, span in _hits(text, first_only=True)]


def matching_pattern_names(text: str) -> list[str]:
    """Names of the patterns found in text or its decoded views."""
    return [match.pattern for match in scan_text(text, "")]


def open_match_start(text: str) -> int:
    """The earliest index at which an OPEN_PREFIXES match, in text or a decoded view of it, runs
    to the end of text; len(text) if none (bodies.WindowScanner carries text from there)."""
    earliest = len(text)
    views = analyse(text).views
    for view in views:
        if view.origin.to_root(len(view.text), len(view.text))[1] != len(text):
            continue  # the view ends before the text does: a match in it is complete
        tail = view.text if view is views[0] else _PARTIAL_ESCAPE.sub("", view.text)
        folded = _fold(tail)
        for prefix in _FOLDED_OPEN_PREFIXES:
            if found := prefix.search(folded):
                earliest = min(earliest, view.origin.to_root(found.start(), found.start())[0])
    return earliest


# -- fields: reassembly of values split across form fields, JSON strings, headers ------------------


class Field(NamedTuple):
    text: str               # the value as a receiver reads it (JSON string decoded, form value unquoted)
    span: tuple[int, int]   # where it sits in the text it came from, as sent
    kind: str = "value"     # "key" or "value"
    joiner: str = "\x00"    # what stands between it and the next field when each is scanned:
    #                         a key and its value read "key: value" ("key=value" in a form)
    key: str = ""           # for a value: the key it is the value of, when it has one


JSON_MEDIA = ("application/json",)
FORM_MEDIA = "application/x-www-form-urlencoded"
MULTIPART_MEDIA = "multipart/form-data"
MAX_JSON_CHARS = 32 << 20  # redact_body parses JSON up to this size
FIELD_EDGE = 512           # characters of each end of a long field kept when fields are joined

_JSON_TOKEN = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"(\s*:\s*)?', re.DOTALL)  # a string, and the colon if a key


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media in JSON_MEDIA or media.endswith("+json")


def sniff_content_type(text: str) -> str:
    """A content type for a body whose sender named none (or egress was not told): JSON when it
    opens like JSON, a form when it reads like one, else ""."""
    if re.match(r"\s*[\[{]", text):
        return "application/json"
    if re.match(r"[A-Za-z0-9_.~%+*-]+=[^\s]*(?:&|\Z)", text[:4096]):
        return FORM_MEDIA
    return ""


def body_fields(text: str, content_type: str) -> Iterator[Field] | None:
    """The fields of a body in order (keys and values), or None when the content type has none.
    JSON: every string, keys too, found by a scan for string tokens (an invalid body still gives
    its strings); forms: names and values, unquoted; multipart: each part's name, filename and body."""
    media = media_type(content_type)
    if is_json(content_type):
        return _json_fields(text)
    if media == FORM_MEDIA:
        return _form_fields(text, 0, len(text))
    if media == MULTIPART_MEDIA:
        boundary = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
        return _multipart_fields(text, boundary.group(1)) if boundary else None
    return None


def _json_string_value(inner: str) -> str:
    """A JSON string's value from what stands between its quotes."""
    if "\\" not in inner:
        return inner
    try:
        return json.loads(f'"{inner}"')
    except ValueError:  # not valid JSON: read its escapes as JavaScript would
        return _ESCAPE_STAGES[1].run.sub(lambda found: _decode_escapes(found.group()), inner)


def _json_fields(text: str) -> Iterator[Field]:
    key_token: re.Match[str] | None = None  # a key, until the token after it tells whether it is its value
    key_value = ""
    for token in _JSON_TOKEN.finditer(text):
        value = _json_string_value(token.group(1))
        key = ""
        if key_token is not None:
            pairs = token.start() == key_token.end()
            yield Field(key_value, (key_token.start(), key_token.end(1) + 1), "key", ": " if pairs else "\x00")
            key = key_value if pairs else ""
            key_token = None
        if token.group(2) is None:
            yield Field(value, (token.start(), token.end(1) + 1), "value", "\x00", key)
        else:
            key_token, key_value = token, value
    if key_token is not None:
        yield Field(key_value, (key_token.start(), key_token.end(1) + 1), "key")


def _form_fields(text: str, start: int, end: int) -> Iterator[Field]:
    for pair in re.finditer(r"[^&]+", text[start:end]):
        name, equals, value = pair.group().partition("=")
        at = start + pair.start()
        key = urllib.parse.unquote_plus(name)
        yield Field(key, (at, at + len(name)), "key", "=" if equals else "\x00")
        if equals:
            value_at = at + len(name) + 1
            yield Field(urllib.parse.unquote_plus(value), (value_at, value_at + len(value)), key=key)


def _multipart_fields(text: str, boundary: str) -> Iterator[Field]:
    delimiter = "--" + boundary
    for part in re.finditer(re.escape(delimiter) + r"\r?\n(.*?)(?=\r?\n" + re.escape(delimiter) + ")", text, re.DOTALL):
        head, _, body = part.group(1).partition("\r\n\r\n") if "\r\n\r\n" in part.group(1) else part.group(1).partition("\n\n")
        head_at = part.start(1)
        for name in re.finditer(r'\b(?:file)?name="([^"]*)"', head, re.IGNORECASE):
            yield Field(name.group(1), (head_at + name.start(1), head_at + name.end(1)), "key")
        body_at = part.end(1) - len(body)
        yield Field(body, (body_at, part.end(1)))


def url_fields(url: str) -> Iterator[Field]:
    """A URL's path segments and query names and values, unquoted, in order."""
    path_end = len(url.split("?", 1)[0])
    for segment in re.finditer(r"[^/]+", url[:path_end]):
        yield Field(urllib.parse.unquote(segment.group()), segment.span())
    if path_end < len(url):
        yield from _form_fields(url, path_end + 1, len(url.split("#", 1)[0]))


def _whole_decoding(value: str) -> str | None:
    """value decoded when all of it is base64 or hex of text (pieces shorter than a run still
    join up: "QUtJQQ==" + ...). Only pieces: a value longer than FIELD_EDGE is not one."""
    value = value.strip()
    if not 4 <= len(value) <= FIELD_EDGE:
        return None
    try:
        if _HEX_ONLY.fullmatch(value) and len(value) % 2 == 0:
            data = bytes.fromhex(value)
        elif re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", value):
            stripped = value.rstrip("=")
            data = _a2b_base64((stripped + "=" * (-len(stripped) % 4)).encode()) if len(stripped) % 4 != 1 else b""
        else:
            return None
    except (binascii.Error, ValueError):
        return None
    return data.decode("ascii") if data and data.translate(_TEXT_CLASS) == b"p" * len(data) else None


def reassembled(fields: Iterable[Field]) -> JoinedText | None:
    """Fields joined end to end, with a seam between every two; None for fewer than two fields.
    Joined: the values; the keys; the values each decoded whole (base64 or hex) where one is; and,
    per key that has several values, its values ("text" across content blocks, a form name
    repeated); and a secret's name given as a value, paired with each value next to it
    (_named_pairs). Of a long field only its first and last FIELD_EDGE characters join (the rest is
    scanned where it stands). The joins are separated by NUL, which no rule crosses."""
    values: list[str] = []
    keys: list[str] = []
    decoded: list[str] = []
    by_key: dict[str, list[str]] = {}
    decoded_any = False
    for item in fields:
        text = item.text
        if len(text) > 2 * FIELD_EDGE + 1:
            text = text[:FIELD_EDGE] + "\x00" + text[-FIELD_EDGE:]
        if item.kind == "key":
            keys.append(text)
            continue
        values.append(text)
        if item.key:
            by_key.setdefault(item.key, []).append(text)
        whole = _whole_decoding(item.text)
        decoded_any = decoded_any or whole is not None
        decoded.append(whole if whole is not None else text)
    joins = [values, keys, *(group for group in by_key.values() if len(group) < len(values))]
    if decoded_any:
        joins.append(decoded)
    # A join of one field says nothing new, but a name paired with its neighbour is a text of its own.
    joins = [join for join in joins if len(join) >= 2] + [[pair] for pair in _named_pairs(values, decoded)]
    pieces: list[str] = []
    seams: list[int] = []
    length = 0
    for join in joins:
        if pieces:
            pieces.append("\x00")
            length += 1
        for text in join:
            seams.append(length)
            pieces.append(text)
            length += len(text)
        seams.append(length)
    return JoinedText("".join(pieces), seams) if pieces else None


_SECRET_NAME = re.compile("|".join(_AWS_SECRET_NAMES), re.IGNORECASE)


def _named_pairs(values: list[str], decoded: list[str]) -> list[str]:
    """A value that is a secret's name ("AWS_SECRET_ACCESS_KEY"), written as the name of each value
    next to it, as sent and decoded: name and value in fields of their own, as in
    [{"name": ..., "value": ...}] env lists, or a form's n=<name>&v=<value> in either order."""
    pairs = []
    for index, value in enumerate(values):
        if _SECRET_NAME.fullmatch(value.strip()):
            for neighbour in (index - 1, index + 1):
                if 0 <= neighbour < len(values):
                    pairs += [f"{value}={text}" for text in dict.fromkeys((values[neighbour], decoded[neighbour]))]
    return pairs


def _each_text(fields: Sequence[Field]) -> tuple[str, list[int]]:
    """The fields' texts in one text, each followed by its joiner, and where each one starts."""
    starts, pieces, length = [], [], 0
    for item in fields:
        starts.append(length)
        pieces += [item.text, item.joiner]
        length += len(item.text) + len(item.joiner)
    return "".join(pieces), starts


def scan_fields(fields: Iterable[Field], where: str) -> list[DlpMatch]:
    """Each field (a key next to its value), then the fields reassembled; one match per pattern."""
    fields = list(fields)
    each, _ = _each_text(fields)
    matches = scan_text(each, where)
    joined = reassembled(fields)
    if joined is not None:
        matches += scan_text(joined, where)
    return _one_per_pattern(matches)


def scan_body_text(text: str, content_type: str, where: str = "body") -> list[DlpMatch]:
    """A whole body: its fields each and reassembled, for a content type that has fields (sniffed
    when content_type is empty), and its text as sent unless it is valid JSON (whose strings are
    all it can hold a secret in). One match per pattern."""
    content_type = content_type or sniff_content_type(text)
    fields = body_fields(text, content_type)
    if fields is None:
        return scan_text(text, where)
    found = scan_fields(fields, where)
    if is_json(content_type) and _parses_as_json(text):
        return found
    return _one_per_pattern(scan_text(text, where) + found)


def _one_per_pattern(matches: Iterable[DlpMatch]) -> list[DlpMatch]:
    return list({match.pattern: match for match in reversed(list(matches))}.values())[::-1]


# -- requests --------------------------------------------------------------------------------


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


_PLAIN_HEADER_NAME = re.compile(r"[a-z0-9-]{1,64}")


def header_where(name: str, index: int, name_matches: Sequence[DlpMatch] | None = None) -> str:
    """``header:<name>`` for a header, or ``header:#<index>`` when the name is itself suspect: a
    name that could carry a secret never goes into a log. name_matches: the name's scan, if done."""
    lowered = name.lower()
    suspect = name_matches if name_matches is not None else scan_text(name, "")
    return f"header:{lowered}" if _PLAIN_HEADER_NAME.fullmatch(lowered) and not suspect else f"header:#{index}"


def scan_request(parts: RequestParts) -> list[DlpMatch]:
    """URL (whole, and its segments and query fields reassembled), each header's value and name,
    the header values and names reassembled, and the body (with its fields when its
    Content-Type has them)."""
    matches = scan_text(parts.url, "url")
    matches += [match for match in scan_fields(url_fields(parts.url), "url") if match not in matches]
    content_type = ""
    for index, (name, value) in enumerate(parts.headers):
        name_matches = scan_text(name, f"header-name:#{index}")
        matches += scan_text(value, header_where(name, index, name_matches)) + name_matches
        if name.lower() == "content-type":
            content_type = value
    if len(parts.headers) > 1:
        for joined in (reassembled(Field(value, (0, 0)) for _, value in parts.headers),
                       reassembled(Field(name, (0, 0)) for name, _ in parts.headers)):
            if joined is not None:
                matches += [DlpMatch(m.pattern, "headers") for m in scan_text(joined, "headers")
                            if not any(m.pattern == seen.pattern for seen in matches)]
    if parts.body:
        matches += scan_body_text(parts.body, content_type, "body")
    return matches


# -- redaction --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redaction:
    """A text with its matches replaced by ``[REDACTED:<pattern>]`` markers.

    redacted: what was replaced (span: where it was in the original text; for a JSON body, the
    string token that carried it). unredactable: what a scan of ``text`` still finds: matches
    that have no single place to cut (a value split across fields), or text past the decode
    bound. Empty means the scan finds nothing in ``text``."""

    text: str
    redacted: list[DlpMatch]
    unredactable: list[DlpMatch]


def marker(patterns: Iterable[str]) -> str:
    return f"[REDACTED:{','.join(sorted(set(patterns)))}]"


def _cut(text: str, hits: Iterable[tuple[str, tuple[int, int] | None]]) -> tuple[str, list[tuple[str, tuple[int, int]]]]:
    """text with each hit's span replaced by a marker (overlapping spans merged into one)."""
    spans = sorted((span, name) for name, span in hits if span is not None)
    merged: list[list] = []  # [start, end, names]
    for (start, end), name in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][2].add(name)
        else:
            merged.append([start, end, {name}])
    pieces, at = [], 0
    for start, end, names in merged:
        pieces += [text[at:start], marker(names)]
        at = end
    pieces.append(text[at:])
    return "".join(pieces), [(name, span) for span, name in spans]


def redact_text(text: str, where: str = "body") -> Redaction:
    """Plain text (a non-JSON body, a header value): every match replaced in place; a match seen
    only in a decoded view replaces the whole encoded run or escape that carries it."""
    redacted_text, cut = _cut(text, _hits(text, first_only=False))
    return Redaction(redacted_text, [DlpMatch(name, where, span) for name, span in cut],
                     scan_text(redacted_text, where))


def redact(text: str) -> str:
    """text with every built-in match replaced by ``[REDACTED:<pattern>]`` (for log lines)."""
    return redact_text(text, "log").text


def redact_body(text: str, content_type: str) -> Redaction:
    """A request body with every match replaced, for routes that redact instead of blocking.

    JSON (valid, up to MAX_JSON_CHARS): each string, keys too, is decoded, its matches replaced,
    and written back as a JSON string; the rest of the body is left byte for byte, so the result
    is valid JSON of the same structure. Other bodies: as redact_text. Either way, a match that
    is only there once fields are joined has no single place to cut: it is reported as
    unredactable, as is anything a scan of the result still finds."""
    if not (is_json(content_type) and len(text) <= MAX_JSON_CHARS and _parses_as_json(text)):
        result = redact_text(text, "body")
        leftover = scan_body_text(result.text, content_type, "body")
        return Redaction(result.text, result.redacted, leftover)
    fields = list(_json_fields(text))
    each, starts = _each_text(fields)
    cuts: dict[int, list[tuple[str, tuple[int, int]]]] = {}
    uncut: list[DlpMatch] = []
    for name, span in _hits(each, first_only=False):
        index = bisect.bisect_right(starts, span[0]) - 1 if span is not None else -1
        if index >= 0 and span[1] <= starts[index] + len(fields[index].text):
            cuts.setdefault(index, []).append((name, (span[0] - starts[index], span[1] - starts[index])))
        else:
            uncut.append(DlpMatch(name, "body"))
    if not cuts:  # nothing to cut: what is left is what only the fields joined show
        joined = reassembled(fields)
        return Redaction(text, [], _one_per_pattern(uncut + (scan_text(joined, "body") if joined is not None else [])))
    pieces, at, redacted = [], 0, []
    for index in sorted(cuts):
        item = fields[index]
        new_value, done = _cut(item.text, cuts[index])
        pieces += [text[at:item.span[0]], json.dumps(new_value, ensure_ascii=False)]
        at = item.span[1]
        redacted += [DlpMatch(name, "body", item.span) for name, _ in done]
    pieces.append(text[at:])
    new_text = "".join(pieces)
    return Redaction(new_text, redacted, scan_body_text(new_text, content_type, "body"))


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- hostnames ----------------------------------------------------------------------------------

HOST_MAX_LABELS = 5        # labels left of a wildcard route's suffix
HOST_MAX_CHARS = 100       # characters left of the suffix, dots included
HOST_HEX_RUN = 20          # hex characters in a row (dots and dashes dropped) that mix digits and letters
HOST_ENCODED_CHARS = 16    # characters in all of tokens that look like data (see hostname_problem)
HOST_CONSONANT_RUN = 12    # a letters-only token this long with few vowels is refused on its own
HOST_MIN_VOWELS = 0.2      # "few vowels": fewer vowels (aeiouy) than this share of the letters ...
# A UUID as RFC 9562 writes it: lower-case hex in 8-4-4-4-12, a version digit 1-8, variant bits 10.
_UUID_LABEL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_CONSONANTS = re.compile(r"[^aeiouy]{6}")  # ... or six consonants in a row ("latchstring" has the most in English)
_BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def hostname_problem(host: str, route_host: str) -> str | None:
    """Why egress should refuse host on a wildcard route before resolving it, or None.

    Only the labels left of the route's suffix count (the agent chose them); an exact route, or a
    host outside the route, gives None. Pass host as the agent sent it: a resolver forwards the
    case of a name, so mixed case can carry base64, and is itself a sign of it.

    ``hostname_secret``: a rule matches a label, the labels joined (with and without the dots),
    or their decodings (the module's views, plus base32 and hex of the letters and digits joined
    at every alignment).

    ``hostname_encoded``: the name looks like data rather than a name:
      - more than HOST_MAX_LABELS labels or HOST_MAX_CHARS characters;
      - a run of HOST_HEX_RUN hex characters mixing digits and letters, once dots and dashes are
        dropped (a 32-character hex label, or hex spread over several labels);
      - tokens (label parts between ".", "-" and "_") that look like data, HOST_ENCODED_CHARS
        characters of them in all, one label or several: tokens that mix letters and digits
        (base32, base36, base64), tokens that mix upper and lower case past a first capital
        (base64 with its case kept), and letters-only tokens of 5 or more that read as random letters: fewer than
        HOST_MIN_VOWELS vowels, or six consonants in a row. Numbers and words do not count;
      - such a letters-only token of HOST_CONSONANT_RUN letters or more on its own.
    One label that is a UUID in its canonical form (a SaaS tenant's subdomain) is left out of
    these counts: a channel of 122 bits per name, which the secret rules above still read.
    So "d111111abcdef8" (CloudFront, 14 mixed characters), "us-east-1", "my-api-v2", "pr-1234",
    "abc123", "logs-2024-01-15-backup" and S3-style names of words and dashes pass; 20 random
    base32 characters, in one label or in several, almost never do, and neither do AWS Lambda
    function URL ids (32 random characters): give such hosts an exact route. Low-rate channels
    (a word list, a dozen random characters per name) are not stopped here."""
    sent, route_host = host.strip().rstrip("."), route_host.strip().lower()
    host = sent.lower()
    if not route_host.startswith("*."):
        return None
    suffix = route_host[1:]
    if not host.endswith(suffix) or len(host) <= len(suffix):
        return None
    left, left_sent = host[:-len(suffix)], sent[:-len(suffix)]
    labels, labels_sent = left.split("."), left_sent.split(".")
    compact = re.sub(r"[^a-z0-9]", "", left)
    texts = [JoinedText(text, _cumulative([0, *map(len, text.split("."))])) for text in {left.replace(".", ""), left_sent.replace(".", "")}]
    texts += [left, left_sent, *labels, *labels_sent]
    if any(scan_text(text, "host") for text in [*texts, *_base32_and_hex(compact)]):
        return "hostname_secret"
    if len(labels) > HOST_MAX_LABELS or len(left) > HOST_MAX_CHARS:
        return "hostname_encoded"
    # One label that is a UUID (a tenant's id) is a name, not data; the rest is judged without it.
    # As sent: the case of its letters could carry more.
    tenant = next((index for index, label in enumerate(labels_sent) if _UUID_LABEL.fullmatch(label)), None)
    if tenant is not None:
        left = ".".join(labels[:tenant] + labels[tenant + 1:])
        left_sent = ".".join(labels_sent[:tenant] + labels_sent[tenant + 1:])
        compact = re.sub(r"[^a-z0-9]", "", left)
    if any(re.search(r"\d", run) and re.search(r"[a-f]", run)
           for run in re.findall(r"[0-9a-f]{%d,}" % HOST_HEX_RUN, compact)):
        return "hostname_encoded"
    encoded = 0
    for token in re.findall(r"[A-Za-z0-9]+", left_sent):
        lower = token.lower()
        if token.isdigit():
            continue
        if not token.isalpha() or (token[1:] != lower[1:] and token[1:] != token[1:].upper()):
            encoded += len(token)  # letters and digits, or upper and lower case, mixed
        elif len(token) >= 5 and (sum(map(lower.count, "aeiouy")) < HOST_MIN_VOWELS * len(token)
                                  or _CONSONANTS.search(lower) is not None):
            if len(token) >= HOST_CONSONANT_RUN:
                return "hostname_encoded"
            encoded += len(token)  # random letters
    return "hostname_encoded" if encoded >= HOST_ENCODED_CHARS else None


def _base32_and_hex(compact: str) -> Iterator[str]:
    """compact decoded as base32 (every alignment) and hex (both), where it decodes to text."""
    if len(compact) >= 8 and all(char in _BASE32_ALPHABET for char in compact):
        for alignment in range(8):
            chunk = compact[alignment:]
            chunk = chunk[:len(chunk) // 8 * 8]
            if chunk:
                data = _b32decode(chunk)
                for start, end, encoding in _text_spans(data):
                    yield data[start:end].decode(encoding, "replace")
    if len(compact) >= 8 and _HEX_ONLY.fullmatch(compact):
        for alignment in range(2):
            chunk = compact[alignment:]
            data = bytes.fromhex(chunk[:len(chunk) // 2 * 2])
            for start, end, encoding in _text_spans(data):
                yield data[start:end].decode(encoding, "replace")


def _b32decode(chunk: str) -> bytes:
    bits = 0
    for char in chunk:
        bits = bits << 5 | _BASE32_ALPHABET.index(char)
    return bits.to_bytes(len(chunk) * 5 // 8, "big")

