"""The python-backend model behind every served method (`sdedit`, `sdedit_stream`, ...).

One request runs the method's own function (the client's loop, not a copy) over a runner of one of
two designs (the `design` parameter):
- ``hosted``: the engines live in this model's process and the loops of all its active requests run
  side by side, one thread each, over a `StepScheduler`, which gathers their pending calls each tick
  and runs them as one batch (continuous batching: each request at its own step). `execute` hands a
  request to its thread and returns; the response goes out through the request's response sender.
  The model admits `active` requests at once, over its processes (each with its own copy of the engines;
  they share the places, `places.py`); the rest wait in the model's own bounded queue (`MethodQueue`; full
  or past its timeout: rejected with UNAVAILABLE).
- ``bls``: a `BLSRunner`, whose calls go to the component models of the same server (their dynamic
  batchers merge the UNet calls of concurrent requests). Each instance runs one request at a time:
  the instance count is the number of active requests, and Triton's bounded queue holds the rest.

Either way `execute` hands each request to a thread of its own and returns at once, so the instance is
back with Triton's scheduler before the response leaves. An instance still inside `execute` when the next
request arrives can make Triton 2.51's dynamic batcher miss its wake-up (with a bounded queue) and hold
that request for 500 ms (`ti2i.benchmarks.queue_stall`).

The plain model answers with the result; the `_stream` twin (decoupled) sends a progress response
before the first step and after each (`stage`, `step` of `steps`, `elapsed` seconds), a latent
preview every `preview_every` steps when asked, then the result. A cancelled request (a gRPC stream
the client cancelled or left) stops at its next step (`CancelWatch` polls every `cancel_poll_ms`, 20),
and the model logs where it stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np

from ti2i.client.registry import get_method
from ti2i.errors import ServerUnavailableError, Ti2iError
from ti2i.families import FAMILY_PARAMETER
from ti2i.manifest import Manifest
from ti2i.triton_models.cancel_watch import CancelWatch
from ti2i.triton_models.method_metrics import MethodMetrics
from ti2i.triton_models.method_io import OUTPUTS, STREAM_OUTPUTS, preview, read_request, result_outputs
from ti2i.triton_models.places import ProcessPlaces, SharedPlaces, shared_places_dir

HOSTED, BLS = "hosted", "bls"
DESIGNS = (HOSTED, BLS)


class Cancelled(Exception):
    """The client cancelled the request (or went away): the loop stops here."""


class MethodQueue:
    """The method model's bounded queue, kept by the model rather than by Triton.

    Triton 2.51's dynamic batcher, which keeps a queue policy (`default_queue_policy`), loses the wake-up of a
    request that arrives while the model's instance is in `execute` (`ti2i.benchmarks.queue_stall`): in
    rounds of 4 concurrent tiny SDEdits at 4 places, 9 of 48 requests waited 0.5 or 1.0 s, and none without
    the policy. So a method model has no queue policy, `execute` hands every request to a thread of its own
    at once, and one that finds every place taken waits here: holding one of `waiting` (the queue's
    `max_queue` places; none free: rejected at once), until a place frees, its timeout passes (the model's
    `queue_timeout_us`, or the request's own when shorter) or its client cancels it."""

    SLICE_S = 0.05  # how often a waiting request looks at its deadline and its cancellation

    def __init__(self, model: Any, places: Any, waiting: Any, timeout_s: float):
        self.model, self.places, self.waiting, self.timeout_s = model, places, waiting, timeout_s

    def admit(self) -> Any:
        """A place in the queue (a ticket), or ServerUnavailableError when it is full."""
        ticket = self.waiting.wait(0) if self.waiting is not None else True
        if ticket is None:
            raise ServerUnavailableError(
                f"{self.model.name}: all {self.places.count} places are taken and the queue is full "
                f"({self.waiting.count} waiting): send it again later")
        return ticket

    def wait_for_place(self, request: Any, ticket: Any) -> Any:
        """A place for the admitted `request`, once one frees; its ticket goes back either way."""
        model = self.model
        model._log_waiting()
        try:
            own = request.timeout() / 1e6 if hasattr(request, "timeout") else 0.0  # a client's shorter limit
            limits = [t for t in (self.timeout_s, own) if t > 0]
            deadline = time.monotonic() + min(limits) if limits else None
            while True:
                place = self.places.wait(self.SLICE_S)
                if place is not None:
                    return place
                if request.is_cancelled():
                    raise Cancelled(f"{model.name}: cancelled while waiting in the queue")
                if deadline is not None and time.monotonic() >= deadline:
                    raise ServerUnavailableError(f"{model.name}: waited {min(limits):g} s in the queue for one of "
                                                 f"{self.places.count} places: send it again later")
        finally:
            if self.waiting is not None:
                self.waiting.release(ticket)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.method = get_method(params["method"])
        self.name = args.get("model_name", self.method.name)
        if params.get("preload") == "1":  # else the first request imports the loop (torch, diffusers)
            self.method.func()
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.cancels = CancelWatch(float(params.get("cancel_poll_ms", "20")) / 1000)
        self.design = params.get("design", BLS)
        processes = int(params.get("processes", "1"))  # hosted: the Triton instances of this model
        lanes = int(params.get("lanes", "1"))  # hosted: each process's step scheduler lanes
        manifest = Manifest.load(params["engine_dir"])
        if self.design == HOSTED:
            from ti2i.client.methods import components_for
            from ti2i.client.runners import InProcessRunner
            from ti2i.engines.step_scheduler import StepScheduler

            budgets = json.loads(params["memory_budget"]) if params.get("memory_budget") else None  # by component
            self.manifest = manifest
            # the model's processes and their lanes split the cores: 2 processes of 2 intra-op threads each on 2
            # cores ran a tiny SDEdit at 1.14-1.17x in-process, of 1 thread each at 0.97x, and served 8 clients 31
            # against 34 req/s
            threads = int(params.get("threads", "0")) or (
                max(1, len(os.sched_getaffinity(0)) // (processes * lanes)) if processes * lanes > 1 else None)
            engines = InProcessRunner(manifest.root, budget=budgets, threads=threads)
            cores = f"{threads} intra-op thread(s)" if threads else "every core"
            in_lanes = f" in {lanes} lanes" if lanes > 1 else ""
            pb_utils.Logger.log_info(f"{self.name}: one of {processes} processes sharing {params.get('active', '1')} "
                                     f"places{in_lanes}, engines on {cores}")
            self.runner: Any = StepScheduler(engines, max_wait_s=float(params.get("max_wait_ms", "10")) / 1000,
                                             lanes=lanes)
            self.metrics: MethodMetrics | None = MethodMetrics(
                pb_utils, self.name, args.get("model_instance_name", self.name), self.runner.executions)
            self.loaded: set[str] = set()
            self.needed = {c for c in components_for([self.method.name]) if c in manifest.components}
            self.load_lock = threading.Lock()
            if params.get("preload") == "1":
                try:
                    self._load_engines()
                except ServerUnavailableError as err:  # the model still loads; its requests say why they wait
                    pb_utils.Logger.log_warn(str(err))
        else:
            from ti2i.triton_models.bls import BLSRunner

            self.runner = BLSRunner(manifest, pb_utils, family=params.get(FAMILY_PARAMETER))
            self.metrics = None  # the component models' own statistics say what a BLS loop ran
        # hosted: the model's active places, shared by its processes when it has several (places.py); bls: one
        # loop per instance (the runner keeps one sample)
        if self.design == HOSTED and processes > 1:
            self.places: Any = SharedPlaces(shared_places_dir(self.name), int(params["active"]))
        else:
            self.places = ProcessPlaces(int(params.get("active", "1")) if self.design == HOSTED else 1)
        self.queue: MethodQueue | None = None  # bls: Triton's bounded queue
        if self.design == HOSTED:
            max_queue, timeout_us = int(params.get("max_queue", "0")), int(params.get("queue_timeout_us", "0"))
            waiting = (SharedPlaces(shared_places_dir(self.name) / "queue", max_queue) if processes > 1 else
                       ProcessPlaces(max_queue)) if max_queue else None  # 0: no bound
            self.queue = MethodQueue(self, self.places, waiting, timeout_us / 1e6)
        self.threads: set[threading.Thread] = set()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            if self.queue is None:  # bls: one loop per instance, a busy one waits here; Triton's queue holds the rest
                place, ticket = self.places.acquire(on_wait=self._log_waiting), None
            else:  # hosted: never waits here; a request without a free place waits in its thread (MethodQueue)
                place, ticket = self.places.wait(0), None
                if place is None:
                    try:
                        ticket = self.queue.admit()
                    except ServerUnavailableError as err:  # the queue is full: refused here, without a thread
                        request.get_response_sender().send(self._error(err),
                                                           flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                        continue
            thread = threading.Thread(target=self._answer, args=(request, place, ticket), daemon=True,
                                      name=f"{self.method.name}-request")
            self.threads.add(thread)
            thread.start()

    def _log_waiting(self) -> None:
        self.pb.Logger.log_info(f"{self.name}: all {self.places.count} places are taken; a request waits")

    def _answer(self, request: Any, place: Any, ticket: Any = None) -> None:
        sender = request.get_response_sender()
        try:
            if place is None and self.queue is not None:  # ServerUnavailableError past the timeout
                place = self.queue.wait_for_place(request, ticket)
        except Exception as err:
            self.threads.discard(threading.current_thread())
            gone = isinstance(err, Cancelled) and self.decoupled  # the stream closes without a result
            sender.send(None if gone else self._error(err), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if self.metrics is not None:
            self.metrics.started()
        try:
            final = self._stream(request, sender) if self.decoupled else self._respond(request)
        except Exception as err:  # never a request without its final response
            final = self._error(err)
        finally:
            self.threads.discard(threading.current_thread())
            self.places.release(place)  # free before the answer leaves: its client's next request finds it free
            if self.metrics is not None:
                self.metrics.finished()
        sender.send(final, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _load_engines(self) -> None:
        """Load the engines this method calls, once: each copy of a model's weights only if the machine has
        the memory for it now; else the request is refused (UNAVAILABLE) and the server keeps what it has."""
        from ti2i.budget import MARGIN, format_bytes, loadable_memory, loading_one_at_a_time

        if self.loaded >= self.needed:
            return
        with self.load_lock, loading_one_at_a_time():  # each check sees the copies other processes loaded
            for name in sorted(self.needed - self.loaded):
                entry = self.manifest.components[name]
                need = int(MARGIN * entry.memory.base) if entry.memory is not None else 0
                free = loadable_memory()
                if need > free:
                    raise ServerUnavailableError(
                        f"{self.name}: loading {name} needs about {format_bytes(need)} and the server may take "
                        f"{format_bytes(free)} more now; serve fewer methods (--methods), or the BLS design "
                        f"(--method-design bls), whose method models share the component models")
                self.runner.engines.engine(name)
                self.loaded.add(name)

    # --- one request -----------------------------------------------------------------------------------

    def _call(self, request: Any, on_step: Any) -> tuple[Any, str]:
        def get(name: str) -> np.ndarray | None:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        call, fmt = read_request(self.method, get)
        if self.design == HOSTED:
            self._load_engines()
            with self.runner.request():  # resets this thread's last sample
                return self.method(self.runner, progress=on_step, **call), fmt
        self.runner.last_sample = None  # one request at a time per BLS instance
        return self.method(self.runner, progress=on_step, **call), fmt

    def _check_cancelled(self, cancelled: Any, stage: str, step: int, steps: int) -> None:
        if cancelled.is_set():
            message = f"{self.name}: cancelled at {stage} step {step} of {steps}"
            self.pb.Logger.log_info(message)
            raise Cancelled(message)

    def _respond(self, request: Any) -> Any:
        cancelled = self.cancels.watch(request)

        def on_step(stage: str, step: int, steps: int) -> None:
            self._check_cancelled(cancelled, stage, step, steps)

        try:
            result, fmt = self._call(request, on_step)
            return self._result(result, fmt, self._wanted(request, OUTPUTS))
        except Exception as err:  # one request's failure never reaches the others or the server
            return self._error(err)
        finally:
            self.cancels.unwatch(request)

    def _stream(self, request: Any, sender: Any) -> Any:
        """Send the progress responses; return the final one (None when the client has gone)."""
        cancelled = self.cancels.watch(request, sender)
        start = time.perf_counter()
        every = self._preview_every(request)

        def on_step(stage: str, step: int, steps: int) -> None:
            self._check_cancelled(cancelled, stage, step, steps)
            tensors = {"stage": np.array([stage.encode()], dtype=object), "step": np.array([step], dtype=np.int64),
                       "steps": np.array([steps], dtype=np.int64),
                       "elapsed": np.array([time.perf_counter() - start], dtype=np.float64)}
            sample = self.runner.last_sample
            if every and step and step % every == 0 and sample is not None:
                tensors["preview"] = preview(sample, self.method.latent_layout)
            sender.send(self._response(tensors))

        try:
            result, fmt = self._call(request, on_step)
            # generate_stream asks for every output: then the result travels as base64 text only (JSON-safe)
            final = self._result(result, fmt, self._wanted(request, ("encoded_base64",)))
        except Cancelled:
            final = None  # the client has gone: the stream closes without a result
        except Exception as err:
            final = self._error(err)
        finally:
            self.cancels.unwatch(request)  # before the final response, which frees the request (cancel_watch.py)
        return final

    # --- responses ---------------------------------------------------------------------------------------

    def _wanted(self, request: Any, default: tuple[str, ...]) -> list[str]:
        """The result outputs the request names; `default` when it names none, or all of them (as
        `generate_stream` does: it cannot name any), so an SSE event stays JSON text."""
        requested = set(request.requested_output_names())
        names = [n for n in OUTPUTS if n in requested]
        return list(default) if not names or (self.decoupled and requested >= {*OUTPUTS, *STREAM_OUTPUTS}) else names

    def _preview_every(self, request: Any) -> int:
        tensor = self.pb.get_input_tensor_by_name(request, "preview_every")
        return max(int(tensor.as_numpy().reshape(-1)[0]), 0) if tensor is not None else 0

    def _result(self, result: Any, fmt: str, wanted: list[str]) -> Any:
        return self._response(result_outputs(result, fmt, wanted))

    def _response(self, tensors: dict[str, np.ndarray]) -> Any:
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in tensors.items()])

    def _error(self, err: Exception) -> Any:
        errors = self.pb.TritonError
        if isinstance(err, ServerUnavailableError):
            code = errors.UNAVAILABLE
        elif isinstance(err, Cancelled):
            code = errors.CANCELLED
        else:
            code = errors.INVALID_ARG if isinstance(err, Ti2iError) else errors.INTERNAL
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(err).__name__}: {err}", code))

    def finalize(self) -> None:
        self.cancels.close()
        for thread in list(getattr(self, "threads", ())):  # unloading: let the running requests answer
            thread.join(timeout=60)
        if self.design == HOSTED:
            self.runner.engines.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
