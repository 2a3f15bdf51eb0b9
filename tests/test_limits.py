"""Requests the machine can afford, finite values only, bounded queues and deadlines — in-process and served.

What these reproduce, against `ti2i serve` on the demo's engines before the limits existed:

* a `vae_decoder` latent of [1, 4, 256, 256] (inside its declared range) grew the stub to 23.9 GB until the
  kernel's out-of-memory killer took it; `unet` at 256×256 failed after trying to allocate 128 GiB;
* NaN/inf in any `unet` input, or NaN/inf/3e38 in a `vae_decoder` latent, came back as 200 with all-NaN
  outputs, and a timestep of 1e30 was accepted;
* `dynamic_batching {}` had no queue policy: at 32 clients requests waited 34 s (median), and a request whose
  client had given up still ran (6 of 6 ran, 5 had timed out).

The budgets here are small (set through ``TI2I_MEMORY_BUDGET``) so that the edge of the affordable range is a
few hundred MB to 2 GB (estimates; measured peaks are lower): no test needs more than about 2 GB.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import server_url
from ti2i.benchmarks.settle import settled
from ti2i.client.runners import TritonRunner
from ti2i.engines.loader import load_engine
from ti2i.manifest import Manifest
from ti2i.triton_models.repository import (RepositoryOptions, budgeted_spec, instance_budgets, parse_config,
                                          write_repository)
from ti2i.triton_models.server import TritonServer
from ti2i.triton_models.core import CoreOptions
from ti2i.benchmarks.server_metrics import by_label, read_metrics

from ti2i.budget import BUDGET_ENV, MemoryModel, chunk_sizes, format_bytes, loading_one_at_a_time, parse_bytes
from ti2i.errors import ComponentOutputError, InvalidInputError, OverBudgetError, ServerUnavailableError
from ti2i.spec import sample_inputs

pytestmark = pytest.mark.timeout(300)

# The served tests share it between two models: 2 GiB per instance. At the edge of that budget one UNet call on
# one thread takes seconds (1.4 s at 64×64 on an idle core): long enough to queue requests behind it.
BUDGET = "4G"


def edge_side(memory: MemoryModel, budget: int, batch: int = 1) -> int:
    """The largest square latent side whose estimate fits `budget`."""
    return max(s for s in range(1, 257) if memory.estimate({"batch": batch, "height": s, "width": s}) <= budget)


def unet_inputs(manifest: Manifest, side: int, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return sample_inputs(manifest.components["unet"].spec, {"batch": batch, "height": side, "width": side}, seed)


def assert_one_line(err: BaseException, *words: str) -> None:
    message = str(err)
    assert "\n" not in message.strip(), f"one line expected: {message!r}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


# --------------------------------------------------------------------------- the memory model


def test_export_measures_a_memory_model_per_engine(engines):
    for name, entry in engines.components.items():
        if entry.file is None:
            continue
        memory = entry.memory
        assert memory is not None and memory.base > 0, name
        small = memory.estimate({d: lo for d, (lo, _) in entry.spec.dims.items()})
        large = memory.estimate({d: hi for d, (_, hi) in entry.spec.dims.items()})
        assert memory.base <= small < large, name
        for tokens, growth in memory.points:  # the curve never undercuts what was measured (beyond noise)
            assert memory.per_item(tokens) >= growth - 0.01 * memory.base, (name, tokens)
    unet = engines.components["unet"].memory
    assert unet.token_dims == ("height", "width") and unet.item_dims == ("batch",)
    grow = [unet.estimate({"batch": 1, "height": s, "width": s}) - unet.base for s in (64, 128)]
    assert grow[1] > 8 * grow[0], "attention makes memory grow faster than the pixel count"


def test_the_estimate_covers_a_size_past_the_measured_ones(engines):
    """The UNet run in a fresh process at a size beyond its calibration ladder peaks below the estimate."""
    memory = engines.components["unet"].memory
    side = int(round(1.3 * memory.points[-1][0] ** 0.5))
    code = (
        "import sys; from ti2i.manifest import Manifest; from ti2i.engines.loader import load_engine; "
        "from ti2i.spec import sample_inputs; m = Manifest.load(sys.argv[1]); e = load_engine(m, 'unet'); "
        f"e.run(sample_inputs(e.spec, {{'batch': 1, 'height': {side}, 'width': {side}}})); "
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    peak = int(subprocess.run([sys.executable, "-c", code, str(engines.root)], capture_output=True, text=True,
                              check=True, timeout=120).stdout.split()[-1])
    assert peak <= memory.estimate({"batch": 1, "height": side, "width": side})


def test_manifest_without_memory_model_still_loads(engines, tmp_path):
    """A manifest written before calibration loads; its engines are calibrated at load."""
    data = engines.to_json()
    for entry in data["components"].values():
        entry.pop("memory", None)
        for tensor in entry["spec"]["inputs"]:
            tensor.pop("limits", None)
    old = Manifest._from_json(engines.root, data)
    assert all(e.memory is None for e in old.components.values())
    engine = load_engine(old, "text_encoder", budget=parse_bytes("1G"))
    assert engine.memory is not None and engine.memory.base > 0


def test_the_default_budget_is_what_was_available_before_the_engine_loaded(engines, monkeypatch):
    """The estimates count the engine's own weights (its base), so the budget they are held to must not be
    taken after those weights left MemAvailable: an SDXL UNet (9.8 GiB) loaded on a 24 GiB host refused its
    every request (10.1 GiB needed, 0.6 × the 10 GiB left = 6.2 GiB)."""
    from ti2i import budget
    from ti2i.engines import ort

    before, after = parse_bytes("20G"), parse_bytes("10G")
    loaded: list[str] = []

    class Loading(ort.OrtEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaded.append(self.spec.name)

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    monkeypatch.setattr(budget, "available_memory", lambda: after if loaded else before)
    monkeypatch.setattr(ort, "OrtEngine", Loading)
    engine = load_engine(engines, "unet")
    assert loaded == ["unet"] and engine.budget == int(budget.SAFE_SHARE * before)


def test_engine_loads_on_one_machine_take_turns(tmp_path):
    """Each hosted method model (or process of one) checks MemAvailable, then loads: without turns, two loading
    at once both see the memory neither has taken. A load waits while another process holds the lock."""
    lock = tmp_path / "load.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ti2i.budget import loading_one_at_a_time\n"
        f"with loading_one_at_a_time(Path({str(lock)!r})):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def load() -> None:
            with loading_one_at_a_time(lock):
                entered.set()

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        assert not entered.wait(0.5), "a second load ran while another process held the lock"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert entered.wait(30), "the load never got its turn once the other process let go"
    finally:
        holder.kill()
        holder.wait()


def test_budget_parsing_and_chunks():
    assert parse_bytes("1.5G") == 3 * 1024**3 // 2 and parse_bytes("512MiB") == 512 * 1024**2
    with pytest.raises(InvalidInputError):
        parse_bytes("lots")
    model = MemoryModel(base=100, linear=10.0, quadratic=0.0, token_dims=("height",), item_dims=("batch",))
    # 1 token costs 10 × 1.25 per item: a budget of 100 + 50 fits 4 items per merged batch
    assert chunk_sizes(model, {"height": 1}, [2, 2, 1, 3, 1], 150) == [2, 2, 1]


# --------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def small_unet(engines, monkeypatch_module):
    monkeypatch_module.setenv(BUDGET_ENV, "512M")
    engine = load_engine(engines, "unet")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_edge_of_the_budget_runs_and_past_it_is_refused(engines, small_unet):
    assert small_unet.budget == parse_bytes("512M")
    side = edge_side(small_unet.memory, small_unet.budget)
    out = small_unet.run(unet_inputs(engines, side))
    assert out["noise_pred"].shape == (1, 4, side, side) and np.isfinite(out["noise_pred"]).all()
    for past in (side + 1, 256):  # 256²: the size that tried to allocate 128 GiB
        with pytest.raises(OverBudgetError) as err:
            small_unet.run(unet_inputs(engines, past))
        assert_one_line(err.value, "unet", f"height={past}", "needs about", "budget of 512.0 MiB", BUDGET_ENV)
    with pytest.raises(OverBudgetError, match="batch of at most"):  # the batch counts too
        small_unet.run(unet_inputs(engines, side, batch=4))


@pytest.mark.parametrize("name,value", [("sample", np.nan), ("sample", np.inf), ("encoder_hidden_states", -np.inf),
                                        ("timestep", np.nan), ("timestep", 1e30), ("timestep", -1.0),
                                        ("sample", 3e38)])
def test_non_finite_and_absurd_unet_inputs(engines, small_unet, name, value):
    inputs = unet_inputs(engines, 8, batch=2)
    inputs[name].reshape(-1)[-1] = value
    with pytest.raises(InvalidInputError) as err:
        small_unet.run(inputs)
    assert_one_line(err.value, f"unet.{name}")


@pytest.mark.parametrize("value", [np.nan, np.inf, 3e38])
def test_vae_latent_must_be_finite_and_sane(engines, value):
    engine = load_engine(engines, "vae_decoder")
    inputs = sample_inputs(engine.spec, {"batch": 1, "height": 8, "width": 8})
    inputs["latent"][0, 0, 0, 0] = value
    with pytest.raises(InvalidInputError, match="vae_decoder.latent"):
        engine.run(inputs)


def test_token_ids_outside_the_vocabulary(engines):
    engine = load_engine(engines, "text_encoder")
    ids = sample_inputs(engine.spec, {"batch": 1})["input_ids"]
    ids[0, 3] = 10**6
    with pytest.raises(InvalidInputError, match="text_encoder.input_ids: values must be in"):
        engine.run({"input_ids": ids})


def test_svd_timestep_range_is_its_sigma_range(svd_engines):
    """SVD's continuous timesteps are ¼·ln σ for σ in [0.002, 700]: 1e30 and 2.0 are outside, its own are inside."""
    low, high = svd_engines.components["unet_svd"].spec.input("timestep").limits
    assert low == pytest.approx(0.25 * np.log(0.002), abs=2e-3) and high == pytest.approx(0.25 * np.log(700), abs=2e-3)
    engine = load_engine(svd_engines, "unet_svd")
    inputs = sample_inputs(engine.spec, {"batch": 1, "frames": 2, "height": 8, "width": 8})
    for t in (1e30, 2.0):
        inputs["timestep"][:] = t
        with pytest.raises(InvalidInputError, match="unet_svd.timestep"):
            engine.run(inputs)
    inputs["timestep"][:] = 0.25 * np.log(700.0)
    assert np.isfinite(engine.run(inputs)["noise_pred"]).all()


def test_non_finite_outputs_name_the_component(engines):
    spec = engines.components["vae_decoder"].spec
    images = np.zeros((1, 3, 16, 16), np.float32)
    spec.validate_outputs({"images": images})
    images[0, 1, 2, 3] = np.nan
    with pytest.raises(ComponentOutputError) as err:
        spec.validate_outputs({"images": images})
    assert_one_line(err.value, "vae_decoder produced non-finite values in images", "1 NaN")


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def limited_server(engines, tmp_path_factory, monkeypatch_module):
    """unet and vae_decoder sharing a 4 GiB budget in their engine core, three component calls in flight at most
    (one active place and two waiting), one thread."""
    monkeypatch_module.setenv(BUDGET_ENV, BUDGET)
    root = tmp_path_factory.mktemp("triton-limits")
    repository = write_repository(engines, root / "repository", models=["unet", "vae_decoder"],
                                  core_options=CoreOptions(active=1, max_queue=2, threads=1))
    with TritonServer(repository, log_path=root / "server.log") as server:
        server.repository_dir = repository
        yield server


def core_budgets(server: TritonServer) -> dict[str, int]:
    config = parse_config(server.repository_dir / "core" / "config.pbtxt")
    return json.loads(config.parameters["memory_budget"].string_value)


def test_the_core_carries_the_budgets_and_its_bounds(limited_server, engines):
    weights = {n: engines.components[n].memory.base for n in ("unet", "vae_decoder")}
    headroom = parse_bytes(BUDGET) - sum(weights.values())  # one headroom, which the core's running calls share
    assert core_budgets(limited_server) == {n: weights[n] + headroom for n in weights}
    options = json.loads(parse_config(limited_server.repository_dir / "core" / "config.pbtxt")
                         .parameters["options"].string_value)
    assert (options["active"], options["max_queue"], options["queue_timeout_s"]) == (1, 2, 30.0)


def test_each_component_keeps_its_weights_and_shares_the_rest(engines):
    """An even split of the total gave a UNet whose weights are most of its share room for batch 1 only
    (SD 1.5 at 256²: 3.4 GiB of weights, a 3.45 GiB share), while the VAE's share sat unused."""
    unet, vae = (engines.components[n].memory for n in ("unet", "vae_decoder"))
    smallest = {d: low for d, (low, _) in engines.components["unet"].spec.dims.items()}
    eight = math.ceil(unet.growth({**smallest, "batch": 8})) + 1
    total = unet.base + vae.base + 2 * eight
    assert total // 2 < unet.base + eight  # the even split would not fit batch 8
    options = RepositoryOptions(memory_budget=total, instances=1)
    budgets = instance_budgets(engines, ["unet", "vae_decoder", "image_postprocess"], options)
    assert budgets["unet"] - unet.base == budgets["vae_decoder"] - vae.base == budgets["image_postprocess"] == eight
    assert budgeted_spec(engines.components["unet"].spec, engines, budgets["unet"]).dims["batch"][1] >= 8


def test_a_budget_below_the_engines_weights_is_refused_when_the_repository_is_written(engines, tmp_path):
    """Written anyway, such a server would start and refuse every request (its numpy steps with a budget of 0 B)."""
    names = ["unet", "vae_decoder", "image_postprocess"]
    weights = sum(engines.components[n].memory.base for n in names if engines.components[n].file is not None)
    with pytest.raises(InvalidInputError) as err:
        instance_budgets(engines, names, RepositoryOptions(memory_budget=weights - 1))
    assert_one_line(err.value, "unet, vae_decoder", "over the memory budget", "--memory-budget")
    budgets = instance_budgets(engines, names, RepositoryOptions(memory_budget=weights))
    assert budgets["image_postprocess"] == 0 and budgets["unet"] == engines.components["unet"].memory.base
    shared = instance_budgets(engines, names, RepositoryOptions(memory_budget=weights + 300), shared=True)
    assert shared["image_postprocess"] == 300 and shared["unet"] == engines.components["unet"].memory.base + 300


def serves_a_good_request(server: TritonServer, engines: Manifest) -> None:
    """The server and its models stay ready, and a good request is answered."""
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready() and client.is_model_ready("unet") and client.is_model_ready("vae_decoder")
    finally:
        client.close()
    with TritonRunner(server_url(server, "grpc")) as runner:
        assert np.isfinite(runner.run("unet", **unet_inputs(engines, 8))["noise_pred"]).all()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_edge_runs_and_past_it_is_invalid_arg(limited_server, engines, protocol):
    memory = engines.components["unet"].memory
    budget = core_budgets(limited_server)["unet"]  # its weights and the rest of 4 GiB beyond all weights
    side = edge_side(memory, budget)
    with TritonRunner(server_url(limited_server, protocol)) as runner:
        assert runner.run("unet", **unet_inputs(engines, side))["noise_pred"].shape == (1, 4, side, side)
        for past in (side + 1, 256):
            with pytest.raises(InvalidInputError) as err:
                runner.run("unet", **unet_inputs(engines, past))
            assert_one_line(err.value, "OverBudgetError", "needs about", f"budget of {format_bytes(budget)}")
        latent = sample_inputs(engines.components["vae_decoder"].spec, {"batch": 1, "height": 256, "width": 256})
        with pytest.raises(InvalidInputError, match="vae_decoder: a request of batch=1, height=256"):
            runner.run("vae_decoder", **latent)  # the request that grew a stub to 23.9 GB
    serves_a_good_request(limited_server, engines)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model,name,value", [("unet", "sample", np.nan), ("unet", "encoder_hidden_states", np.inf),
                                              ("unet", "timestep", 1e30), ("vae_decoder", "latent", 3e38),
                                              ("vae_decoder", "latent", -np.inf)])
def test_served_non_finite_inputs_are_invalid_arg(limited_server, engines, protocol, model, name, value):
    spec = engines.components[model].spec
    inputs = sample_inputs(spec, {"batch": 2, "height": 8, "width": 8})
    inputs[name].reshape(-1)[0] = value
    with TritonRunner(server_url(limited_server, protocol)) as runner:
        with pytest.raises(InvalidInputError) as err:
            runner.run(model, **inputs)
    assert_one_line(err.value, f"{model}.{name}")
    serves_a_good_request(limited_server, engines)


def slow_side(engines: Manifest) -> int:
    """The side of a UNet call whose estimate takes 60 % of the core's headroom: a second one waits for it."""
    memory = engines.components["unet"].memory
    headroom = parse_bytes(BUDGET) - sum(engines.components[n].memory.base for n in ("unet", "vae_decoder"))
    return edge_side(memory, memory.base + int(0.6 * headroom))


def _slow_call(runner: TritonRunner, engines: Manifest, results: dict, key: int) -> None:
    side = slow_side(engines)
    try:
        runner.run("unet", **unet_inputs(engines, side, seed=key))
        results[key] = "ok"
    except ServerUnavailableError as err:
        results[key] = err


@pytest.fixture(scope="module")
def busy_s(limited_server, engines) -> float:
    """How long the slow request keeps the unet instance busy on this machine (the best of two)."""
    times = []
    with TritonRunner(server_url(limited_server, "grpc")) as runner:
        for _ in range(2):
            start = time.perf_counter()
            _slow_call(runner, engines, {}, 0)
            times.append(time.perf_counter() - start)
    return min(times)


def while_busy(server: TritonServer, engines: Manifest, results: dict, action, busy_s: float) -> None:
    """Run `action()` a quarter into a slow request's execution (at the edge of the budget: ~1 s on one core)."""
    with TritonRunner(server_url(server, "grpc")) as runner:
        first = threading.Thread(target=_slow_call, args=(runner, engines, results, 0))
        first.start()
        time.sleep(busy_s / 4)  # the request is executing: the model's queue is empty again
        try:
            action()
        finally:
            first.join(timeout=120)


def test_full_queue_is_unavailable_in_one_line(limited_server, engines, busy_s):
    results: dict = {}

    runners = [TritonRunner(server_url(limited_server, "grpc")) for _ in range(5)]

    def crowd() -> None:
        threads = [threading.Thread(target=_slow_call, args=(r, engines, results, i + 1))
                   for i, r in enumerate(runners)]
        for thread in threads:
            thread.start()
        for thread, runner in zip(threads, runners):
            thread.join(timeout=120)
            runner.close()

    while_busy(limited_server, engines, results, crowd, busy_s)
    refused = [r for r in results.values() if isinstance(r, ServerUnavailableError)]
    assert results[0] == "ok" and refused, results
    for err in refused:  # what the CLI prints as its one line (exit 2)
        assert_one_line(err, "unet", "all 3 places for component calls are taken")
    assert sum(r == "ok" for r in results.values()) >= 2  # one ran, the waiting ones ran after it
    serves_a_good_request(limited_server, engines)


def unet_executions(server: TritonServer) -> float:
    """The UNet engine calls the core ran, once its metrics settled (it sends them every 0.5 s)."""
    return settled(lambda: by_label(read_metrics(server.metrics_url), "ti2i_executions_total", "component",
                                    model="core").get("unet", 0.0), wait_s=0.6)


def test_request_whose_deadline_passes_in_the_queue_is_not_run(limited_server, engines, busy_s):
    before = unet_executions(limited_server)
    results: dict = {}

    with TritonRunner(server_url(limited_server, "grpc"), timeout_s=busy_s / 4) as runner:
        while_busy(limited_server, engines, results, lambda: _slow_call(runner, engines, results, 1), busy_s)
    assert results[0] == "ok" and isinstance(results[1], ServerUnavailableError), results
    # the core's count: only the first request was executed; the second expired waiting for the engine
    assert unet_executions(limited_server) - before == 1


def test_the_server_itself_expires_a_queued_request(limited_server, engines, busy_s):
    """Over HTTP with no client-side deadline: the server's reply once the request's queue timeout passed."""
    replies: list = []

    client = httpclient.InferenceServerClient(limited_server.http_url, network_timeout=60)
    inputs = []
    for name, array in unet_inputs(engines, slow_side(engines)).items():  # too large to run beside it
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        infer_input = httpclient.InferInput(name, list(array.shape), "FP32")
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)

    def queued_1ms() -> None:
        try:
            client.infer("unet", inputs, timeout=1000)  # 1 ms in the queue behind the slow request
        except Exception as err:  # noqa: BLE001 - the reply is what is checked
            replies.append(err)

    try:
        while_busy(limited_server, engines, {}, queued_1ms, busy_s)
    finally:
        client.close()
    assert replies and "timeout" in str(replies[0]).lower(), replies
    serves_a_good_request(limited_server, engines)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_deadline_passing_in_the_queue_is_one_line(limited_server, engines, protocol, busy_s):
    results: dict = {}
    with TritonRunner(server_url(limited_server, protocol), timeout_s=busy_s / 4) as runner:
        while_busy(limited_server, engines, results, lambda: _slow_call(runner, engines, results, 1), busy_s)
    assert isinstance(results[1], ServerUnavailableError), results
    assert_one_line(results[1], "unet")  # what the CLI prints (exit 2); HTTP was a gevent traceback
    serves_a_good_request(limited_server, engines)


def test_an_allocation_floor_is_not_fitted_as_growth_per_token():
    """The sd15-256 VAE encoder's ladder: 12 MiB of growth at every size up to 93², then rising. Fitted through
    that floor, the 256² request was estimated at 17.8 GiB and refused (measured: 546 MiB); the floor now
    joins the base and the curve follows the rising sizes, still on or above every measured point."""
    from ti2i.budget import MemoryModel
    from ti2i.engines.calibrate import fit_memory

    floor = 12787712.0
    points = [(float(t), floor) for t in (64, 121, 256, 529, 1089, 2209, 4356, 8649)] + [
        (17424.0, 26787840.0), (34969.0, 80502784.0), (69696.0, 188268544.0), (139129.0, 402018304.0),
        (278784.0, 847425536.0)]
    loaded = 384_000_000
    base, linear, quadratic = fit_memory(points, loaded)
    model = MemoryModel(base, linear, quadratic, ("image_height", "image_width"), ("batch",))
    for tokens, growth in points:
        side = int(tokens ** 0.5)
        estimate = model.estimate({"batch": 1, "image_height": side, "image_width": side})
        assert estimate >= loaded + growth  # never below what was measured
    at_256 = model.estimate({"batch": 1, "image_height": 264, "image_width": 264})
    assert at_256 < 1.5 * (loaded + 188268544.0), at_256


def test_a_floor_that_never_doubles_is_not_fitted_as_growth_per_token():
    """SD 1.5's ControlNet's ladder: 1 GiB of growth at every size to 47², 1.7 GiB at 66². Fitted through the
    floor, a 256² request (32² latents, batch 2) was estimated at 40 GiB and refused; the floor now joins the base
    and the estimate stays on or above every measured point."""
    from ti2i.budget import MemoryModel
    from ti2i.engines.calibrate import fit_memory

    floor = 1039278080.0
    points = [(float(t), floor) for t in (64, 121, 256, 529, 1089, 2209)] + [(4356.0, 1739128832.0)]
    loaded = 1637519360
    base, linear, quadratic = fit_memory(points, loaded)
    model = MemoryModel(base, linear, quadratic, ("height", "width"), ("batch",))
    for tokens, growth in points:
        side = int(tokens ** 0.5)
        assert model.estimate({"batch": 1, "height": side, "width": side}) >= loaded + growth
    assert model.estimate({"batch": 2, "height": 32, "width": 32}) < 2 * (loaded + floor)


def test_an_over_budget_refusal_names_the_sizes_that_fit():
    """The refusal suggested only --memory-budget; what the user can change is the size or the frame count."""
    from ti2i.budget import check_budget
    from ti2i.errors import OverBudgetError

    model = MemoryModel(base=1000, linear=0.0, quadratic=1.0, token_dims=("height", "width"), item_dims=("batch",),
                        frames_dim="frames", frames_ref=1, frames_power=1.0)
    bound = {"batch": 1, "frames": 8, "height": 16, "width": 16}  # 1.25 × 8 × 256² ≈ 655k bytes
    with pytest.raises(OverBudgetError) as info:
        check_budget("unet_svd", model, bound, budget=100_000)
    text = str(info.value)
    assert "height and width × 0.6" in text  # √(√(99k / 1.25 / 8) / 256) ≈ 0.62
    assert "at most 1 frame" in text
    assert text.index("smaller") < text.index("--memory-budget")
    scale = float(text.split("height and width × ")[1].split(" ")[0])
    assert model.estimate({**bound, "height": int(16 * scale), "width": int(16 * scale)}) <= 100_000
