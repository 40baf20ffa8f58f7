"""The secret scan of a push: every place where a pushed commit or tag can carry text to the upstream,
read from git as a stream and scanned with dlp's built-in floor, then pipelock's scan API when
configured (``SecretScanner``).

The places, for each new commit (``git cat-file``, ``git log``):

- every header of the raw object, each its own place: author, committer, encoding, gpgsig,
  mergetag, any header git keeps and does not know (its name is never repeated in a reason);
- the message as stored, and, when an encoding header is set, as git decodes it (a message stored
  as UTF-7 reads "+AEEASwBJ..." raw and the secret decoded);
- the lines its diff adds (a combined diff for merges), which holds symlink targets (a symlink's
  blob is its target) and gitlinks (``Subproject commit <id>``; their URLs are added lines of
  ``.gitmodules``);
- the names of the paths it adds, directories included, found by comparing trees with rename
  detection off (a rename keeps the blob, so it adds no line; a new directory that holds only an
  empty tree adds no file), read NUL-separated so odd bytes arrive raw, not quoted;

for each new annotated tag object, its headers (object, type, tag, tagger, ...) and message; and the
name of every ref the push updates.

Values split across lines (JOINING): a place of several lines is also scanned with its lines joined.
Each line break goes, with the whitespace around it and with string syntax at its edges (a closing
quote with a following ``+ . , &`` or ``\\``, an opening quote with a leading operator), so
``key = "AKIA1234" +`` / ``"5678..."`` reads ``key = "AKIA12345678..."``. Every run of consecutive
lines is joined whole, however many lines it has (one pass, so the work stays linear): a key cut
into twenty one-character lines is whole again. A run ends where the place's lines stop being
consecutive: a context or removed line, a hunk, a file. In a path the ``/`` are removed too.

Bounds: a push makes the scan read at most MAX_SCAN_BYTES of text from git (the joined views, at most
as much again, are not counted), within SCAN_TIMEOUT_S, and no object bigger than
MAX_SCAN_OBJECT_BYTES (the policy refuses such a push before reading anything). Lines and records
arrive in pieces of LINE_PIECE_BYTES, so no giant line or name is held whole.

Batching: the places of all commits of a push are written, separated by PLACE_SEPARATOR (which no
pattern crosses), into windows of about SCAN_WINDOW_CHARS: one scanner call each, however many
commits the push has. A place longer than a window is cut, each piece repeating the end of the one
before (SCAN_OVERLAP_CHARS, more while a match may still be open). A window with a finding is split
in halves, and the halves scanned again, until each finding has its place (at most
MAX_ATTRIBUTION_CALLS more calls a push: past them a finding is named by the first place of its
window). Reasons name the place and the pattern, never the text.
"""

from __future__ import annotations

import codecs
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NoReturn, Sequence

from bottle_tasks.sidecars import dlp, pipelock_scan
from bottle_tasks.sidecars.gitgate.git import GitStream

MAX_SCAN_OBJECT_BYTES = 32 * 1024 * 1024
MAX_SCAN_BYTES = 64 * 1024 * 1024
SCAN_TIMEOUT_S = 300.0
SCAN_WINDOW_CHARS = 1024 * 1024
SCAN_OVERLAP_CHARS = 4096          # longer than any pattern's match
LINE_PIECE_BYTES = 64 * 1024       # a longer line (or name) is read, and scanned, in pieces
RUN_CHUNK_BYTES = 64 * 1024        # the text of a place is decoded and joined this much at a time
PLACE_SEPARATOR = "\n\n#\n\n"      # between places in one scanner call: no pattern matches across "#"
MAX_RAW_ENTRY_BYTES = 1024 * 1024  # a `git log --raw` status record (modes and ids, one per parent)
MAX_ATTRIBUTION_CALLS = 64         # scanner calls a push may spend on finding where its findings are
SHORT_ID = 12
NO_REPLACE = "--no-replace-objects"  # the scan reads what is pushed, never a replacement the mirror knows
MOST_OVERSIZED = 5


class SecretScanner:
    """dlp's built-in patterns, then pipelock's scan API when configured. Returns pattern names only."""

    def __init__(self, pipelock: pipelock_scan.PipelockClient | None = None):
        self.pipelock = pipelock

    def scan(self, text: str) -> list[str]:
        """Pattern names found in text. Raises pipelock_scan.DlpUnavailable when pipelock cannot give a verdict."""
        found = dlp.matching_pattern_names(text)
        if not found and self.pipelock is not None and text.strip():
            matches = self.pipelock.scan(dlp.RequestParts("", (), text), locate=False)
            found = list(dict.fromkeys(match.pattern for match in matches))  # a rule matched twice is named once
        return found


class ScanRefused(Exception):
    """The push is more than the secret scan reads; it is rejected (git-gate forwards nothing it has not scanned)."""


@dataclass
class ScanBudget:
    """How much text one push may make the scan read, in all (its refs share it), and until when."""

    limit: int = MAX_SCAN_BYTES
    spent: int = 0
    seconds: float = SCAN_TIMEOUT_S
    deadline: float = 0.0  # monotonic; from seconds when not given

    def __post_init__(self) -> None:
        self.deadline = self.deadline or time.monotonic() + self.seconds

    def spend(self, n: int) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise ScanRefused(f"the push adds more than {mib(self.limit)} of text, more than the secret scan "
                              "reads in one push; push it in smaller pieces")
        if time.monotonic() > self.deadline:
            raise ScanRefused(f"the secret scan of the push took longer than {self.seconds:.0f} s; "
                              "push it in smaller pieces")

    def remaining(self) -> float:
        """What is left of the time, for a git the scan runs (it is killed past it)."""
        return max(self.deadline - time.monotonic(), 0.01)


@dataclass(frozen=True)
class Place:
    """Where a text rides in a push: ``what`` of the ``kind`` ("commit", "tag") with id ``owner``,
    or the name of a ref (kind "ref", owner the ref); ``view`` when the text is a view of it (joined)."""

    what: str
    kind: str
    owner: str
    view: str = ""

    def describe(self) -> str:
        return f"{self.what} of {self.kind} {self.owner[:SHORT_ID]}" + (f", {self.view}" if self.view else "")

    def seen(self, view: str) -> Place:
        """The same place seen another way (on top of any view it is already)."""
        return Place(self.what, self.kind, self.owner, f"{self.view}, {view}" if self.view else view)

    def derives_from(self, other: Place) -> bool:
        return ((self.what, self.kind, self.owner) == (other.what, other.kind, other.owner)
                and self.view != other.view and self.view.startswith(other.view))


class PushScan:
    """The texts of one push, scanned together in windows (one scanner call each); a window with a
    finding is halved until each finding has its place. ``findings``: place -> pattern names."""

    def __init__(self, scanner: SecretScanner, budget: ScanBudget):
        self.scanner = scanner
        self.budget = budget
        self.findings: dict[Place, list[str]] = {}
        self._window: list[tuple[Place, str]] = []
        self._size = 0
        self._attribution_calls = MAX_ATTRIBUTION_CALLS

    def add(self, place: Place, text: str) -> None:
        if self._window and self._size + len(text) > SCAN_WINDOW_CHARS:
            self.flush()
        self._window.append((place, text))
        self._size += len(text) + len(PLACE_SEPARATOR)

    def flush(self) -> None:
        window, self._window, self._size = self._window, [], 0
        if window:
            found = self.scanner.scan(_together(window))
            if found:
                self._attribute(window, found)

    def _attribute(self, window: list[tuple[Place, str]], found: list[str]) -> None:
        if len(window) == 1:
            self._record(window[0][0], found)
            return
        explained = False
        if self._attribution_calls >= 2:
            self._attribution_calls -= 2
            half = len(window) // 2
            for part in (window[:half], window[half:]):
                part_found = self.scanner.scan(_together(part))
                if part_found:
                    explained = True
                    self._attribute(part, part_found)
        if not explained:  # out of calls, or only the places together match (a scanner reading past the separator)
            first = window[0][0]
            self._record(Place(first.what, first.kind, first.owner, "together with the places after it"), found)

    def _record(self, place: Place, found: Iterable[str]) -> None:
        names = self.findings.setdefault(place, [])
        names += [name for name in found if name not in names]


def _together(window: list[tuple[Place, str]]) -> str:
    return PLACE_SEPARATOR.join(text for _place, text in window)


class PlaceText:
    """One place's text as it streams in (charged to the budget unless it is a derived view), handed
    to the push scan in chunks of at most SCAN_WINDOW_CHARS (writes are far smaller); each chunk
    starts with the end of the one before, so a secret across a cut is whole in one of them."""

    def __init__(self, push: PushScan, place: Place, *, charged: bool = True):
        self.push = push
        self.place = place
        self.charged = charged
        self._parts: list[str] = []
        self._size = 0
        self._carry = ""

    def write(self, text: str) -> None:
        if not text:
            return
        if self.charged:
            self.push.budget.spend(len(text))
        full = max(SCAN_WINDOW_CHARS, 2 * len(self._carry))  # a long carry doubles: linear work overall
        if self._parts and len(self._carry) + self._size + len(text) > full:
            sent = self._emit()
            keep_from = min(max(len(sent) - SCAN_OVERLAP_CHARS, 0), dlp.open_match_start(sent))
            self._carry = sent[keep_from:]
        self._parts.append(text)
        self._size += len(text)

    def _emit(self) -> str:
        text = self._carry + "".join(self._parts)
        self._parts, self._size = [], 0
        self.push.add(self.place, text)
        return text

    def close(self) -> None:
        if self._parts:
            self._emit()
        self._parts, self._size, self._carry = [], 0, ""


_INLINE_SPACE = re.compile(r"[^\S\n]+")
# A line break with what JOINING removes around it (spaces are single once _INLINE_SPACE has run).
# Each branch starts with a character it needs: the regex engine skips ahead to one (3x faster).
_JUNCTION = re.compile(r"""(?:["'`] ?[+.,&]? ?\\? ?\n|\\ ?\n| \\ ?\n| \n|\n) ?(?:[+.,&] ?["'`]|["'`])?""")


def joined_lines(text: str) -> str:
    """text with its line breaks joined (module docstring, JOINING)."""
    return _JUNCTION.sub("", _INLINE_SPACE.sub(" ", text))


class _Lines:
    """A place made of lines, fed as raw line pieces: written as it is and joined (JOINING), in chunks
    of about RUN_CHUNK_BYTES cut at line ends, so that the work is done in bulk, not line by line."""

    def __init__(self, push: PushScan, place: Place):
        self.plain = PlaceText(push, place)
        self.joined = PlaceText(push, place.seen("joined across line breaks"), charged=False)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # secrets are ASCII
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.run_open = False  # the pending text continues a run that is partly written
        self.cut_in_line = False  # ... and the cut before it fell inside a line

    def feed(self, raw: bytes) -> None:
        self.pending.append(raw)
        self.pending_size += len(raw)
        if self.pending_size >= RUN_CHUNK_BYTES and (raw.endswith(b"\n") or self.pending_size >= 2 * RUN_CHUNK_BYTES):
            self._write(run_ends=False)

    def end_run(self) -> None:
        """The run of consecutive lines ends here: what comes next is not joined to it."""
        if self.pending:
            self._write(run_ends=True)
        elif self.run_open:
            self.joined.write("\n")
            self.run_open = False

    def _write(self, run_ends: bool) -> None:
        text = self.decoder.decode(b"".join(self.pending))
        self.pending, self.pending_size = [], 0
        self.plain.write(text)
        if self.run_open or not run_ends or "\n" in text.rstrip("\n"):  # a run of one line joins to itself
            # a run cut at a line end goes on after a line break (the chunk before has dropped it)
            self.joined.write(joined_lines(("\n" if self.run_open and not self.cut_in_line else "") + text)
                              + ("\n" if run_ends else ""))
        self.run_open, self.cut_in_line = not run_ends, not text.endswith("\n")

    def close(self) -> None:
        self.end_run()
        self.plain.close()
        self.joined.close()


# ---------------------------------------------------------------------------------------------
# what a push brings


@dataclass
class NewObjects:
    """The objects a ref update brings that no ref of the mirror reaches yet."""

    commits: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    oversized: list[str] = field(default_factory=list)  # "<type> <id> (<size>, <path>)", at most MOST_OVERSIZED


def new_objects(repo_dir: Path, new: str, budget: ScanBudget, env: Mapping[str, str] | None = None,
                limit: int = MAX_SCAN_OBJECT_BYTES) -> NewObjects:
    """Streams ``rev-list --objects`` through ``cat-file --batch-check``: no object is read. Stops at
    the MOST_OVERSIZED-th object larger than limit (the push is refused then)."""
    listing = subprocess.Popen(["git", NO_REPLACE, "rev-list", "--objects", new, "--not", "--all"], cwd=repo_dir,
                               env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    found = NewObjects()
    try:
        with GitStream([NO_REPLACE, "cat-file", "--batch-check=%(objectsize) %(objecttype) %(objectname) %(rest)"],
                       repo_dir, env, stdin=listing.stdout, timeout=budget.remaining()) as sizes:
            assert listing.stdout is not None
            listing.stdout.close()  # cat-file holds it now
            line_start = True
            for raw in sizes.lines(8192):
                starts, line_start = line_start, raw.endswith(b"\n")
                if not starts:
                    continue  # the rest of a long path
                size_text, kind, oid, path = (raw.decode("utf-8", "replace").rstrip("\n").split(" ", 3) + [""] * 3)[:4]
                if kind == "commit":
                    found.commits.append(oid)
                elif kind == "tag":
                    found.tags.append(oid)
                if size_text.isdigit() and int(size_text) > limit:
                    shown = _shown_path(path)
                    found.oversized.append(f"{kind} {oid} ({mib(int(size_text))}{', ' + shown if shown else ''})")
                    if len(found.oversized) >= MOST_OVERSIZED:
                        return found
            sizes.close("cat-file")
    finally:
        if listing.poll() is None:
            listing.kill()
        if listing.wait() not in (0, -signal.SIGKILL, -signal.SIGPIPE) and not found.oversized:
            raise RuntimeError("git rev-list --objects failed")
    return found


def _shown_path(path: str) -> str:
    """A path the agent chose, fit for a reason: printable, short, no built-in secret in it."""
    flat = "".join(ch if ch.isprintable() else "?" for ch in path[:200])
    return dlp.redact(flat)


# ---------------------------------------------------------------------------------------------
# reading the places from git


def scan_push(repo_dir: Path, refs: Sequence[str], commits: Sequence[str], tags: Sequence[str],
              scanner: SecretScanner, budget: ScanBudget, env: Mapping[str, str] | None = None) -> dict[Place, list[str]]:
    """Every place of the push (module docstring) scanned: place -> pattern names, only places with a finding.
    Raises ScanRefused (over the budget), pipelock_scan.DlpUnavailable, RuntimeError (git failed)."""
    push = PushScan(scanner, budget)
    for ref in refs:
        name = PlaceText(push, Place("the ref name", "ref", ref))
        name.write(ref)
        name.close()
    decoded = _scan_objects(repo_dir, [*commits, *tags], push, env)
    if commits:
        _scan_added_lines(repo_dir, commits, push, env)
        _scan_new_names(repo_dir, commits, push, env)
    if decoded:
        _scan_decoded_messages(repo_dir, decoded, push, env)
    push.flush()
    return _named_once(push.findings)


def _named_once(findings: dict[Place, list[str]]) -> dict[Place, list[str]]:
    """A pattern found in a text is found again in its views (joined, decoded): named where first seen."""
    named = {}
    for place, names in findings.items():
        before = {name for other, found in findings.items() if place.derives_from(other) for name in found}
        if kept := [name for name in names if name not in before]:
            named[place] = kept
    return named


def _header_what(name: str) -> str:
    if name in ("author", "committer", "tagger"):
        return f"the {name}"
    if name in ("tree", "parent", "encoding", "gpgsig", "gpgsig-sha256", "mergetag", "object", "type", "tag"):
        return f"the {name} header"
    return "an unknown header"  # its name is the agent's text: not repeated


class _RawObject:
    """A commit or tag object as stored, fed line piece by line piece: each header a place, then the message."""

    def __init__(self, push: PushScan, kind: str, oid: str):
        self.push, self.kind, self.oid = push, kind, oid
        self.current: _Lines | None = None
        self.in_message = False
        self.line_start = True
        self.encoding = ""

    def feed(self, raw: bytes) -> None:
        starts, self.line_start = self.line_start, raw.endswith(b"\n")
        if starts and not self.in_message:
            if raw == b"\n":
                self._begin("the message")
                self.in_message = True
                return
            if self.current is None or not raw.startswith(b" "):  # " " continues the header before
                name = raw.split(b" ", 1)[0].rstrip(b"\n").decode("utf-8", "replace")
                self._begin(_header_what(name))
                if name == "encoding":
                    self.encoding = raw[len(b"encoding "):200].decode("ascii", "replace").strip()
        assert self.current is not None
        self.current.feed(raw)

    def _begin(self, what: str) -> None:
        if self.current is not None:
            self.current.close()
        self.current = _Lines(self.push, Place(what, self.kind, self.oid))

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    @property
    def reencoded(self) -> bool:
        """git shows the message decoded from its encoding header (UTF-8 is shown as stored)."""
        return self.kind == "commit" and self.encoding.lower() not in ("", "utf-8", "utf8")


def _scan_objects(repo_dir: Path, oids: Sequence[str], push: PushScan, env: Mapping[str, str] | None) -> list[str]:
    """Headers and messages of the raw objects (``cat-file --batch``); returns the commits whose
    message an encoding header makes git show otherwise."""
    if not oids:
        return []
    decoded = []
    with GitStream([NO_REPLACE, "cat-file", "--batch"], repo_dir, env, input=_lines_of(oids),
                   timeout=push.budget.remaining()) as cat:
        for oid in oids:
            header = cat.stdout.readline(512).decode("ascii", "replace").split()
            if len(header) != 3 or header[0] != oid or header[1] not in ("commit", "tag") or not header[2].isdigit():
                _cut_short(cat, f"object {oid} could not be read")
            remaining = int(header[2])
            obj = _RawObject(push, header[1], oid)
            while remaining:
                raw = cat.stdout.readline(min(LINE_PIECE_BYTES, remaining))
                if not raw:
                    _cut_short(cat, f"object {oid} ends early")
                remaining -= len(raw)
                obj.feed(raw)
            obj.close()
            cat.stdout.read(1)  # the newline after each object
            if obj.reencoded:
                decoded.append(oid)
        cat.close("cat-file")
    return decoded


def _cut_short(cat: GitStream, what: str) -> NoReturn:
    """cat-file's answer stopped: its own failure (a timeout) says why, else what stopped."""
    cat.process.kill()
    cat.close("cat-file")
    raise RuntimeError(what)


def _lines_of(oids: Iterable[str]) -> bytes:
    return "".join(f"{oid}\n" for oid in oids).encode()


def _marker() -> str:
    return f"\x1egit-gate-{secrets.token_hex(12)}"  # unguessable: content cannot fake a boundary


def _log(*options: str) -> list[str]:
    # --no-walk=unsorted: exactly the commits given on stdin, in their order
    return [NO_REPLACE, "log", "--no-walk=unsorted", "--stdin", "--no-color", *options]


def _scan_added_lines(repo_dir: Path, commits: Sequence[str], push: PushScan, env: Mapping[str, str] | None) -> None:
    """What each commit's diff adds (combined diff for merges; removed and context lines dropped)."""
    marker = _marker()
    args = _log("-p", "--cc", "--root", "--text", "--no-ext-diff", "--no-textconv", "--find-renames",
                "--irreversible-delete", "--submodule=short", f"--format=tformat:{marker}%H")
    tag = marker.encode()
    with GitStream(args, repo_dir, env, input=_lines_of(commits), timeout=push.budget.remaining()) as log:
        added = _Lines(push, Place("the added lines", "commit", ""))  # replaced at the first commit
        columns, keep, line_start = 0, False, True  # columns: a hunk's prefix width (its parents), 0 outside hunks
        for raw in log.lines(LINE_PIECE_BYTES):  # the hot loop: one pass of a few tests a line
            if not line_start:  # the rest of a long line
                line_start = raw.endswith(b"\n")
                if keep:
                    added.feed(raw)
                continue
            line_start = raw.endswith(b"\n")
            if columns and b"+" in raw[:columns]:  # added against a parent ("@@", "diff" have no "+" there)
                keep = True
                added.feed(raw[columns:])
                continue
            keep = False
            added.end_run()
            if raw.startswith(b"@@"):
                columns = len(raw) - len(raw.lstrip(b"@")) - 1  # "@@" -> 1 parent, "@@@" -> 2
            elif raw.startswith(tag):  # "<marker><id>": a commit
                added.close()
                added = _Lines(push, Place("the added lines", "commit", raw[len(tag):].strip().decode()))
                columns = 0
            elif raw.startswith((b"diff --git ", b"diff --cc ", b"diff --combined ")):
                columns = 0
        added.close()
        log.close("log")


class _Names:
    """The new paths of a commit, one a line, as they are and with their "/" removed; in chunks."""

    def __init__(self, push: PushScan, oid: str):
        place = Place("the file names", "commit", oid)
        self.plain = PlaceText(push, place)
        self.joined = PlaceText(push, place.seen("joined across '/'"), charged=False)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[bytes] = []
        self.pending_size = 0

    def feed(self, raw: bytes, ends: bool) -> None:
        self.pending.append(raw + b"\n" if ends else raw)
        self.pending_size += len(raw)
        if self.pending_size >= RUN_CHUNK_BYTES:
            self._write()

    def _write(self) -> None:
        text = self.decoder.decode(b"".join(self.pending))
        self.pending, self.pending_size = [], 0
        self.plain.write(text)
        self.joined.write(text.replace("/", ""))

    def close(self) -> None:
        self._write()
        self.plain.close()
        self.joined.close()


def _scan_new_names(repo_dir: Path, commits: Sequence[str], push: PushScan, env: Mapping[str, str] | None) -> None:
    """The paths each commit adds, directories included: in none of its parents' trees (``-c``: for a
    merge, those that differ from every parent). ``-z`` output: records cut at NUL, paths raw."""
    marker = _marker()
    args = _log("--raw", "-z", "-t", "-c", "--root", "--no-renames", "--no-abbrev",
                f"--format=tformat:{marker}%H")
    with GitStream(args, repo_dir, env, input=_lines_of(commits), timeout=push.budget.remaining()) as log:
        names: _Names | None = None
        paths_due, new = 0, False  # path records still to come after an entry's status record, and whether it adds
        record: list[bytes] = []
        for raw, ends in log.records(LINE_PIECE_BYTES):
            if paths_due:
                if new and paths_due == 1 and names is not None:  # the last path: where a rename or copy goes
                    names.feed(raw, ends)
                paths_due -= ends
                continue
            record.append(raw)
            if not ends:
                if len(record) * LINE_PIECE_BYTES > MAX_RAW_ENTRY_BYTES:
                    raise RuntimeError("git log --raw gave an entry too long to read")
                continue
            text = b"".join(record).decode("utf-8", "replace").lstrip("\n")
            record = []
            if not text:
                continue
            if text.startswith(marker):
                if names is not None:
                    names.close()
                names = _Names(push, text[len(marker):].strip())
            elif text.startswith(":"):  # ":<modes> <ids> <status>" ("::..." for a merge, one column per parent)
                status = text.rsplit(" ", 1)[-1]
                renamed = text[1] != ":" and status[:1] in ("R", "C")
                paths_due = 2 if renamed else 1
                new = renamed or set(status) == {"A"}
            else:
                raise RuntimeError("git log --raw gave unexpected output")
        if names is not None:
            names.close()
        log.close("log")


def _scan_decoded_messages(repo_dir: Path, commits: Sequence[str], push: PushScan,
                           env: Mapping[str, str] | None) -> None:
    """The messages of commits with an encoding header, as git decodes them to UTF-8."""
    marker = _marker()
    args = _log("--encoding=UTF-8", f"--format=tformat:{marker}%H%n%B%n{marker}")
    tag = marker.encode()
    with GitStream(args, repo_dir, env, input=_lines_of(commits), timeout=push.budget.remaining()) as log:
        message: _Lines | None = None
        line_start = True
        for raw in log.lines(LINE_PIECE_BYTES):
            starts, line_start = line_start, raw.endswith(b"\n")
            if starts and raw.startswith(tag):  # "<marker><id>" begins a message, "<marker>" alone ends it
                if message is not None:
                    message.close()
                oid = raw[len(tag):].strip().decode()
                message = _Lines(push, Place("the message", "commit", oid, "as its encoding header decodes it")) \
                    if oid else None
            elif message is not None:
                message.feed(raw)
        if message is not None:
            message.close()
        log.close("log")


def mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")
