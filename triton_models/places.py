"""The places for active requests of one method model: a request runs once it holds one.

A hosted model of several processes (`--method-processes`) is several Triton instances, and Triton
hands a request to any instance that is back from `execute`, even one whose loops are all busy. With
a limit per process (active/P each), a request then waited inside a full process while another had a
free place: in 1 to 3 of 10 trials of 4 concurrent requests at 4 places (2 processes of 2 loops), the 4th
ran after one of the others had finished. So the places belong to the model, not to a process:
`SharedPlaces` are `count` lock files in a folder of the model's own, each held (flock) by one
running request, whichever process runs it; the kernel frees those of a process that dies.

The processes' loads still drift apart: Triton's choice of instance ignores their loops, and a tick log
of 8 concurrent tiny SDEdits over 2 processes showed one running 5 to 7 while the other ran 1 (the
`ti2i_method_requests_total` metric shows the split). Keeping a process to its share by staying inside
`execute` while it runs active/P requests balanced them, but Triton's batcher then loses the wake-up of a
request that arrives while every instance is inside `execute` (`ti2i.benchmarks.queue_stall`): in rounds
of 4 requests at 4 places, 4 of 40 waited 0.5 s in the queue, against none. So `execute` returns at once.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class _Places:
    """What both kinds share: `acquire` (waiting as long as it takes) on top of each kind's `wait`."""

    count: int

    def wait(self, timeout_s: float | None) -> Any:
        """A place if one frees within `timeout_s` (0: only if one is free now; None: however long), else None."""
        raise NotImplementedError

    def acquire(self, on_wait: Any = None) -> Any:
        """Hold a place, waiting for one; `on_wait()` is called once if all are taken."""
        place = self.wait(0)
        if place is None:
            if on_wait is not None:
                on_wait()
            place = self.wait(None)
        return place


class ProcessPlaces(_Places):
    """Places within one process (one instance, or the one process of a hosted model)."""

    def __init__(self, count: int):
        self.count = count
        self._free = threading.BoundedSemaphore(count)

    def wait(self, timeout_s: float | None) -> Any:
        got = self._free.acquire(blocking=False) if timeout_s == 0 else self._free.acquire(timeout=timeout_s)
        return True if got else None

    def release(self, _token: Any) -> None:
        self._free.release()


class SharedPlaces(_Places):
    """Places shared by the processes of one model: `count` lock files in `directory`."""

    def __init__(self, directory: Path, count: int, poll_s: float = 0.002):
        directory.mkdir(parents=True, exist_ok=True)
        self.count = count
        self.poll_s = poll_s
        self._paths = [directory / f"place-{i}" for i in range(count)]

    def _try(self) -> int | None:
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    def wait(self, timeout_s: float | None) -> int | None:
        """A free place's file descriptor (see `_Places.wait`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        fd = self._try()
        while fd is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(self.poll_s)
            fd = self._try()
        return fd

    def release(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def shared_places_dir(model: str) -> Path:
    """The folder of one served model's places: this user's, this server's (the stub's parent), this model's."""
    return Path(tempfile.gettempdir()) / f"ti2i-places-{os.getuid()}-{os.getppid()}-{model}"
