"""Request bodies for DLP: decoded with a bound, then scanned window by window.

egress runs all of this in a worker thread (``asyncio.to_thread``), never on the event loop.

Decoding (``decoded_pieces``) follows Content-Encoding one piece at a time: ``identity``,
``gzip`` (every member), ``deflate`` (zlib or raw) and ``zstd``. Each decompressor call is
asked for at most ``DECODE_STEP`` bytes (zlib's ``max_length``, zstd's ``read(n)``), so a
decompression bomb never expands in memory: decoding stops with ``body_too_large`` (413) once
the decoded size passes the route's ``max_body_bytes``, and with ``compression_ratio`` (413) once
it passes ``MAX_RATIO`` times the size sent (judged past ``RATIO_FLOOR``). Anything egress
cannot decode with a bound (``br``, whose decoder has no output limit; stacked or unknown
encodings; corrupt, truncated or trailing data) is refused as ``dlp_unavailable``: DLP cannot
read it, and an upstream might.

Scanning (``WindowScanner``) turns the decoded bytes into text incrementally and hands the scan
function windows of ``SCAN_WINDOW`` characters, each repeating the last ``SCAN_OVERLAP``
characters of the one before, so the decoded body is never held whole for the scan. A body up
to ``SCAN_WINDOW`` is one window. A match no longer than the overlap is always inside some
window, and so is an encoded secret (dlp decodes base64 and hex at every alignment, so a window
that starts in the middle of a run still decodes it). Two built-in patterns can match text of
any length (``dlp.OPEN_PREFIXES``), also inside a decoded view; when a window ends inside what
could still become such a match, the next window starts where that match (or the encoded run
that carries it) would begin, so it is still found whole. That carry is bounded only by the
body itself (``max_body_bytes``), which is the worst case: a body built to keep a match open is
scanned as one piece.

Fields (``scan_body``): after the windows, a body with fields (JSON strings, form or multipart
fields, by its Content-Type or sniffed) is also scanned with its fields joined end to end
(``dlp.reassembled``), so a value split across two fields is seen whole. That needs the
decoded text whole: bodies up to ``STRUCTURE_LIMIT`` characters; larger ones get the windows only.

Stdlib only (zstd through mitmproxy's own dependency): this runs inside the bundle image.
"""

from __future__ import annotations

import codecs
import io
import zlib
from typing import Callable, Generic, Iterator, TypeVar

from bottle_tasks.sidecars import dlp

# A window of 256 Ki characters costs dlp.scan_text about 3 to 10 ms (rules and decoders), no
# single call holding the GIL (and so the event loop) for more than about 1 ms. The overlap is
# far longer than any bounded match, even triple percent-encoded (7 characters for each one).
SCAN_WINDOW = 256 << 10   # characters per window
SCAN_OVERLAP = 32 << 10   # characters a window repeats from the one before
DECODE_STEP = 64 << 10    # bytes of output asked of one decompressor call
INPUT_STEP = 64 << 10     # bytes of compressed input fed to one decompressor call
RATIO_FLOOR = 1 << 20     # the ratio is only judged once this much has been decoded
ZSTD_MAX_WINDOW = 16 << 20  # a zstd frame may ask for 128 MiB of window; 16 MiB covers every level but --long
MAX_RATIO = 200           # decoded size / size sent; ordinary JSON and text compress 3 to 20 times
STRUCTURE_LIMIT = 16 << 20  # decoded bytes of a body kept whole to reassemble its fields

# Content-Encodings decoded_pieces reads, as they appear in a Content- or Accept-Encoding header.
BOUNDED_ENCODINGS = ("identity", "none", "gzip", "x-gzip", "deflate", "zstd")

T = TypeVar("T")


class BodyRefused(Exception):
    """The body cannot be scanned within its bounds; egress answers ``status`` with ``reason``."""

    def __init__(self, reason: str, detail: str, status: int = 403):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status


def _undecodable(detail: str) -> BodyRefused:
    return BodyRefused("dlp_unavailable", f"request body {detail}; DLP cannot read it")


def decoded_pieces(raw: bytes, content_encoding: str, limit: int) -> Iterator[bytes]:
    """raw decoded per its Content-Encoding, piece by piece; BodyRefused past the bounds."""
    if not raw:
        return
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity", "none"):
        pieces = _identity(raw)
    elif encoding in ("gzip", "x-gzip"):
        pieces = _zlib(raw, 16 + zlib.MAX_WBITS, members=True)
    elif encoding == "deflate":
        zlib_wrapped = len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0
        pieces = _zlib(raw, zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS, members=False)
    elif encoding == "zstd":
        pieces = _zstd(raw)
    else:
        raise _undecodable(f"has Content-Encoding {encoding[:40]!r}, which egress cannot decode with a bound")
    total = 0
    for piece, consumed in pieces:
        total += len(piece)
        if total > limit:
            raise BodyRefused("body_too_large", f"the decoded request body exceeds max_body_bytes ({limit} bytes)", 413)
        if total > RATIO_FLOOR and total > MAX_RATIO * consumed:
            raise BodyRefused("compression_ratio", f"the request body decodes to more than {MAX_RATIO} times "
                              "the bytes sent", 413)
        yield piece


# The decoders below yield (decoded piece, compressed bytes consumed so far).


def _identity(raw: bytes) -> Iterator[tuple[bytes, int]]:
    view = memoryview(raw)
    for start in range(0, len(view), DECODE_STEP):
        piece = view[start:start + DECODE_STEP].tobytes()
        yield piece, start + len(piece)


def _zlib(raw: bytes, wbits: int, *, members: bool) -> Iterator[tuple[bytes, int]]:
    view = memoryview(raw)
    position = 0
    decompressor: zlib._Decompress | None = zlib.decompressobj(wbits)  # None: between gzip members
    tail = b""
    try:
        while True:
            if not tail and position < len(view):
                tail = view[position:position + INPUT_STEP].tobytes()
                position += len(tail)
            if decompressor is None:
                tail = tail.lstrip(b"\0")  # zero padding may follow a member, as gzip(1) allows
                if tail:
                    decompressor = zlib.decompressobj(wbits)
                elif position >= len(view):
                    return
                else:
                    continue
            out = decompressor.decompress(tail, DECODE_STEP)
            tail = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
            if out:
                yield out, position - len(tail)
            if decompressor.eof:
                if not members:
                    if tail or position < len(view):
                        raise _undecodable("has data after the end of its compressed stream")
                    return
                decompressor = None
                continue
            if not out and not tail and position >= len(view):
                raise _undecodable("ends in the middle of its compressed stream")
    except zlib.error:
        raise _undecodable("is not valid compressed data") from None


def _zstd(raw: bytes) -> Iterator[tuple[bytes, int]]:
    import zstandard  # a mitmproxy dependency, present wherever egress runs

    source = io.BytesIO(raw)
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    reader = decompressor.stream_reader(source, read_across_frames=True)
    try:
        while piece := reader.read(DECODE_STEP):
            yield piece, source.tell()
    except zstandard.ZstdError:
        raise _undecodable("is not valid zstd data") from None


class WindowScanner(Generic[T]):
    """Text windows of a byte stream, each passed to ``scan``; the first non-None result wins."""

    def __init__(self, scan: Callable[[str], T | None], *, window: int = SCAN_WINDOW, overlap: int = SCAN_OVERLAP):
        assert 0 < overlap < window
        self._scan, self._window, self._overlap = scan, window, overlap
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # secrets are ASCII
        self._text = ""        # the current window: what the last one carried over, then fresh text
        self._fresh = False    # text arrived since the last scan
        self._target = window  # scan once the window is this long

    def feed(self, data: bytes) -> T | None:
        self._text += self._decoder.decode(data)
        self._fresh = True
        return self._scan_window() if len(self._text) >= self._target else None

    def finish(self) -> T | None:
        self._text += self._decoder.decode(b"", final=True)
        return self._scan_window() if self._fresh else None

    def _scan_window(self) -> T | None:
        found = self._scan(self._text)
        if found is not None:
            return found
        keep_from = min(max(len(self._text) - self._overlap, 0), dlp.open_match_start(self._text))
        self._text = self._text[keep_from:]
        self._fresh = False
        self._target = max(self._window, 2 * len(self._text))  # a long carry doubles: linear work overall
        return None


def scan_body(raw: bytes, content_encoding: str, limit: int, scan: Callable[[str], T | None],
              content_type: str | None = None) -> T | None:
    """Decode raw within its bounds and scan it window by window, then (for a body with fields,
    by content_type or sniffed when it is None or empty) its fields reassembled; BodyRefused past
    the bounds."""
    scanner = WindowScanner(scan)
    kept: list[bytes] | None = []  # the decoded body, for its fields; None past STRUCTURE_LIMIT
    size = 0
    for piece in decoded_pieces(raw, content_encoding, limit):
        found = scanner.feed(piece)
        if found is not None:
            return found
        size += len(piece)
        kept = kept if kept is not None and size <= STRUCTURE_LIMIT else None
        if kept is not None:
            kept.append(piece)
    found = scanner.finish()
    if found is not None or not kept:
        return found
    text = dlp.body_text(b"".join(kept))
    fields = dlp.body_fields(text, content_type or dlp.sniff_content_type(text))
    joined = dlp.reassembled(fields) if fields is not None else None
    return scan(joined) if joined is not None else None
