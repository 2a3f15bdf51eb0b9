"""The engine core's streamed responses (`core_server.Responses`), sent off the loop's thread.

A python-backend response sender cannot be made to fail or stall on demand inside tritonserver, so these
tests drive `Responses` with a stand-in sender and the few `triton_python_backend_utils` names it uses; the
stopped-reader case runs against a real server in `test_method_models.py`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ti2i.triton_models import core_server
from ti2i.triton_models.core import Cancelled
from ti2i.triton_models.core_server import Responses, error_response, response
from ti2i.triton_models.core_wire import ERROR

FINAL = 1


class _Tensor:
    def __init__(self, name: str, value: np.ndarray):
        self._name, self.value = name, value

    def name(self) -> str:
        return self._name


class _Error:
    INVALID_ARG, INTERNAL, UNAVAILABLE, CANCELLED = 3, 13, 14, 1

    def __init__(self, message: str, code: int = 13):
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> _Error:
        return self._error

    def output_tensors(self) -> list[_Tensor]:
        return self.tensors


class _Pb:
    Tensor, TritonError, InferenceResponse = _Tensor, _Error, _Response
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL

    class Logger:
        warnings: list[str] = []

        @classmethod
        def log_warn(cls, message: str) -> None:
            cls.warnings.append(message)


class _Sender:
    """Records what was sent; `fail_first` raises on the first send, `hold` holds it until set."""

    def __init__(self, fail_first: bool = False, hold: threading.Event | None = None):
        self.sent: list[tuple[object, int]] = []
        self.fail_first, self.hold = fail_first, hold
        self.closed = threading.Event()
        self.tries = 0

    def send(self, response=None, flags: int = 0) -> None:
        self.tries += 1
        first = self.tries == 1
        if first and self.hold is not None:
            self.hold.wait()
        if first and self.fail_first:
            raise RuntimeError("Unable to send response")
        self.sent.append((response, flags))
        if flags == FINAL:
            self.closed.set()


def _progress(step: int) -> _Response:
    return response(_Pb, {"step": np.array([step], np.int64)})


def _loop(responses: Responses, steps: int, pause_s: float = 0.0) -> object:
    """A request's loop as the core runs it: progress at each step, then its final response."""
    try:
        for step in range(steps):
            responses.send(_progress(step))
            time.sleep(pause_s)
        final = response(_Pb, {"step": np.array([steps], np.int64)})
    except Cancelled as err:
        final = error_response(_Pb, err)
    responses.finish(final)
    return final


def _final_error(sender: _Sender) -> str:
    final, flags = sender.sent[-1]
    assert flags == FINAL and [t.name() for t in final.output_tensors()] == [ERROR]
    return final.output_tensors()[0].value[0].decode()


def test_a_failed_send_stops_the_loop_and_still_closes_the_stream():
    """Original failure: a send that failed marked the reader gone; the loop went on, and its final response
    was dropped, so the entry point reading the stream waited for it for good (its client got no answer)."""
    sender = _Sender(fail_first=True)
    responses = Responses(_Pb, sender, ["step", ERROR])
    responses.off_thread()
    _loop(responses, steps=50, pause_s=0.01)
    assert sender.closed.wait(10), "the stream was never closed"
    message = _final_error(sender)
    assert message.startswith("Cancelled: a response could not be sent: Unable to send response"), message
    assert len(sender.sent) < 50  # the loop stopped early


def test_a_late_reader_gets_its_stream_closed(monkeypatch):
    """Original failure: a reader that took no response for `STALL_S` stopped the loop (right: its core place
    is freed), but its final response was dropped, so a reader that was only late waited for good."""
    monkeypatch.setattr(core_server, "STALL_S", 0.2)
    hold = threading.Event()
    sender = _Sender(hold=hold)
    responses = Responses(_Pb, sender, ["step", ERROR], depth=2)
    responses.off_thread()
    _loop(responses, steps=10)  # held on its first send: the queue fills and the loop is cancelled
    assert not sender.sent
    hold.set()
    assert sender.closed.wait(10), "the stream was never closed"
    assert "took no response for 0.2 s" in _final_error(sender)
    assert [flags for _, flags in sender.sent].count(FINAL) == 1


@pytest.mark.parametrize("steps", [0, 3])
def test_every_response_goes_out_in_order_then_the_final(steps):
    sender = _Sender()
    responses = Responses(_Pb, sender, ["step"])
    responses.off_thread()
    _loop(responses, steps=steps)
    assert sender.closed.wait(10)
    assert [(int(r.output_tensors()[0].value[0]), f) for r, f in sender.sent] == \
        [*((s, 0) for s in range(steps)), (steps, FINAL)]
