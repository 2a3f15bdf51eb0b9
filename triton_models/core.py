"""The engine core of one model family: its engines loaded once, every caller's calls batched together.

Every method request of the family (whichever method model or stream twin it came through) runs its
method's own function (the client's loop, not a copy) in a thread of its own over one `StepScheduler`,
which gathers the pending component calls of all active loops, and the client-driven component calls,
and runs each model's calls as one engine call: continuous batching across methods, each request at its
own step.

Admission bounds what a request may cost and how long it may live: `active` loops run at once, at most
`max_queue` more wait (one more is refused at once), a waiting request is refused after `queue_timeout_s`
(or its client's shorter limit), a cancelled one leaves the queue or stops at its next step, and the work
a request asks for is checked against the operator's ceilings (`WorkLimits`) before it waits at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.client.registry import Method
from ti2i.engines.adapters import ADAPTER_MODULES, AdapterRegistry
from ti2i.engines.loader import check_choice, describe_choice, engine_choice
from ti2i.errors import InvalidInputError, ServerUnavailableError, Ti2iError
from ti2i.runner import to_numpy
from ti2i.triton_models.method_io import preview, result_outputs
from ti2i.work_limits import WorkLimits


class Cancelled(Exception):
    """The client cancelled the request (or went away): its loop stops here."""


@dataclass(frozen=True)
class CoreOptions:
    """The operator's knobs of a family's core (`ti2i serve`)."""

    active: int = 4  # method requests whose loops run at once (their steps batch together)
    max_queue: int = 32  # method requests that may wait for a place; one more is refused (UNAVAILABLE)
    queue_timeout_s: float = 30.0  # how long one may wait (a client may ask for less)
    threads: int = 0  # intra-op threads of the engines (0: every core)
    backend: str = "ort"  # the engines: ort (ONNX Runtime), openvino, aoti or tensorrt (`ti2i build`'s outputs)
    precision: str = "auto"  # openvino: auto (bf16 where the CPU has bf16 units), fp32 or bf16
    device: str = "cpu"
    limits: WorkLimits = WorkLimits()
    adapters: tuple[tuple[str, str], ...] = ()  # (name, path) of each LoRA requests may name (`--lora NAME=PATH`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple((str(n), str(p)) for n, p in self.adapters))  # JSON: lists
        for name, low in (("active", 1), ("max_queue", 0), ("threads", 0)):
            if getattr(self, name) < low:
                raise InvalidInputError(f"{name.replace('_', ' ')} must be ≥ {low}, got {getattr(self, name)}")
        if not self.queue_timeout_s > 0:
            raise InvalidInputError(f"the queue timeout must be > 0 s, got {self.queue_timeout_s}")
        check_choice(self.backend, self.precision)


class Admission:
    """`active` places and a bounded, timed queue in front of them."""

    SLICE_S = 0.05  # how often a waiting request looks at its deadline and its cancellation

    def __init__(self, active: int, max_queue: int, timeout_s: float):
        self.active, self.max_queue, self.timeout_s = active, max_queue, timeout_s
        self.running = self.waiting = 0
        self._cond = threading.Condition()

    def limit(self, timeout_s: float = 0.0) -> float:
        """How long a request may wait: the queue timeout, or the client's `timeout_s` when shorter."""
        return min(t for t in (self.timeout_s, timeout_s) if t > 0)

    @contextmanager
    def place(self, cancelled: threading.Event, timeout_s: float = 0.0) -> Iterator[float]:
        """Hold a place while the block runs; yields the seconds waited for it. Refused (ServerUnavailableError)
        when the queue is full or the wait passes the limit (`limit`)."""
        start = time.monotonic()
        limit = self.limit(timeout_s)
        with self._cond:
            if self.running >= self.active:
                if self.waiting >= self.max_queue:
                    raise ServerUnavailableError(f"all {self.active} places are taken and the queue is full "
                                                 f"({self.waiting} waiting): send it again later")
                self.waiting += 1
                try:
                    while self.running >= self.active:
                        if cancelled.is_set():
                            raise Cancelled("cancelled while waiting in the queue")
                        if time.monotonic() - start >= limit:
                            raise ServerUnavailableError(f"waited {limit:g} s in the queue for one of {self.active} "
                                                         f"places: send it again later")
                        self._cond.wait(self.SLICE_S)
                finally:
                    self.waiting -= 1
            self.running += 1
        try:
            yield time.monotonic() - start
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify()


class EngineCore:
    """One family's engines and scheduler, shared by all its served models."""

    def __init__(self, engine_dir: str | Path, methods: list[Method], components: list[str],
                 options: CoreOptions = CoreOptions(), budgets: dict[str, int] | None = None, metrics: Any = None,
                 engines: Any = None):
        """`components`: the served components (those the methods call among them), loaded at `load`;
        `engines`: the family's in-process runner (default: one over `engine_dir` as the options say)."""
        from ti2i.client.runners import InProcessRunner
        from ti2i.engines.step_scheduler import StepScheduler

        self.options = options
        self.methods = {m.name: m for m in methods}
        self.components = list(components)
        self.choice = engine_choice(options.backend, options.precision)
        self.engines = engines or InProcessRunner(engine_dir, budget=budgets, threads=options.threads or None,
                                                  device=options.device, **self.choice)
        modules = self.engines.pipeline.get(ADAPTER_MODULES, {})
        self.engines.adapters = AdapterRegistry(modules, dict(options.adapters) if modules else {})
        self.scheduler = StepScheduler(self.engines)
        self.admission = Admission(options.active, options.max_queue, options.queue_timeout_s)
        # client-driven component calls are bounded like method requests: as many in flight as run and wait
        self.component_places = options.active + options.max_queue
        self._component_calls = threading.BoundedSemaphore(self.component_places)
        self.metrics = metrics
        self._cancels: dict[str, tuple[threading.Event, str]] = {}  # token -> (its cancellation, its entry)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return describe_choice(self.choice, self.options.device)

    def load(self) -> list[str]:
        """Load every served engine (and import the methods' loops), so that ready means warm."""
        for method in self.methods.values():
            method.func()
        for name in self.components:
            self.engines.engine(name)
        return self.components

    # --- methods ---------------------------------------------------------------------------------------

    def run_method(self, name: str, call: dict[str, Any], fmt: str, outputs: list[str], token: str,
                   on_step: Callable[[dict[str, np.ndarray]], None] | None = None, preview_every: int = 0,
                   timeout_s: float = 0.0, origin: str = "") -> dict[str, np.ndarray]:
        """Run one request of method `name`; `on_step` gets each progress response's tensors (a stream);
        `origin`: the entry model it came through (`cancel_from`)."""
        method = self.methods.get(name)
        if method is None:
            raise InvalidInputError(f"this server's core serves {sorted(self.methods)}, not {name!r}")
        self.options.limits.check(name, call)
        cancelled = self._watch(token, origin)
        try:
            with self.admission.place(cancelled, timeout_s) as waited:
                if self.metrics is not None:
                    self.metrics.started(name, waited)
                result = self._loop(method, call, cancelled, on_step, preview_every)
        finally:
            with self._lock:
                self._cancels.pop(token, None)
        out = result_outputs(result, fmt, outputs)
        if "pixels" in out and out["pixels"].ndim == 3:
            out["pixels"] = out["pixels"][None]  # the core's pixels always hold frames
        return out

    def _loop(self, method: Method, call: dict[str, Any], cancelled: threading.Event,
              on_step: Callable[[dict[str, np.ndarray]], None] | None, preview_every: int) -> Any:
        start = time.perf_counter()

        def progress(stage: str, step: int, steps: int) -> None:
            if cancelled.is_set():
                raise Cancelled(f"{method.name}: cancelled at {stage} step {step} of {steps}")
            if on_step is None:
                return
            tensors = {"stage": np.array([stage.encode()], dtype=object), "step": np.array([step], dtype=np.int64),
                       "steps": np.array([steps], dtype=np.int64),
                       "elapsed": np.array([time.perf_counter() - start], dtype=np.float64)}
            sample = self.scheduler.last_sample
            if preview_every and step and step % preview_every == 0 and sample is not None:
                tensors["preview"] = preview(to_numpy(sample), method.latent_layout)  # a device latent: one copy
            on_step(tensors)

        with self.scheduler.request(method.name):
            return method(self.scheduler, progress=progress, **call)

    def _watch(self, token: str, origin: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            if token in self._cancels:
                raise InvalidInputError(f"request token {token!r} is in use")
            self._cancels[token] = (event, origin)
        return event

    def cancel(self, token: str) -> bool:
        """Cancel the request `token` names: it leaves the queue, or stops at its next step."""
        with self._lock:
            event, _ = self._cancels.get(token, (None, ""))
        if event is not None:
            event.set()
        return event is not None

    def cancel_from(self, origin: str) -> int:
        """Cancel every request that came through the entry model `origin` (its stub died: nobody can read
        their answers); returns how many."""
        with self._lock:
            events = [event for event, source in self._cancels.values() if source == origin]
        for event in events:
            event.set()
        return len(events)

    # --- component calls -------------------------------------------------------------------------------

    def run_component(self, name: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                      timeout_s: float = 0.0) -> dict[str, np.ndarray]:
        """A client's single component call: it joins the next tick of the active loops' calls. Refused when
        `component_places` calls are in flight, or when no tick has started it within the admission's limit."""
        if name not in self.components:
            raise InvalidInputError(f"this server's core serves no component {name!r}")
        if not self._component_calls.acquire(blocking=False):
            raise ServerUnavailableError(f"{name}: all {self.component_places} places for component calls are taken: "
                                         f"send it again later")
        try:
            return self.scheduler.run_within(self.admission.limit(timeout_s), name, outputs, inputs)
        except Ti2iError:
            raise
        except Exception as err:  # an engine failure fails this call, never the core
            raise RuntimeError(f"{name}: {err}") from err
        finally:
            self._component_calls.release()

    def close(self) -> None:
        self.engines.close()
