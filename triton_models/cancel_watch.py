"""Cancellation seen by one watcher thread, so that a loop's step reads a flag instead of asking Triton.

`request.is_cancelled()` is a round trip from the python-backend stub to the server (milliseconds under
load). Asked by every loop at every step, it held up the step scheduler's ticks, which wait for every
active loop's next call: at 8 concurrent tiny SDEdits it was half as much time as the engines'. One thread
asks for all active requests every `interval_s` instead, off the loops' path; a cancelled loop stops at
its first step after that (within one step plus `interval_s`).

The question must never reach a request that has been answered: the server answers it by dereferencing
the request's response factory, which Triton frees with the final response, and tritonserver died of
SIGSEGV in `TRITONBACKEND_ResponseFactoryIsCancelled` when the watcher asked about a request whose final
response had just been sent (8 concurrent tiny SDEdits). So `unwatch` waits for a question in flight and
closes the entry under its lock; a caller unwatches before it sends the final response.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Watched:
    request: Any
    sender: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while Triton is asked about it
    closed: bool = False  # unwatched: the request may be answered and freed, so never ask again
    on_cancel: Any = None  # called once, from the watcher's thread, when the cancellation is seen


class CancelWatch:
    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, request: Any, sender: Any = None, on_cancel: Any = None) -> threading.Event:
        """An event set once the request (or, decoupled, its response sender) is cancelled; `on_cancel()` is
        called then too (it must be quick: the watcher asks about the other requests after it)."""
        entry = _Watched(request, sender, on_cancel=on_cancel)
        with self._lock:
            self._watched[id(request)] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, daemon=True, name="ti2i-cancel-watch")
                self._thread.start()
        return entry.cancelled

    def unwatch(self, request: Any) -> None:
        """Stop asking about `request`; once this returns no question about it is in flight, so its final
        response may be sent."""
        with self._lock:
            entry = self._watched.pop(id(request), None)
        if entry is not None:
            with entry.lock:
                entry.closed = True

    def close(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                watched = list(self._watched.values())
            for entry in watched:
                with entry.lock:
                    if entry.closed or entry.cancelled.is_set():
                        continue
                    try:
                        if entry.request.is_cancelled() or (entry.sender is not None and
                                                            entry.sender.is_cancelled()):
                            entry.cancelled.set()
                            if entry.on_cancel is not None:
                                entry.on_cancel()
                    except Exception:  # the server could not say: ask again at the next pass
                        continue
