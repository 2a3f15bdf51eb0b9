"""The python-backend model of a family's engine core (`core`, or ``<family>.core``): see `core.py`.

It is decoupled: a method request's progress responses (when its entry streams) go out as its loop steps,
then its result. `execute` hands each request to a thread of its own and returns at once; admission, not
Triton's queue, bounds how many run and wait (`core.Admission`). Requests follow `core_wire.py`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.client.registry import get_method
from ti2i.errors import InvalidInputError, ServerUnavailableError, Ti2iError, named_error
from ti2i.triton_models.core import Cancelled, CoreOptions, EngineCore
from ti2i.triton_models.core_metrics import CoreMetrics
from ti2i.triton_models.core_wire import (CANCEL, COMPONENT, ERROR, IMAGE_INPUTS, METHOD, ORPHANED, REQUEST,
                                         component_tensor, read_envelope, read_secret)
from ti2i.work_limits import WorkLimits


def error_code(pb: Any, kind: type[BaseException]) -> int:
    """A client's fault is INVALID_ARG, a full server UNAVAILABLE, a cancelled request CANCELLED."""
    errors = pb.TritonError
    if issubclass(kind, ServerUnavailableError):
        return errors.UNAVAILABLE
    if issubclass(kind, Cancelled):
        return errors.CANCELLED
    return errors.INVALID_ARG if issubclass(kind, Ti2iError) else errors.INTERNAL


def error_response(pb: Any, err: Exception) -> Any:
    return pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}", error_code(pb, type(err))))


def relayed_error(pb: Any, message: str) -> Any:
    """The core's error, relayed by an entry point with its code: a BLS response's error keeps only its message
    (`TYPE: text`, as `error_response` wrote it), so the code is found again from the type's name. An error in
    Triton's own words means the core could not be reached (its stub died and is being reloaded): UNAVAILABLE."""
    prefix = message.split(":", 1)[0]
    named = Cancelled if prefix == Cancelled.__name__ else named_error(message)
    if named is not None:
        kind: type[BaseException] = named
    elif prefix.isidentifier() and prefix.endswith(("Error", "Exception")):
        kind = Exception  # the core failed on this request
    else:
        kind = ServerUnavailableError
        message = f"ServerUnavailableError: the engine core is unavailable (restarting?): {message}"
    return pb.InferenceResponse(error=pb.TritonError(message, error_code(pb, kind)))


def response(pb: Any, tensors: dict[str, np.ndarray]) -> Any:
    return pb.InferenceResponse(output_tensors=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in tensors.items()])


STALL_S = 10.0  # a stream none of whose responses went out for this long has lost its reader
_FINAL = object()  # the sending thread's cue that the final response is due


class Responses:
    """One request's responses, then its final one (always sent, with the final flag).

    Sent from the request's thread, unless `off_thread` was called: then a thread of their own sends them in
    order. A python-backend send waits for the server to take the response, and the server waits for the
    reader's stub: a reader whose stub died holding its queue (or stopped) holds the send for good. Off the
    thread, only the sending thread waits; a stream that has taken no response for `STALL_S`, or one whose
    send failed, stops its loop at its next step (`Cancelled`), which frees its core place. Its final response
    is still handed to the sending thread, which sends it after the one it is held on, if ever: a reader that
    is only late gets its stream closed, never left open for good.

    Every response holds only the outputs its request asked for. The python backend of Triton 2.51 drops the
    others itself inside a response sender's `send`, without holding the interpreter lock: a numpy array
    freed there while other threads run Python corrupted the stub's heap (``double free or corruption``),
    and the dying stub's shared-memory locks then aborted tritonserver itself (fixed upstream after 2.51,
    python_backend #390). Here they are dropped in Python, before the send."""

    def __init__(self, pb: Any, sender: Any, requested: Iterable[str], depth: int = 16):
        self.pb = pb
        self.sender = sender
        self.requested = frozenset(requested)
        self.depth = depth
        self._queue: queue.Queue | None = None
        self._final: tuple[Any] | None = None  # (the final response,) once `finish` has it, off the thread
        self.reader_gone: str | None = None  # why the stream's responses stopped going out

    def off_thread(self) -> None:
        self._queue = queue.Queue(self.depth)
        threading.Thread(target=self._send_queued, daemon=True, name="ti2i-responses").start()

    def _requested_only(self, response: Any) -> Any:
        if response is None or response.has_error():
            return response
        tensors = response.output_tensors()
        kept = [t for t in tensors if t.name() in self.requested]
        return response if len(kept) == len(tensors) else self.pb.InferenceResponse(output_tensors=kept)

    def send(self, response: Any) -> None:
        response = self._requested_only(response)
        if self._queue is None:
            self.sender.send(response)
            return
        if self.reader_gone is None:
            try:
                self._queue.put(response, timeout=STALL_S)
                return
            except queue.Full:
                self.reader_gone = f"its stream took no response for {STALL_S:g} s (its reader has gone)"
        raise Cancelled(self.reader_gone)

    def finish(self, final: Any) -> None:
        flag = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self._queue is None:
            self.sender.send(self._requested_only(final), flags=flag)
            return
        if final is not None and final.has_error():  # a stream's failure travels as a tensor (core_wire.py)
            final = response(self.pb, {ERROR: np.array([final.error().message().encode()], dtype=object)})
        self._final = (self._requested_only(final),)
        with contextlib.suppress(queue.Full):  # a full queue: the sending thread finds the final once it drains
            self._queue.put_nowait(_FINAL)

    def _send_queued(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is not _FINAL and self.reader_gone is None:
                try:
                    self.sender.send(item)
                except Exception as err:  # the request was freed, or the send failed: the loop stops
                    self.reader_gone = f"a response could not be sent: {err}"
                    self.pb.Logger.log_warn(self.reader_gone)
            if self._final is not None and (item is _FINAL or self._queue.empty()):
                with contextlib.suppress(Exception):  # a reader that has gone takes nothing more
                    self.sender.send(self._final[0], flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return


class ThreadPerRequest:
    """What the core and its entry points share: `execute` hands each request to a thread of its own and returns
    at once; the thread answers through the request's `Responses`, always with a final response."""

    pb: Any
    name: str
    threads: set[threading.Thread]

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            thread = threading.Thread(target=self._answer_safely, args=(request,), daemon=True,
                                      name=f"{self.name}-request")
            self.threads.add(thread)
            thread.start()

    def _answer_safely(self, request: Any) -> None:
        responses = Responses(self.pb, request.get_response_sender(), request.requested_output_names())
        try:
            final = self._answer(request, responses)
        except Exception as err:  # one request's failure never reaches the others or the model
            final = self._failed(err)
        finally:
            self.threads.discard(threading.current_thread())
        responses.finish(final)

    def _answer(self, request: Any, responses: Responses) -> Any:
        """The final response (None: the stream closes without one)."""
        raise NotImplementedError

    def _failed(self, err: Exception) -> Any:
        return error_response(self.pb, err)

    def finalize(self) -> None:
        for thread in list(getattr(self, "threads", ())):  # unloading: let the running requests answer
            thread.join(timeout=60)


class TritonPythonModel(ThreadPerRequest):
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = args.get("model_name", "core")
        self.secret = read_secret(Path(args["model_repository"]))
        settings = json.loads(params["options"])
        options = CoreOptions(**{**settings, "limits": WorkLimits(**settings.get("limits", {}))})
        budgets = json.loads(params["memory_budget"]) if params.get("memory_budget") else None
        self.metrics = CoreMetrics(pb_utils, self.name)
        methods = [get_method(name) for name in json.loads(params["methods"])]
        self.core = EngineCore(params["engine_dir"], methods, json.loads(params["components"]), options,
                               budgets=budgets, metrics=self.metrics)
        loaded = self.core.load()
        self.metrics.attach(self.core.admission, self.core.scheduler.executions)
        self.threads: set[threading.Thread] = set()
        pb_utils.Logger.log_info(f"{self.name}: {self.core.describe()} ({', '.join(loaded)}), "
                                 f"{options.active} active requests, a queue of {options.max_queue} "
                                 f"({options.queue_timeout_s:g} s), methods {', '.join(m.name for m in methods)}")

    def _get(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _failed(self, err: Exception) -> Any:
        if isinstance(err, Cancelled):
            self.pb.Logger.log_info(f"{self.name}: {err}")
        return super()._failed(err)

    def _answer(self, request: Any, responses: Responses) -> Any:
        env = read_envelope(self._get(request, REQUEST).reshape(-1)[0])
        if not hmac.compare_digest(str(env.get("secret", "")), self.secret):
            raise InvalidInputError(f"{self.name} answers its entry points only: send the request to a method or "
                                    f"component model")
        kind, name, token = env["kind"], env["name"], env["token"]
        if kind == CANCEL:
            self.core.cancel(token)
            return response(self.pb, {})
        if kind == ORPHANED:
            if cancelled := self.core.cancel_from(name):
                self.pb.Logger.log_warn(f"{self.name}: {name}'s stub died: {cancelled} of its requests cancelled")
            return response(self.pb, {})
        if kind == METHOD:
            call = dict(env["call"])
            for image in IMAGE_INPUTS:
                value = self._get(request, image)
                if value is not None:
                    call[image] = value.reshape(-1)[0]
            on_step = None
            if env.get("stream"):
                responses.off_thread()
                on_step = lambda tensors: responses.send(response(self.pb, tensors))  # noqa: E731
            out = self.core.run_method(name, call, env["format"], env["outputs"], token, on_step=on_step,
                                       preview_every=int(env.get("preview_every", 0)),
                                       timeout_s=float(env.get("timeout_s", 0.0)), origin=str(env.get("origin", "")))
            return response(self.pb, out)
        if kind == COMPONENT:
            spec = self.core.engines.spec_of(name).interface()
            inputs = {t.name: self._get(request, component_tensor(name, t.name)) for t in spec.inputs}
            out = self.core.run_component(name, {k: v for k, v in inputs.items() if v is not None},
                                          env.get("outputs") or None, float(env.get("timeout_s", 0.0)))
            return response(self.pb, {component_tensor(name, k): v for k, v in out.items()})
        raise ValueError(f"unknown core request kind {kind!r}")

    def finalize(self) -> None:
        super().finalize()
        if hasattr(self, "core"):
            self.core.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
