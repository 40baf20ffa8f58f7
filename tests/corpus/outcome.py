"""What a transport saw of one case: the guest's side (exchanges), the upstream's (arrivals), DNS.

Both transports fill these; the judge reads only these. Bytes stay bytes: a judge that compared
decoded text could miss what changed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

BLOCK_HEADER = "x-bottle-block-reason"


@dataclass
class Exchange:
    """One request the guest sent and what came back (status None: no HTTP answer at all)."""

    status: int | None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str = ""
    ws_received: list[str] = field(default_factory=list)
    url: str = ""

    @classmethod
    def from_client(cls, data: dict) -> "Exchange":
        return cls(status=data["status"], headers=[tuple(h) for h in data["headers"]],
                   body=base64.b64decode(data["body_b64"]), error=data["error"],
                   ws_received=list(data["ws_received"]), url=data["url"])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def block_reason(self) -> str:
        return self.header(BLOCK_HEADER) or ""


@dataclass
class Arrival:
    """One request that reached a fake upstream. private: it reached a private target (SSRF)."""

    private: bool
    method: str
    path: str
    host: str  # the Host header
    headers: list[tuple[str, str]]
    body: bytes  # as received, still content-encoded
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ws_messages: list[str] = field(default_factory=list)
    served_status: int | None = None  # what the upstream answered; None when a transport cannot tell
    served_body: bytes | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class Outcome:
    exchanges: list[list[Exchange]]  # per wire request, one per redirect hop
    arrivals: list[Arrival]
    dns_queries: list[str] | None  # host names the bottle asked its resolver for; None: unknown
    log: list[dict]  # egress decision records during the case
    seconds: float = 0.0  # wall time of the case
