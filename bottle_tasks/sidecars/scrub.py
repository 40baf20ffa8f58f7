"""Keeping known secret values out of what leaves a daemon: responses, log lines, audit records.

One SecretScrubber serves both uses:

- egress (``SecretScrubber.placeholders``): a real token value becomes the placeholder the guest
  holds, in text and bytes, also in streamed bodies (``stream()``) and, where a length must not
  change, with the placeholder padded or cut to the token's length (``same_length()``);
- git-gate (``SecretScrubber.credentials``): a token, and its base64 ``user:token`` forms (HTTP
  basic auth), become ``[REDACTED]``, as does any URL user info (``https://user:pw@host``).

Standard library only.
"""

from __future__ import annotations

import base64
import re
from typing import Iterable, Mapping

REDACTED = "[REDACTED]"
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_URL_USERINFO_BYTES = re.compile(rb"(?<=://)[^/@\s]+@")


class SecretScrubber:
    """Replaces each needle by its replacement, longest needle first (so a secret that contains
    another is replaced whole); optionally also URL user info."""

    def __init__(self, replacements: Mapping[str, str], *, url_userinfo: bool = False):
        pairs = sorted(((s, r) for s, r in replacements.items() if s), key=lambda pair: -len(pair[0]))
        self.text_pairs: tuple[tuple[str, str], ...] = tuple(pairs)
        self.byte_pairs: tuple[tuple[bytes, bytes], ...] = tuple((s.encode(), r.encode()) for s, r in pairs)
        self.url_userinfo = url_userinfo

    @classmethod
    def placeholders(cls, secret_to_placeholder: Mapping[str, str]) -> SecretScrubber:
        """Real token value -> the placeholder the guest holds instead (egress)."""
        return cls(secret_to_placeholder)

    @classmethod
    def credentials(cls, identities: Iterable[tuple[str, str]]) -> SecretScrubber:
        """(username, token) pairs: the token and its basic-auth forms, and URL user info, become [REDACTED]."""
        needles: dict[str, str] = {}
        for username, token in identities:
            if not token:
                continue
            needles[token] = REDACTED
            for plain in (f"{username}:{token}", f":{token}"):
                needles[base64.b64encode(plain.encode()).decode().rstrip("=")] = REDACTED
        return cls(needles, url_userinfo=True)

    def __bool__(self) -> bool:
        """True when there is a secret value to replace."""
        return bool(self.text_pairs)

    def text(self, value: str) -> str:
        for secret, replacement in self.text_pairs:
            value = value.replace(secret, replacement)
        return _URL_USERINFO.sub(REDACTED + "@", value) if self.url_userinfo else value

    def data(self, value: bytes) -> bytes:
        for secret, replacement in self.byte_pairs:
            value = value.replace(secret, replacement)
        return _URL_USERINFO_BYTES.sub(REDACTED.encode() + b"@", value) if self.url_userinfo else value

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def same_length(self) -> SecretScrubber:
        """A scrubber whose replacements are padded ("_") or cut to each secret's length."""
        return SecretScrubber({s: r.ljust(len(s), "_")[: len(s)] for s, r in self.text_pairs},
                              url_userinfo=self.url_userinfo)


class StreamRedactor:
    """A ``response.stream`` callable that redacts secrets even when a chunk boundary splits one.

    It holds back only the longest chunk tail that could be the start of a secret (usually
    nothing), and flushes it when mitmproxy signals the end of the body with b"". Limitation: an
    *empty* chunk in the middle of a stream is taken as the end too, so a secret split around one
    is not caught; secrets that are encoded (base64, JSON-escaped) by the upstream are not caught.
    """

    def __init__(self, scrubber: SecretScrubber):
        self.scrubber = scrubber
        self.held = b""

    def __call__(self, chunk: bytes) -> bytes:
        data = self.scrubber.data(self.held + chunk)
        if not chunk:  # end of body
            self.held = b""
            return data
        keep = self._possible_secret_start(data)
        self.held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep]

    def _possible_secret_start(self, data: bytes) -> int:
        longest = 0
        for secret, _ in self.scrubber.byte_pairs:
            for size in range(min(len(secret) - 1, len(data)), longest, -1):
                if data.endswith(secret[:size]):
                    longest = size
                    break
        return longest
