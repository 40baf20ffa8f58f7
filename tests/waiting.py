"""Polling for a condition in tests: a bounded wait, never a timed assertion on speed."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.05) -> Any:
    """The first truthy value of condition(), or AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
