"""Cancellation seen by one watcher thread, so that a loop's step reads a flag instead of asking Triton.

`request.is_cancelled()` is a round trip from the python-backend stub to the server (milliseconds under
load). Asked by every loop at every step, it held up the step scheduler's ticks, which wait for every
active loop's next call: at 8 concurrent tiny SDEdits it was half as much time as the engines'. One thread
asks for all active requests every `interval_s` instead, off the loops' path; a cancelled loop stops at
its first step after that (within one step plus `interval_s`).
"""

from __future__ import annotations

import threading
from typing import Any


class CancelWatch:
    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._watched: dict[int, tuple[Any, Any, threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, request: Any, sender: Any = None) -> threading.Event:
        """An event set once the request (or, decoupled, its response sender) is cancelled."""
        event = threading.Event()
        with self._lock:
            self._watched[id(request)] = (request, sender, event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, daemon=True, name="ti2i-cancel-watch")
                self._thread.start()
        return event

    def unwatch(self, request: Any) -> None:
        with self._lock:
            self._watched.pop(id(request), None)

    def close(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                watched = list(self._watched.values())
            for request, sender, event in watched:
                if event.is_set():
                    continue
                try:
                    if request.is_cancelled() or (sender is not None and sender.is_cancelled()):
                        event.set()
                except Exception:  # a request already answered: nothing left to stop
                    continue
