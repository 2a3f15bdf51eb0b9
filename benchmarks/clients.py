"""Concurrent benchmark clients: threads started together, timed together, their first failure raised."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_clients(client: Callable[[int], None], count: int) -> float:
    """Seconds for `count` threads running `client(index)` to all finish; the first error any raised, after."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            client(index)
        except BaseException as err:  # noqa: BLE001 - reported after the round
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start
