"""The step scheduler: continuous batching of diffusion loops that run side by side in one process.

Each active request runs its method's own function (the client's loop) in its own thread, over this
runner. A call does not run at once: it waits until every active request that is not waiting on a
running tick has a call pending (each loop has reached its next component call: the next UNet step,
or its prompt encoding, or its decoding), or until the oldest pending call has waited `max_wait_s`.
Then one of those calls' threads runs the tick: the pending calls of each batched model whose inputs
agree beyond the batch dimension are concatenated and run as one engine call (in chunks that fit the
engine's memory budget), and the outputs are split back. Requests join and leave between ticks, each
at its own step (the UNet takes a per-sample timestep), so a new request never waits for the others'
loops to finish.

On CPU engines (whose calls release the interpreter lock) two ticks may run at once, each taking the
pending calls of one model: a tick that would merge `SPLIT_FROM` requests' calls or more while nothing
else runs takes half of them and leaves the rest to a second tick beside it. The two cohorts then keep
alternating on their own: one's loops do their Python (guidance, the scheduler step) while the other's
engine call runs, which keeps both cores busy where one merged call of a small batch and then everyone's
Python, in turn, do not. Calls whose memory estimates would together pass the headroom never run at once.
A device's engines keep one tick at a time, with every pending call: the largest batches.

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


@dataclass(eq=False)  # calls are told apart by identity
class _Call:
    model: str
    outputs: tuple[str, ...] | None
    inputs: dict[str, np.ndarray]
    wake: threading.Condition  # its thread waits on this (over the scheduler's lock)
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

    # Ticks that may run at once on CPU engines (docs/design-notes.md: a third gave more at the tiny size on 2 cores
    # but cost SD 1.5-size calls 12-16 %, three engine calls sharing two cores).
    CPU_LANES = 2
    # A tick that would take this many calls of one model with nothing else running takes half of them; below it,
    # each half would hold a request or so and merging is what pays.
    SPLIT_FROM = 4
    ESTIMATES_KEPT = 256  # shapes whose memory estimate is kept (cleared when full: clients choose the sizes)

    def __init__(self, engines: Any, max_wait_s: float = 0.01):
        if not max_wait_s >= 0:
            raise InvalidInputError(f"max_wait_s must be a number ≥ 0, got {max_wait_s}")
        self.engines = engines
        self.pipeline = engines.pipeline
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()  # guards everything below; each call's thread waits on its call's `wake`
        self._cond = threading.Condition(self._lock)  # for ticks waiting on the memory headroom (`_reserve`)
        self._active = 0
        self._pending: list[_Call] = []
        self._ticks = 0  # ticks running
        self._running = 0  # calls in them
        self._on_cpu = getattr(getattr(engines, "device", None), "type", "cpu") == "cpu"  # ticks may overlap
        self._reserved = 0  # estimated bytes the running calls hold above their engines' weights (`_reserve`)
        self._estimates: dict[tuple, tuple[dict[str, int], float]] = {}  # `_estimate`'s, per model and shape
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
            with self._lock:
                self._active -= 1
                self._wake_pending()  # the others may all be waiting now
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
        if not inputs or any(np.ndim(v) == 0 for v in inputs.values()):  # torch tensors too (`.ndim`)
            raise InvalidInputError(f"{model}: every input needs a batch dimension, got "
                                    f"{ {k: tuple(np.shape(v)) for k, v in inputs.items()} }")
        tag = getattr(self._local, "tag", "") if getattr(self._local, "in_request", False) else ""
        try:  # "no adapter" filled in here, so that calls with adapters and without merge
            inputs = with_defaults(self.engines.spec_of(model), inputs)
        except Ti2iError:
            pass  # the call itself reports the unknown model
        call = _Call(model, tuple(outputs) if outputs else None, dict(inputs), threading.Condition(self._lock), tag,
                     tensors)
        if timeout_s > 0:
            call.deadline = call.since + timeout_s
        with self._lock:
            self._pending.append(call)  # no one else to wake: if a tick is due now, this thread runs it
            while not call.done:
                wait = self._tick_wait() if call in self._pending else self.max_wait_s
                if wait is None:  # a tick's runner is one of its calls' threads, so it returns with them
                    self._tick(call)
                else:
                    call.wake.wait(wait)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _tick_wait(self) -> float | None:
        """None when a tick is due now (the lock held); else how long to wait before looking again."""
        if not self._pending or self._ticks >= self._lanes():
            return self.max_wait_s
        if len(self._pending) >= self._active - self._running:
            return None
        waited = time.monotonic() - self._pending[0].since
        return None if waited >= self.max_wait_s else self.max_wait_s - waited

    def _lanes(self) -> int:
        """How many ticks may run at once: `CPU_LANES` on CPU engines, one on a device's."""
        return self.CPU_LANES if self._on_cpu else 1

    def _tick(self, own: _Call) -> None:
        """Run pending calls, `own`'s among them (the lock held on entry and exit, released while the engines run)."""
        groups = [[c for c in group if not self._expired(c)] for group in self._take(own)]
        calls = [c for group in groups for c in group]
        self._ticks += 1
        self._running += len(calls)
        self._wake_pending()  # what is left pending may be a second tick's
        self._lock.release()
        failure = None
        try:
            for group in groups:
                if group:
                    self._run_group(group)
        except Exception as err:  # a fault of the tick itself (each call's own failure is settled in `_run_chunk`)
            failure = err
        finally:
            self._lock.acquire()
            self._ticks -= 1
            self._running -= len(calls)
            for call in calls:  # no call this tick took is left waiting for good
                if not call.done:
                    self._done(call, error=failure or RuntimeError(f"{call.model}: the tick running it stopped"))
            self._wake_pending()

    def _wake_pending(self) -> None:
        """Wake the threads of pending calls (the lock held), to see whether a tick is due. The threads of
        running calls sleep on until their own call is done (`_done`): a thread per active request waking at
        every change cost more than a thousand context switches a request at 8 concurrent requests."""
        for call in self._pending:
            call.wake.notify()

    @staticmethod
    def _done(call: _Call, result: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Settle `call` and wake its thread (the lock held)."""
        call.result, call.error, call.done = result, error, True
        call.wake.notify()

    def _take(self, own: _Call) -> list[list[_Call]]:
        """The groups of pending calls this tick runs (`_groups`). One tick at a time: all of them. Where ticks
        may overlap: the group `own` belongs to (the others are another tick's), and only half of it when it holds
        `SPLIT_FROM` calls or more and no other tick runs (the other half is a second tick's, beside it)."""
        pending = self._pending
        if self._lanes() == 1:
            self._pending = []
            return self._groups(pending)
        group = self._groups([own, *(c for c in pending if c is not own)])[0]
        if self._ticks == 0 and len(group) >= self.SPLIT_FROM:
            group = group[:(len(group) + 1) // 2]
        chosen = {id(c) for c in group}
        self._pending = [c for c in pending if id(c) not in chosen]
        return [group]

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
        chunks, per_item = [len(calls)], 0.0
        on_host = not calls[0].tensors or all(getattr(v, "device", None) is None or v.device.type == "cpu"
                                              for v in calls[0].inputs.values())
        overlap = len(calls) > 1 or self._lanes() > 1
        if overlap and engine is not None and on_host and engine.memory is not None and engine.budget is not None:
            try:
                bound, per_item = self._estimate(engine, calls[0])
                chunks = budget_chunks(engine, bound, sizes)
            except Ti2iError:
                pass  # each call reports its own error below
        start = 0
        for count in chunks:
            part, growth = self._reserve(engine, per_item, calls[start:start + count])
            start += count
            if not part:
                continue
            try:
                self._run_chunk(part)
            finally:
                with self._cond:
                    self._reserved -= growth
                    self._cond.notify_all()

    def _estimate(self, engine: Any, call: _Call) -> tuple[dict[str, int], float]:
        """The dims `call` binds and its memory growth per batch item, kept per shape: the calls of a group agree
        beyond the batch dimension, so the first's dims bound them all, and a loop repeats its shapes each step."""
        key = (call.model, shape_key(call.inputs))
        if key not in self._estimates:
            if len(self._estimates) >= self.ESTIMATES_KEPT:
                self._estimates.clear()
            probe = {k: to_numpy(v) for k, v in call.inputs.items()}  # CPU tensors: views, no copy
            bound = engine.check(probe)
            self._estimates[key] = bound, engine.memory.growth(bound) / max(batch_size(call.inputs), 1)
        return self._estimates[key]

    def _reserve(self, engine: Any, per_item: float, part: list[_Call]) -> tuple[list[_Call], int]:
        """Wait until the engine's headroom (its budget beyond its weights: in an engine core, the family's one
        headroom) holds `part`'s estimated growth beside the chunks running in other ticks, whichever engines
        they run on, and hold it (a chunk alone always fits: `budget_chunks`). Calls whose deadline passes
        meanwhile are refused, as in the queue: returns the calls left and the bytes held for them."""
        with self._cond:
            while True:
                part = [c for c in part if not self._expired(c)]
                growth = int(per_item * sum(batch_size(c.inputs) for c in part))
                held = self._reserved
                if not part or growth == 0 or held == 0 or held + growth <= engine.budget - engine.memory.base:
                    break
                deadlines = [c.deadline for c in part if c.deadline is not None]
                self._cond.wait(max(min(deadlines) - time.monotonic(), 0.001) if deadlines else None)
            self._reserved += growth
        return part, growth

    def _expired(self, call: _Call) -> bool:
        """Refuse `call` (the lock held) if its deadline has passed before it ran."""
        now = time.monotonic()
        if call.deadline is None or now <= call.deadline:
            return False
        waited, limit = now - call.since, call.deadline - call.since
        self._done(call, error=ServerUnavailableError(f"{call.model}: waited {waited:.3g} s for the engine, past its "
                                                      f"timeout of {limit:.3g} s: send it again later"))
        return True

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
            with self._lock:
                self._done(first, error=err)
            return
        per_tag: Counter[str] = Counter()
        for call in calls:
            per_tag[call.tag] += batch_size(call.inputs)
        tags = tuple(sorted(per_tag.items()))
        with self._lock:
            self.executions[(first.model, tags, len(calls), sum(batch_size(c.inputs) for c in calls))] += 1
            for call, result in zip(calls, results):
                self._done(call, result)
