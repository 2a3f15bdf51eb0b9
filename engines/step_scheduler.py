"""The step scheduler: continuous batching of diffusion loops that run side by side in one process.

Each active request runs its method's own function (the client's loop) in its own thread, over this
runner. A call does not run at once: it waits until every active request has a call pending (each
loop has reached its next component call: the next UNet step, or its prompt encoding, or its
decoding), or until the oldest pending call has waited `max_wait_s`. Then one thread runs the tick:
the pending calls of each batched model whose inputs agree beyond the batch dimension are
concatenated and run as one engine call (in chunks that fit the engine's memory budget), and the
outputs are split back. Requests join and leave between ticks, each at its own step (the UNet takes a
per-sample timestep), so a new request never waits for the others' loops to finish.

A merged call that fails on one request's input is run again call by call, so only that request gets
the error. Results equal the unbatched loop's up to the engine's batch-size rounding (≤ 1e-6 here).

The loops call `run_tensors`, and the scheduler keeps their torch tensors where the engines keep them: merged
with `torch.cat`, run by the engines' `run_tensors` (a GPU engine's device path: no host copy per step; on
the CPU the very numpy arrays `run` would see), split with `torch.split`. Calls through `run` stay numpy.

Each call carries its request's tag (the method name in the engine core), so the scheduler counts how
many requests' calls, and of which methods, each engine call merged (`executions`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ti2i.engines.adapters import with_defaults
from ti2i.engines.batching import batch_size, budget_chunks, merge_requests, shape_key, split_outputs
from ti2i.errors import InvalidInputError, ServerUnavailableError, Ti2iError
from ti2i.runner import Runner, to_numpy


@dataclass
class _Call:
    model: str
    outputs: tuple[str, ...] | None
    inputs: dict[str, np.ndarray]
    tag: str = ""
    tensors: bool = False  # torch tensors on the engines' device (`run_tensors`), else numpy (`run`)
    deadline: float | None = None  # (monotonic) a call not started by then is refused, not run
    since: float = field(default_factory=time.monotonic)
    result: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    done: bool = False


class StepScheduler(Runner):
    """A runner shared by the loops of concurrent requests; see the module docstring.

    `engines` is an in-process runner of one model family (`InProcessRunner`): its `run`, `spec_of` and
    `engine`. Loops run inside `with scheduler.request(tag):`; a call made outside one (a client's single
    component call) runs at the next tick without waiting for anyone.
    """

    # Merged calls of this many requests or more run as two halves side by side on engines that take concurrent
    # calls: 8 tiny SDEdit clients on 2 cores got 1.43-1.70x over one client with them, 1.37x without
    # (docs/design-notes.md); below it, each half would hold a request or so and merging is what pays.
    SPLIT_FROM = 4

    def __init__(self, engines: Any, max_wait_s: float = 0.01):
        if not max_wait_s >= 0:
            raise InvalidInputError(f"max_wait_s must be a number ≥ 0, got {max_wait_s}")
        self.engines = engines
        self.pipeline = engines.pipeline
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._active = 0
        self._pending: list[_Call] = []
        self._ticking = False
        self._local = threading.local()
        # (model, ((tag, its samples), ...), requests' calls merged, samples in them) -> engine calls: what batching did
        self.executions: Counter[tuple[str, tuple[tuple[str, int], ...], int, int]] = Counter()

    @contextlib.contextmanager
    def request(self, tag: str = "") -> Iterator[StepScheduler]:
        """The calling thread runs one request's loop (`tag`: what its calls count as): ticks wait for its calls."""
        with self._cond:
            self._active += 1
        self._local.tag = tag
        self._local.in_request = True
        self.last_sample = None  # a thread serves one request after another
        try:
            yield self
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # the others may all be waiting now
            self._local.in_request = False

    @property
    def adapters(self) -> Any:
        """The adapters the requests may name (the engines' registry)."""
        return self.engines.adapters

    @property
    def active(self) -> int:
        return self._active

    @property
    def last_sample(self) -> Any:
        """The latest UNet input of this thread's request, for previews (a device tensor on a device runner)."""
        return getattr(self._local, "last_sample", None)

    @last_sample.setter
    def last_sample(self, value: np.ndarray | None) -> None:
        self._local.last_sample = value

    @property
    def device(self) -> Any:
        return self.engines.device

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self._call(model, outputs, inputs, tensors=False)

    def run_tensors(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        return self._call(model, outputs, inputs, tensors=True)

    def run_within(self, timeout_s: float, model: str, outputs: Sequence[str] | None,
                   inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run`, refused (ServerUnavailableError) if no tick has started it within `timeout_s` (0: no limit)."""
        return self._call(model, outputs, inputs, tensors=False, timeout_s=timeout_s)

    def _call(self, model: str, outputs: Sequence[str] | None, inputs: dict[str, Any],
              tensors: bool, timeout_s: float = 0.0) -> dict[str, Any]:
        if "sample" in inputs:
            self._local.last_sample = inputs["sample"] if tensors else np.asarray(inputs["sample"])
        tag = getattr(self._local, "tag", "") if getattr(self._local, "in_request", False) else ""
        try:  # "no adapter" filled in here, so that calls with adapters and without merge
            inputs = with_defaults(self.engines.spec_of(model), inputs)
        except Ti2iError:
            pass  # the call itself reports the unknown model
        call = _Call(model, tuple(outputs) if outputs else None, dict(inputs), tag, tensors)
        if timeout_s > 0:
            call.deadline = call.since + timeout_s
        with self._cond:
            self._pending.append(call)
            self._cond.notify_all()
            while not call.done:
                wait = self._tick_wait()
                if wait is None:
                    self._tick()
                else:
                    self._cond.wait(wait)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _tick_wait(self) -> float | None:
        """None when a tick is due now (the lock held); else how long to wait before looking again."""
        if self._ticking or not self._pending:
            return self.max_wait_s
        if len(self._pending) >= self._active:
            return None
        waited = time.monotonic() - self._pending[0].since
        return None if waited >= self.max_wait_s else self.max_wait_s - waited

    def _tick(self) -> None:
        """Run the pending calls (the lock held on entry and exit, released while the engines run)."""
        calls, self._pending, self._ticking = self._pending, [], True
        now = time.monotonic()
        for call in [c for c in calls if c.deadline is not None and now > c.deadline]:
            waited, limit = now - call.since, call.deadline - call.since
            call.error = ServerUnavailableError(f"{call.model}: waited {waited:.3g} s for the engine, past its timeout "
                                                f"of {limit:.3g} s: send it again later")
            call.done = True
            calls.remove(call)
        self._cond.release()
        try:
            for group in self._groups(calls):
                self._run_group(group)
        finally:
            self._cond.acquire()
            self._ticking = False
            self._cond.notify_all()

    def _groups(self, calls: list[_Call]) -> list[list[_Call]]:
        """Calls that may run as one: the same batched model, outputs and shapes beyond the batch dimension."""
        groups: dict[Any, list[_Call]] = {}
        for i, call in enumerate(calls):
            try:
                batched = self.engines.spec_of(call.model).batched
            except Ti2iError:
                batched = False  # the call itself reports the unknown model
            key = (call.model, call.outputs, call.tensors, shape_key(call.inputs)) if batched else i
            groups.setdefault(key, []).append(call)
        return list(groups.values())

    def _run_group(self, calls: list[_Call]) -> None:
        sizes = [batch_size(c.inputs) for c in calls]
        engine = self._engine(calls[0].model)
        chunks = [len(calls)]
        on_host = not calls[0].tensors or all(getattr(v, "device", None) is None or v.device.type == "cpu"
                                              for v in calls[0].inputs.values())
        if engine is not None and len(calls) > 1 and on_host:  # device engines: no memory model
            try:  # the calls agree beyond the batch dimension: the first's dims bound them all
                probe = {k: to_numpy(v) for k, v in calls[0].inputs.items()}  # CPU tensors: views, no copy
                chunks = budget_chunks(engine, engine.check(probe), sizes)
            except Ti2iError:
                pass  # each call reports its own error below
        if len(chunks) == 1 and len(calls) >= self.SPLIT_FROM and getattr(engine, "concurrent_calls", False):
            # one merged call that fits: run it as two merged halves side by side (an engine that takes
            # concurrent calls keeps both cores busy where one call of a small batch does not)
            half = len(calls) // 2
            side = threading.Thread(target=self._run_chunk, args=(calls[half:],), name="ti2i-step-half")
            side.start()
            try:
                self._run_chunk(calls[:half])
            finally:
                side.join()
            return
        start = 0
        for count in chunks:
            self._run_chunk(calls[start:start + count])
            start += count

    def _engine(self, model: str) -> Any:
        try:
            return self.engines.engine(model) if model in self.engines.manifest.components else None
        except Ti2iError:
            return None

    def _run_chunk(self, calls: list[_Call]) -> None:
        first = calls[0]
        run = self.engines.run_tensors if first.tensors else self.engines.run
        try:
            if len(calls) == 1:
                results = [run(first.model, first.outputs, **first.inputs)]
            else:
                merged = run(first.model, first.outputs, **merge_requests([c.inputs for c in calls]))
                results = split_outputs(merged, [batch_size(c.inputs) for c in calls])
        except Exception as err:
            if len(calls) > 1:  # find the call that failed: each on its own
                for call in calls:
                    self._run_chunk([call])
                return
            first.error, first.done = err, True
            return
        per_tag: Counter[str] = Counter()
        for call in calls:
            per_tag[call.tag] += batch_size(call.inputs)
        tags = tuple(sorted(per_tag.items()))
        with self._cond:
            self.executions[(first.model, tags, len(calls), sum(batch_size(c.inputs) for c in calls))] += 1
        for call, result in zip(calls, results):
            call.result, call.done = result, True
