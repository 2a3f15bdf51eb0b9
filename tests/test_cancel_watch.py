"""The cancel watcher never asks Triton about a request that has been answered.

Asking the server about an answered request dereferences its freed response factory: tritonserver died
of SIGSEGV in `TRITONBACKEND_ResponseFactoryIsCancelled` at 8 concurrent tiny SDEdits (hosted design). The
stand-in request below counts the questions that reach it once it has been answered.
"""

from __future__ import annotations

import threading
import time

from ti2i.triton_models.cancel_watch import CancelWatch


class AnsweredRequest:
    """A python-backend request's `is_cancelled`, taking `slow_s` (the server's round trip under load)."""

    def __init__(self, slow_s: float = 0.0):
        self.slow_s = slow_s
        self.answered = False  # its final response is sent: Triton has freed its response factory
        self.asked_after_answer = 0
        self.asking = threading.Event()

    def is_cancelled(self) -> bool:
        self.asked_after_answer += self.answered
        self.asking.set()
        time.sleep(self.slow_s)
        self.asked_after_answer += self.answered  # still inside the server's call when the answer went
        return False


def test_no_question_reaches_a_request_once_it_is_unwatched():
    watch = CancelWatch(interval_s=0.05)
    slow, quick = AnsweredRequest(slow_s=0.3), AnsweredRequest()
    watch.watch(slow)  # the pass asks `slow` first, then `quick`, from its copy of the watched requests
    watch.watch(quick)
    try:
        assert slow.asking.wait(5)
        watch.unwatch(quick)  # the pass still holds `quick`, waiting on `slow`'s round trip
        quick.answered = True
        watch.unwatch(slow)  # a question about `slow` is in flight: unwatch waits for it to come back
        slow.answered = True
        time.sleep(0.5)  # several more passes
    finally:
        watch.close()
    assert (slow.asked_after_answer, quick.asked_after_answer) == (0, 0)


def test_a_cancelled_request_is_flagged_and_a_failing_question_is_asked_again():
    class Request:
        def __init__(self):
            self.calls = 0

        def is_cancelled(self) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("the server could not say")
            return self.calls >= 3

    watch = CancelWatch(interval_s=0.01)
    request = Request()
    try:
        assert watch.watch(request).wait(5) and request.calls == 3
    finally:
        watch.close()
