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
from ti2i.engines.step_scheduler import StepScheduler
from ti2i.errors import InvalidInputError

REQUEST = dict(prompt="a watercolor of a house", steps=6, strength=0.5)


def _in_threads(count: int, target) -> dict[int, object]:
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
        thread.join(timeout=300)
    return results


def test_concurrent_loops_are_batched_and_each_gets_its_own_result(engines, example_image):
    sdedit = METHODS["sdedit"]
    with InProcessRunner(engines.root) as runner:
        alone_scheduler = StepScheduler(runner)  # no request(): each call runs at once, alone
        alone = {seed: sdedit(alone_scheduler, image=example_image, seed=seed, **REQUEST).array for seed in range(8)}
    calls = alone_scheduler.executions[("unet", 1, 2)]  # each one request's [uncond, cond] batch
    assert set(alone_scheduler.executions) >= {("unet", 1, 2)} and not any(
        (merged, samples) != (1, 2) for model, merged, samples in alone_scheduler.executions if model == "unet")
    scheduler = StepScheduler(InProcessRunner(engines.root))

    def request(seed: int) -> np.ndarray:
        with scheduler.request():
            return sdedit(scheduler, image=example_image, seed=seed, **REQUEST).array

    together = _in_threads(8, request)
    for seed in range(8):
        assert np.abs(together[seed] - alone[seed]).max() <= 1e-6, seed
    unet = {(merged, samples): n for (model, merged, samples), n in scheduler.executions.items() if model == "unet"}
    assert sum(unet.values()) < calls and max(s for _, s in unet) > 2, unet  # fewer, larger UNet batches
    assert all(samples == 2 * merged for merged, samples in unet), unet  # each merged call a request's pair
    assert sum(merged * n for (merged, _), n in unet.items()) == calls  # and every call run once
    assert scheduler.active == 0


def test_lanes_tick_apart_and_each_request_gets_its_own_result(engines, example_image):
    """Two lanes, four concurrent loops: two join each lane, so no engine call merges more than two requests'
    calls, yet steps do merge; every result is the request's sequential one."""
    sdedit = METHODS["sdedit"]
    with InProcessRunner(engines.root) as runner:
        alone = {seed: sdedit(StepScheduler(runner), image=example_image, seed=seed, **REQUEST).array
                 for seed in range(4)}
    scheduler = StepScheduler(InProcessRunner(engines.root), max_wait_s=1.0, lanes=2)  # a lane waits for its loops
    gate = threading.Barrier(4)

    def request(seed: int) -> np.ndarray:
        with scheduler.request():
            gate.wait()  # all four in their lanes before any call
            return sdedit(scheduler, image=example_image, seed=seed, **REQUEST).array

    together = _in_threads(4, request)
    for seed in range(4):
        assert np.abs(together[seed] - alone[seed]).max() <= 1e-6, seed
    unet = {merged: n for (model, merged, _), n in scheduler.executions.items() if model == "unet"}
    assert max(unet) == 2, unet  # each lane merges its own two loops, never the other lane's
    assert scheduler.lanes == 2 and scheduler.active == 0
    with pytest.raises(InvalidInputError, match="lanes must be an integer ≥ 1"):
        StepScheduler(scheduler.engines, lanes=0)


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
