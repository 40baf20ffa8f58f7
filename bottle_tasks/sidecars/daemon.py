"""What every bundle daemon needs: its listen address, a restart/retry backoff, a threaded server
with a connection cap, and a stop on SIGTERM/SIGINT (the init supervisor stops daemons with SIGTERM).

Standard library only: the DNS sink imports this too.
"""

from __future__ import annotations

import signal
import socketserver
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# --------------------------------------------------------------------------- addresses


def split_host_port(address: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``"10.0.0.2:8080"`` or ``"[::1]:53"`` -> (host, port), port 0..65535.

    An empty host (``":53"``) becomes default_host, or is an error when there is none. Raises
    ValueError; callers that word the error their own way catch it and raise theirs.
    """
    host, sep, port = str(address).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535 or (not host and default_host is None):
        raise ValueError(f"not an ip:port address: {address!r}")
    return host or str(default_host), int(port)


# --------------------------------------------------------------------------- backoff


@dataclass(frozen=True)
class Backoff:
    """Exponential delays after consecutive failures: 0, initial, 2*initial, ... capped at cap_s."""

    initial_s: float
    cap_s: float
    stable_after_s: float = float("inf")  # up (or fine) this long: the next failure starts from initial_s

    def delay(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        return min(self.cap_s, self.initial_s * 2 ** (consecutive_failures - 1))


# --------------------------------------------------------------------------- servers


class BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    """A thread per connection, at most max_connections at once; over the cap a connection is
    closed at once, so an idle flood cannot exhaust the bundle's threads."""

    daemon_threads = True
    max_connections = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connection_slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connection_slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()


def read_chunks(stream: BinaryIO, length: int, chunk_size: int = 65536) -> Iterator[bytes]:
    """Up to length bytes of stream, chunk by chunk; stops early when the stream ends."""
    remaining = length
    while remaining > 0:
        chunk = stream.read(min(remaining, chunk_size))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


# --------------------------------------------------------------------------- stopping


def install_stop_handlers() -> threading.Event:
    """An Event that SIGTERM or SIGINT sets. Install it before starting to serve."""
    stopped = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stopped.set())
    return stopped


def wait_for_stop_signal(stopped: threading.Event | None = None, poll_s: float = 1.0) -> None:
    """Block the main thread until SIGTERM or SIGINT (handlers from install_stop_handlers)."""
    stopped = stopped if stopped is not None else install_stop_handlers()
    while not stopped.wait(poll_s):
        pass
