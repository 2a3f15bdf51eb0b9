"""The step scheduler: concurrent loops in one process, their calls batched each tick, results unchanged.

In-process, on the tiny SD engines: eight SDEdit requests running at once in eight threads over one
`StepScheduler` give each request's sequential result, while the UNet runs fewer, larger batches; a
call that fails inside a merged batch fails only its own request; a loop that stops (as a cancelled
request does) never holds the others up.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ti2i.client.registry import METHODS
from ti2i.client.runners import InProcessRunner
from ti2i.engines.adapters import with_defaults
from ti2i.engines.step_scheduler import StepScheduler
from ti2i.errors import InvalidInputError

REQUEST = dict(prompt="a watercolor of a house", steps=6, strength=0.5)


def _in_threads(count: int, target, timeout_s: float = 300) -> dict[int, object]:
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except Exception as err:  # the test inspects it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return results


def _unet(scheduler: StepScheduler) -> dict[tuple[int, int], int]:
    """(requests' calls merged, samples) -> UNet engine calls."""
    unet: dict[tuple[int, int], int] = {}
    for (model, _, merged, samples), n in scheduler.executions.items():
        if model == "unet":
            unet[(merged, samples)] = unet.get((merged, samples), 0) + n
    return unet


def test_concurrent_loops_are_batched_and_each_gets_its_own_result(engines, example_image):
    sdedit = METHODS["sdedit"]
    with InProcessRunner(engines.root) as runner:
        alone_scheduler = StepScheduler(runner)  # no request(): each call runs at once, alone
        alone = {seed: sdedit(alone_scheduler, image=example_image, seed=seed, **REQUEST).array for seed in range(8)}
    calls = _unet(alone_scheduler)[(1, 2)]  # each one request's [uncond, cond] batch
    assert set(_unet(alone_scheduler)) == {(1, 2)}
    scheduler = StepScheduler(InProcessRunner(engines.root))

    def request(seed: int) -> np.ndarray:
        with scheduler.request("sdedit"):
            return sdedit(scheduler, image=example_image, seed=seed, **REQUEST).array

    together = _in_threads(8, request)
    for seed in range(8):
        assert np.abs(together[seed] - alone[seed]).max() <= 1e-6, seed
    unet = _unet(scheduler)
    assert sum(unet.values()) < calls and max(s for _, s in unet) > 2, unet  # fewer, larger UNet batches
    assert all(samples == 2 * merged for merged, samples in unet), unet  # each merged call a request's pair
    assert sum(merged * n for (merged, _), n in unet.items()) == calls  # and every call run once
    assert scheduler.active == 0


def test_each_engine_call_counts_the_samples_of_each_method(engines, example_image):
    """Loops of two methods share the UNet's engine calls; the count says which methods' samples each held."""
    scheduler = StepScheduler(InProcessRunner(engines.root), max_wait_s=5.0)  # a tick waits for every loop
    scheduler.CPU_LANES = 1  # one tick at a time, all pending calls: each UNet step merges the four loops'
    gate = threading.Barrier(4)
    names = ["sdedit", "sdedit", "txt2img", "txt2img"]

    def request(i: int) -> object:
        with scheduler.request(names[i]):
            gate.wait()  # all four active before any call
            if names[i] == "sdedit":
                return METHODS["sdedit"](scheduler, image=example_image, seed=i, **REQUEST).array
            return METHODS["txt2img"](scheduler, prompt="hills", steps=4, seed=i, height=example_image.height,
                                     width=example_image.width).array

    results = _in_threads(4, request)
    assert not any(isinstance(r, Exception) for r in results), results
    mixed = [tags for (model, tags, _, _), n in scheduler.executions.items()
             if model == "unet" and {t for t, _ in tags} == {"sdedit", "txt2img"}]
    assert mixed, scheduler.executions  # UNet calls holding both methods' samples
    assert all(sum(s for _, s in tags) == samples for (_, tags, _, samples) in scheduler.executions)


def test_a_bad_call_in_a_merged_batch_fails_only_its_request(engines):
    scheduler = StepScheduler(InProcessRunner(engines.root), max_wait_s=5.0)  # all four join one tick
    latents = np.zeros((1, 4, 8, 8), np.float32)
    gate = threading.Barrier(4)

    def request(i: int) -> np.ndarray:
        sample = latents.copy()
        if i == 2:
            sample[0, 0, 0, 0] = np.nan
        with scheduler.request():
            gate.wait()
            return scheduler.run("vae_decoder", latent=sample)["images"]

    results = _in_threads(4, request)
    assert isinstance(results[2], InvalidInputError) and "finite" in str(results[2])
    for i in (0, 1, 3):
        assert isinstance(results[i], np.ndarray) and results[i].shape[0] == 1, results[i]
    np.testing.assert_array_equal(results[0], results[1])


def test_a_call_without_a_batch_dimension_is_one_clear_error(engines):
    """Original failure: a scalar input reached the tick, whose batching took its length: ``TypeError: len() of
    unsized object``, raised in the thread running the tick (for whichever request that was)."""
    scheduler = StepScheduler(InProcessRunner(engines.root))
    with pytest.raises(InvalidInputError, match="vae_decoder: every input needs a batch dimension"):
        scheduler.run("vae_decoder", latent=np.float32(0))
    assert scheduler.run("vae_decoder", latent=np.zeros((1, 4, 8, 8), np.float32))["images"].shape[0] == 1


def test_a_tick_that_fails_fails_every_call_it_took(engines):
    """Original failure: a fault of a tick itself (not of an engine call, which fails only its own request)
    reached only the thread running the tick; the other requests whose calls it had taken waited for good.
    The fault is injected here: every call the tick took gets it."""
    scheduler = StepScheduler(InProcessRunner(engines.root), max_wait_s=5.0)  # all four join one tick
    scheduler.CPU_LANES = 1

    def fault(calls):
        raise RuntimeError("a fault of the tick")

    scheduler._run_group = fault
    gate = threading.Barrier(4)

    def request(i: int) -> np.ndarray:
        with scheduler.request():
            gate.wait()
            return scheduler.run("vae_decoder", latent=np.zeros((1, 4, 8, 8), np.float32))["images"]

    results = _in_threads(4, request, timeout_s=30)
    assert len(results) == 4, "a request waits on"
    assert all(isinstance(r, RuntimeError) and "fault of the tick" in str(r) for r in results.values()), results
    assert scheduler.active == 0


class Stop(Exception):
    pass


def test_a_loop_that_stops_never_holds_the_others(engines, example_image):
    """A request that raises from its progress callback (a cancelled one) leaves; the ticks go on without it."""
    sdedit = METHODS["sdedit"]
    scheduler = StepScheduler(InProcessRunner(engines.root), max_wait_s=60.0)  # a stall would be a timeout

    def stop_at(step: int):
        def progress(stage: str, done: int, total: int) -> None:
            if done == step:
                raise Stop("cancelled")
        return progress

    def request(i: int) -> object:
        with scheduler.request():
            try:
                return sdedit(scheduler, image=example_image, seed=i, progress=stop_at(1) if i == 0 else False,
                              **REQUEST).array
            except Stop:
                return "stopped"

    results = _in_threads(3, request)
    assert results[0] == "stopped"
    assert all(isinstance(results[i], np.ndarray) for i in (1, 2)), results
    assert scheduler.active == 0


@pytest.mark.parametrize("max_wait_s", [-1.0, float("nan")])
def test_max_wait_must_be_a_nonnegative_number(engines, max_wait_s):
    with pytest.raises(InvalidInputError, match="max_wait"):
        StepScheduler(InProcessRunner(engines.root), max_wait_s=max_wait_s)


def _count_concurrent_unet_calls(runner: InProcessRunner) -> dict[str, int]:
    """Wrap the runner's engine calls: the most UNet calls, and samples in them, that ever ran at once."""
    lock, seen = threading.Lock(), {"calls": 0, "samples": 0, "peak calls": 0, "peak samples": 0}

    def counting(call):
        def run(model, outputs=None, **inputs):
            if model != "unet":
                return call(model, outputs, **inputs)
            samples = len(inputs["sample"])
            with lock:
                seen["calls"] += 1
                seen["samples"] += samples
                seen["peak calls"] = max(seen["peak calls"], seen["calls"])
                seen["peak samples"] = max(seen["peak samples"], seen["samples"])
            try:
                return call(model, outputs, **inputs)
            finally:
                with lock:
                    seen["calls"] -= 1
                    seen["samples"] -= samples
        return run

    runner.run, runner.run_tensors = counting(runner.run), counting(runner.run_tensors)
    return seen


def test_ticks_overlap_on_cpu_engines_within_the_memory_budget(engines, example_image):
    """On CPU engines a cohort's engine call runs beside another's (their Python in between overlaps the other's
    engine call); calls that would together pass the engine's memory budget never run at once."""
    sdedit = METHODS["sdedit"]
    with InProcessRunner(engines.root) as runner:
        first: dict[str, np.ndarray] = {}
        plain = runner.run_tensors
        runner.run_tensors = lambda model, outputs=None, **inputs: (
            first.setdefault(model, inputs), plain(model, outputs, **inputs))[1]
        alone = {seed: sdedit(runner, image=example_image, seed=seed, **REQUEST).array for seed in range(8)}
        unet = runner.engine("unet")
        bound = unet.check(with_defaults(unet.spec, {k: np.asarray(v) for k, v in first["unet"].items()}))
        per_request = unet.memory.growth(bound)  # one request's [uncond, cond] pair
        tight = int(unet.memory.base + 2.5 * per_request)  # two requests' pairs fit at once, three not

    for budget in (None, {"unet": tight}):
        runner = InProcessRunner(engines.root, budget=budget)
        seen = _count_concurrent_unet_calls(runner)
        scheduler = StepScheduler(runner)

        def request(seed: int) -> np.ndarray:
            with scheduler.request("sdedit"):
                return sdedit(scheduler, image=example_image, seed=seed, **REQUEST).array

        together = _in_threads(8, request)
        for seed in range(8):
            assert np.abs(together[seed] - alone[seed]).max() <= 1e-6, (budget, seed)
        if budget is None:
            assert seen["peak calls"] >= 2, seen
        else:
            assert seen["peak samples"] <= 4, seen
        runner.close()
