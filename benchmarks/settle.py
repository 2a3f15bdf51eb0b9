"""Server counters read once they stop changing.

Triton records a request's statistics after its response has been sent, and the composing models of an
ensemble or a method loop after the method's response can already have reached the client. A snapshot taken
right after the last reply can therefore miss the last calls (CI once counted 29 calls for 27: the snapshot
before the measured requests had missed two warm-up calls). Reading until two reads agree closes that gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def settled(read: Callable[[], T], wait_s: float = 0.2, limit_s: float = 5.0) -> T:
    """`read()` once two reads `wait_s` apart agree, or the last read after `limit_s`."""
    value, deadline = read(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(wait_s)
        value, previous = read(), value
        if value == previous:
            break
    return value
