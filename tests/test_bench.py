"""The benchmark harness end to end on the tiny preset: structure of what it writes, never its timings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from ti2i.benchmarks.backends import BACKENDS, RunRecord, register_backend
from ti2i.benchmarks.harness import BenchConfig, run_benchmark
from ti2i.benchmarks.sweep import _core_batching, _counted_batching, derive_stats, raw_delta
from ti2i.benchmarks.settle import settled
from ti2i.client.cli import main
from ti2i.client.runners import TritonRunner

BACKENDS_UNDER_TEST = ["diffusers", "ort", "triton-grpc", "triton-grpc-shm"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, cache):
    """2 inference steps at strength 0.8: one denoising step (PNDM runs it as two UNet calls)."""
    out = tmp_path_factory.mktemp("bench") / "results"
    config = BenchConfig(methods="sdedit", preset="tiny", backends=BACKENDS_UNDER_TEST, concurrency=(1, 2),
                         out=out, cache=cache, repeats=2, warmup=1, steps=2, unet_calls=3,
                         concurrency_requests=2, concurrency_backend="triton-grpc,ort", quiet=True)
    return out, run_benchmark(config)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_stats(stats: dict) -> None:
    assert stats["n"] >= 1
    for key in ("median", "p90", "p99", "mean", "min", "max"):
        assert _positive(stats[key]), (key, stats)


def test_writes_json_markdown_and_plot(bench):
    out, data = bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["complete"] is True and on_disk["schema"] == "ti2i-bench/1"
    for key in ("cpu", "cores", "memory_gib", "os"):
        assert on_disk["machine"][key]
    assert on_disk["versions"]["onnxruntime"] and on_disk["versions"]["torch"]
    assert "commit" in on_disk["git"]
    markdown = (out / "results.md").read_text()
    assert "| backend |" in markdown and "triton-grpc-shm" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_backend_measured_with_positive_figures(bench):
    _, data = bench
    entry = data["methods"]["sdedit"]
    assert entry["status"] == "done"
    assert entry["request"]["steps"] == 2
    for name in BACKENDS_UNDER_TEST:
        record = entry["backends"][name]
        assert record["status"] == "ok", record
        assert len(record["repeats"]) == 2 and len(record["warmup_s"]) == 1
        for run in record["repeats"]:
            assert _positive(run["end_to_end_s"])
            assert {"encode_prompt", "encode_image", "unet", "decode_image"} <= set(run["stages"])
            for calls in run["stages"].values():
                assert calls and all(_positive(x) for x in calls)
        summary = entry["summary"][name]
        _check_stats(summary["end_to_end_s"])
        for stage in summary["stages"].values():
            _check_stats(stage["per_request_s"])
            _check_stats(stage["per_call_s"])
        if name != "diffusers":  # the same seeded request gives the same image on every backend
            assert record["max_abs_vs_diffusers"] < 1e-2
    assert entry["rounds"][0]["order"] != entry["rounds"][1]["order"]  # the order rotates between rounds
    assert _positive(entry["ratios"]["ort"]["speedup_vs_diffusers"])
    assert _positive(entry["ratios"]["triton-grpc"]["time_vs_ort"])


def test_serving_overhead_and_single_unet_calls(bench):
    _, data = bench
    entry = data["methods"]["sdedit"]
    calls = entry["unet_calls"]
    assert calls["model"] == "unet" and calls["inputs"]["sample"][0] == 2  # the guidance pair
    for name in ("ort", "triton-grpc", "triton-grpc-shm"):
        assert len(calls["samples_s"][name]) == 3 and all(_positive(x) for x in calls["samples_s"][name])
    for name in ("triton-grpc", "triton-grpc-shm"):  # a difference of timings: finite, sign not asserted
        for source in ("from_requests", "from_unet_calls"):
            assert math.isfinite(entry["serving_overhead_ms"][name][source]["median"])


def test_concurrency_sweep_reads_server_statistics(bench):
    """Triton's statistics of the UNet's entry model (one request an execution) keep their times per request;
    its batching is what the engine core ran of those calls (each an [uncond, cond] pair)."""
    _, data = bench
    entry = data["methods"]["sdedit"]
    unet_calls = entry["summary"]["triton-grpc"]["stages"]["unet"]["calls_per_request"]
    sweep = entry["concurrency"]
    assert sweep["backend"] == "triton-grpc" and [lv["clients"] for lv in sweep["levels"]] == [1, 2]
    for level in sweep["levels"]:
        assert level["requests"] == 2 * level["clients"] and not level["errors"]
        assert _positive(level["throughput_rps"]) and _positive(level["wall_s"])
        _check_stats(level["latency_s"])
        unet = level["server"]["unet"]
        assert unet["source"] == "metrics" and unet["requests"] == level["requests"] * unet_calls, unet
        assert unet["inferences"] == 2 * unet["requests"] and 1 <= unet["avg_requests_per_execution"] <= 2, unet
        assert _positive(unet["compute_infer_ms_per_request"])
    for run in sweep["rounds"][0]:
        entry_model = run["raw_server"]["unet"]
        assert entry_model["requests"] == run["requests"] * unet_calls
        assert sum(entry_model["executed_batch_sizes"].values()) == entry_model["executions"]
    assert _positive(sweep["best_gain"])


def test_in_process_concurrency_sweep_runs_beside_the_served_ones(bench):
    """`ort` sweeps too: concurrent loops in one process (threads), each on its own runner; the server serves
    none of it."""
    _, data = bench
    sweeps = {s["backend"]: s for s in data["methods"]["sdedit"]["concurrency_sweeps"]}
    assert list(sweeps) == ["triton-grpc", "ort"] and "skipped" not in sweeps["ort"]
    for level in sweeps["ort"]["levels"]:
        assert level["requests"] == 2 * level["clients"] and not level["errors"]
        assert _positive(level["throughput_rps"]) and level["server"] == {}


def test_method_model_sweep_in_rounds_reads_the_cores_batching(tmp_path, cache):
    """`triton-method` over 2 rounds of 1 and 2 clients: each level pools its rounds, its gain is the median of
    the rounds' own gains, and the UNet batching comes from the engine core's metrics (PNDM: 2 UNet calls a
    request, each an [uncond, cond] pair)."""
    data = run_benchmark(BenchConfig(methods="sdedit", preset="tiny", backends=["ort", "triton-method"],
                                     concurrency=(1, 2), concurrency_backend="triton-method", concurrency_requests=3,
                                     concurrency_rounds=2, out=tmp_path / "results", cache=cache, repeats=1, warmup=1,
                                     steps=2, unet_calls=1, quiet=True))
    sweep = data["methods"]["sdedit"]["concurrency"]
    assert sweep["backend"] == "triton-method"
    assert [[run["clients"] for run in runs] for runs in sweep["rounds"]] == [[1, 2], [1, 2]]
    for position, level in enumerate(sweep["levels"]):
        runs = [runs[position] for runs in sweep["rounds"]]
        assert level["rounds"] == 2 and level["requests"] == sum(r["requests"] for r in runs) == 6 * level["clients"]
        assert level["throughput_gain"] == pytest.approx(float(np.median([r["throughput_gain"] for r in runs])))
        unet = level["server"]["unet"]
        assert unet["source"] == "metrics" and unet["requests"] == 2 * level["requests"], unet
        assert unet["inferences"] == 2 * unet["requests"] and 1 <= unet["avg_requests_per_execution"] <= 2, unet
        cpu = level["cpu"]  # the server's and the benchmark's CPU time, pooled over the rounds
        assert cpu["tree_s"] == pytest.approx(sum(r["cpu"]["tree_s"] for r in runs)) and cpu["tree_s"] > cpu["own_s"]
        assert _positive(cpu["ms_per_request"]) and 0 < cpu["cores_busy"] <= sweep["cores"] + 0.5, cpu
    single, double = sweep["levels"]
    factors = double["cpu"]
    # gain = cores-busy ratio × CPU-per-request ratio (over the CPU readings' own interval, close to the spans')
    assert factors["busy_ratio"] * factors["cpu_ratio"] == pytest.approx(
        double["throughput_rps"] / single["throughput_rps"], rel=0.25)
    assert factors["bound_all_cores"] == pytest.approx(
        sweep["cores"] / single["cpu"]["cores_busy"] * factors["cpu_ratio"])
    assert sweep["levels"][0]["throughput_gain"] == 1.0
    assert "2 rounds" in (tmp_path / "results" / "results.md").read_text()


def test_openvino_and_diffusers_bf16_are_measured_and_the_machine_names_its_bf16_units(tmp_path, cache):
    """The CPU anchors: the pipeline in bf16 and our loop on OpenVINO, in-process and served on an openvino core."""
    from ti2i.engines.openvino import matrix_units, resolve_precision

    out = tmp_path / "results"
    data = run_benchmark(BenchConfig(methods="sdedit", preset="tiny", backends=["diffusers-bf16", "openvino",
                                                                                "triton-method"],
                                     concurrency=(), out=out, cache=cache, repeats=1, warmup=1, steps=2,
                                     unet_calls=1, engine_backend="openvino", quiet=True))
    entry = data["methods"]["sdedit"]
    assert all(entry["backends"][b]["status"] == "ok" for b in ("diffusers-bf16", "openvino", "triton-method"))
    assert entry["backends"]["diffusers-bf16"]["details"]["dtype"] == "bfloat16"
    assert entry["backends"]["openvino"]["details"]["precision"] == resolve_precision("auto")
    assert data["machine"]["matrix_units"] == matrix_units() and data["config"]["engine_backend"] == "openvino"
    units = ", ".join(matrix_units()) or "no bf16 units"
    assert f"({units})" in (out / "results.md").read_text()
    assert "openvino" in (out / "server-sdedit.log").read_text()


def test_batched_in_process_sweep_merges_the_clients_steps(tmp_path, cache):
    """`ort-batched`: the clients of a level share one step scheduler, so 4 clients' UNet calls merge (PNDM: 2
    calls a request); the scheduler's own counts fill the batching columns. Not 2 clients: on CPU engines two
    ticks run side by side, and 2 loops that fall out of step each find the other running and never wait for it
    (2 clients merged 1.04-1.2 requests an execution in 4 to 8 of 25 in-process trials; 4 clients never below
    1.5)."""
    data = run_benchmark(BenchConfig(methods="sdedit", preset="tiny", backends=["ort", "ort-batched"],
                                     concurrency=(1, 4), concurrency_backend="ort-batched", concurrency_requests=4,
                                     out=tmp_path / "results", cache=cache, repeats=1, warmup=1, steps=2,
                                     unet_calls=1, quiet=True))
    entry = data["methods"]["sdedit"]
    single, four = entry["concurrency"]["levels"]
    for level in (single, four):
        unet = level["server"]["unet"]
        assert level["requests"] == 4 * level["clients"] and not level["errors"]
        assert unet["requests"] == 2 * level["requests"] and unet["inferences"] == 2 * unet["requests"], unet
    assert single["server"]["unet"]["avg_requests_per_execution"] == 1.0
    assert four["server"]["unet"]["avg_requests_per_execution"] > 1.2, four["server"]
    assert entry["backends"]["ort-batched"]["status"] == "ok" and entry["summary"]["ort-batched"]["end_to_end_s"]["n"]


def test_sdxl_presets_measure_the_sdxl_pipelines_beside_ours(tmp_path, cache):
    """`sdxl-tiny`: diffusers' SDXL pipelines (the records' SDXL counterparts) beside our loops, same images."""
    from ti2i.benchmarks.presets import PRESETS

    data = run_benchmark(BenchConfig(methods="txt2img", preset="sdxl-tiny", backends=["diffusers", "ort"],
                                     concurrency=(), out=tmp_path / "results", cache=cache, repeats=1, warmup=1,
                                     steps=2, unet_calls=1, quiet=True))
    entry = data["methods"]["txt2img"]
    assert entry["status"] == "done" and entry["backends"]["ort"]["max_abs_vs_diffusers"] < 1e-2
    index = json.loads((Path(entry["model_dir"]) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert set(PRESETS["sdxl-512"].requests) <= set(PRESETS["sdxl-tiny"].requests)


def test_backends_whose_weights_do_not_fit_together_are_measured_one_after_the_other(tmp_path, cache, monkeypatch):
    """What `sdxl-512` needs on a 24 GiB host: when the backends' weights exceed the memory share, each backend is
    set up, measured and closed before the next, the server up only for the served ones, and the agreement with
    diffusers is still reported."""
    from ti2i.benchmarks import harness

    config = BenchConfig(methods="sdedit", preset="tiny", backends=["diffusers", "ort"], concurrency=(),
                         out=tmp_path / "together", cache=cache, repeats=2, warmup=1, steps=2, unet_calls=1,
                         quiet=True)
    together = run_benchmark(config)["methods"]["sdedit"]
    assert "one_at_a_time" not in together and [r["order"] for r in together["rounds"]] == [["diffusers", "ort"],
                                                                                          ["ort", "diffusers"]]
    monkeypatch.setattr(harness, "RESIDENT_SHARE", 1e-6)
    results = tmp_path / "apart" / "results.json"
    started: list[list[str]] = []  # per server start: the backends' requests measured before it
    server = harness._server

    def observed(*args, **kwargs):
        rounds = json.loads(results.read_text())["methods"]["sdedit"]["rounds"] if results.is_file() else []
        started.append([name for r in rounds for name in r["order"]])
        return server(*args, **kwargs)

    monkeypatch.setattr(harness, "_server", observed)

    apart = run_benchmark(dataclasses.replace(config, backends=["triton-grpc", "diffusers", "ort"],
                                              out=tmp_path / "apart"))["methods"]["sdedit"]
    assert started == [["diffusers", "diffusers", "ort", "ort"]]  # the server's engines never beside theirs
    assert [r["order"] for r in apart["rounds"]] == [["diffusers"], ["diffusers"], ["ort"], ["ort"],
                                                     ["triton-grpc"], ["triton-grpc"]]
    held = apart["one_at_a_time"]["weights_bytes"]
    assert held["diffusers"] > 0 and held["ort"] > 0 and held["triton-grpc"] == 0
    assert apart["one_at_a_time"]["server_bytes"] == held["ort"] and apart["one_at_a_time"]["available_bytes"] > 0
    assert apart["backends"]["triton-grpc"]["max_abs_vs_diffusers"] < 1e-2
    assert len(apart["backends"]["ort"]["repeats"]) == 2 and apart["summary"]["ort"]["end_to_end_s"]["n"] == 2
    assert apart["backends"]["ort"]["max_abs_vs_diffusers"] == pytest.approx(
        together["backends"]["ort"]["max_abs_vs_diffusers"], abs=1e-6)
    assert apart["ratios"]["ort"]["speedup_vs_diffusers"] > 0
    assert "each was measured on its own" in (tmp_path / "apart" / "results.md").read_text()
    assert "backends one after the other where" in (tmp_path / "apart" / "results.md").read_text()
    assert "each was measured on its own" not in (tmp_path / "together" / "results.md").read_text()


def test_the_sdxl_512_preset_has_sdxl_10s_architecture():
    """Built on the meta device (no weights): the preset's UNet is SDXL 1.0 base's, parameter for parameter."""
    import torch
    from diffusers import UNet2DConditionModel
    from ti2i.benchmarks.presets import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, **SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet


def test_the_memory_benchmark_reads_the_family_with_one_method_warm_then_more(cache):
    """One engine core per family: warming a second method (and the stream twins) adds its own UNet, not a copy
    of the family's engines."""
    from ti2i.benchmarks.memory import measure

    readings = measure("tiny", ["sdedit", "inpaint"], cache, log=lambda _: None)
    assert readings["start_mb"] > 0 and readings["one_warm_mb"] >= readings["start_mb"] * 0.9, readings
    assert set(readings["after"]) == {"sdedit", "inpaint"}
    assert readings["ratio"] == readings["all_warm_mb"] / readings["one_warm_mb"] <= 1.3, readings


def test_an_in_process_sweep_client_has_its_engines_loaded_before_the_clock_starts(engines):
    """The in-process sweep's first requests once included loading each fresh runner's ONNX sessions (p99 of
    2 s at 8 clients against a median of 0.3 s); a client now loads them when it is made."""
    from types import SimpleNamespace

    from ti2i.benchmarks.backends import _LoopClient
    from ti2i.client.methods import components_for
    from ti2i.client.runners import InProcessRunner

    with InProcessRunner(engines.root) as runner:
        _LoopClient(SimpleNamespace(method="sdedit"), runner)
        assert set(runner._engines) == set(components_for(["sdedit"])) & set(engines.components)


def test_tree_cpu_counts_the_children_it_started():
    """A child that burns CPU shows in this process's tree, and only while it lives under it."""
    import subprocess
    import sys
    import time

    from ti2i.benchmarks.cpu_time import tree_cpu_s

    before = tree_cpu_s()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\n"
                              "while time.process_time() < end: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        spent = 0.0
        for _ in range(100):
            if (spent := tree_cpu_s(child.pid) or 0.0) >= 0.4:
                break
            time.sleep(0.05)
        assert spent >= 0.4
        assert tree_cpu_s() - before >= 0.4  # the child is in this process's tree
    finally:
        child.communicate(b"")
    assert tree_cpu_s(child.pid) is None  # gone: no figure rather than a wrong one


def test_stats_delta_counts_batches():
    def snapshot(executions, inferences, requests, queue_ns, batches):
        return {"unet": {"execution_count": str(executions), "inference_count": str(inferences),
                         "inference_stats": {"success": {"count": str(requests), "ns": "1"},
                                             "queue": {"count": str(requests), "ns": str(queue_ns)},
                                             "compute_infer": {"count": str(requests), "ns": str(requests * 10**6)}},
                         "batch_stats": [{"batch_size": str(k), "compute_infer": {"count": str(v), "ns": "1"}}
                                         for k, v in batches.items()]}}

    before, after = snapshot(2, 4, 2, 0, {2: 2}), snapshot(5, 16, 8, 6 * 10**6, {2: 3, 4: 1, 6: 1})
    delta = derive_stats(raw_delta(before, after))["unet"]
    assert delta["executions"] == 3 and delta["requests"] == 6
    assert delta["avg_requests_per_execution"] == 2.0 and delta["avg_batch_samples"] == 4.0
    assert delta["executed_batch_sizes"] == {"2": 1, "4": 1, "6": 1}
    assert delta["queue_ms_per_request"] == pytest.approx(1.0)


def test_batching_figures_from_the_cores_metrics_and_a_schedulers_counts():
    """Both sources give the same figures: the core's counters summed over methods (its `component` label), a
    scheduler's `executions` keyed by (model, samples by method, calls merged, samples)."""
    def sample(name, value, model="core", component="unet", **labels):
        return (name, frozenset({"model": model, "component": component, **labels}.items())), value

    before = dict([sample("ti2i_executions_total", 4), sample("ti2i_merged_calls_total", 4),
                   sample("ti2i_samples_total", 8, method="sdedit")])
    after = dict([sample("ti2i_executions_total", 7), sample("ti2i_merged_calls_total", 9),
                  sample("ti2i_samples_total", 14, method="sdedit"), sample("ti2i_samples_total", 4, method="component"),
                  sample("ti2i_executions_total", 5, component="vae_decoder"),
                  sample("ti2i_executions_total", 9, model="sd.core")])  # another family's core
    from_metrics = _core_batching(before, after, "unet")
    single = ("unet", (("sdedit", 2),), 1, 2)
    counts = {single: 2, ("unet", (("", 2), ("sdedit", 2)), 2, 4): 1, ("unet", (("sdedit", 4),), 2, 4): 1,
              ("vae_decoder", (("sdedit", 1),), 1, 1): 5}
    from_counts = _counted_batching({single: 1}, counts, "unet")
    for figures in (from_metrics, from_counts):
        assert figures == {"source": "metrics", "executions": 3, "requests": 5, "inferences": 10,
                           "avg_requests_per_execution": 5 / 3, "avg_batch_samples": 10 / 3}


def test_settled_waits_for_counters_recorded_after_the_reply():
    """A counter that is still catching up (Triton counts after replying) is read once two reads agree."""
    counts = iter([43, 44, 45, 45, 45])
    assert settled(lambda: next(counts), wait_s=0.01) == 45
    rising = iter(range(10**6))
    assert settled(lambda: next(rising), wait_s=0.01, limit_s=0.05) < 10  # never settles: gives up at the limit


def test_shared_memory_runner_matches_plain_grpc(triton_server):
    """Inputs and outputs through system shared memory give the same tensors, regions reused by size."""
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.standard_normal((2, 4, 6, 8)).astype(np.float32),
                  timestep=np.array([10.0, 500.0], dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((2, 77, 32)).astype(np.float32))
    with TritonRunner(f"grpc://{triton_server.grpc_url}") as plain, \
            TritonRunner(f"grpc://{triton_server.grpc_url}", shared_memory=True,
                         api_key=triton_server.api_key) as shm:
        expected = plain.run("unet", **inputs)["noise_pred"]
        for i in range(3):  # the first call learns the output size, later ones receive through shm too
            got = shm.run("unet", **inputs)["noise_pred"]
            assert np.array_equal(got, expected)
            assert got.flags.writeable == (i > 0)  # a copy out of the region, not a view of it
        regions = len(shm._shm._regions)
        assert regions == 4  # three inputs, one output
        smaller = {k: v[:1] for k, v in inputs.items()}
        assert np.array_equal(shm.run("unet", **smaller)["noise_pred"], plain.run("unet", **smaller)["noise_pred"])
        image = shm.run("decode_image", latent=inputs["sample"][:1])  # an ensemble, uint8 and float outputs
        assert image["image"].dtype == np.uint8 and image["image"].shape == (1, 48, 64, 3)
        status = plain.client.get_system_shared_memory_status(headers=triton_server.api_headers, as_json=True)
        assert len(status.get("regions", {})) >= regions
    status_after = TritonRunner(f"grpc://{triton_server.grpc_url}").client.get_system_shared_memory_status(
        headers=triton_server.api_headers, as_json=True)
    assert not status_after.get("regions")  # closing unregisters every region


def test_registry_takes_new_backends(tmp_path, cache):
    """A backend registered later (e.g. TensorRT) is measured without touching the harness."""

    class Constant:
        kind = "in-process"

        def __init__(self, name, ctx):
            self.name = name

        def run(self, image, seed):
            return RunRecord(0.01, {"unet": [0.004, 0.004]}, None)

        def describe(self):
            return {"kind": self.kind}

        def close(self):
            pass

    register_backend("constant-test", Constant, description="test double")
    try:
        data = run_benchmark(BenchConfig(methods="sdedit", preset="tiny", backends=["constant-test"], concurrency=(),
                                         out=tmp_path / "r", cache=cache, repeats=2, warmup=1,
                                         quiet=True))
    finally:
        del BACKENDS["constant-test"]
    summary = data["methods"]["sdedit"]["summary"]["constant-test"]
    assert summary["end_to_end_s"]["median"] == pytest.approx(0.01)
    assert summary["stages"]["unet"]["calls_per_request"] == 2


def test_cli_rejects_unknown_names(tmp_path, capsys):
    assert main(["bench", "--backends", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["bench", "--method", "videoldm,nope", "--out", str(tmp_path / "r")]) == 2
    assert main(["bench", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2


def test_queue_stall_probe_serves_its_three_queue_kinds(tmp_path):
    """The probe's models carry the queues they are named for, and a real server answers each (its figures
    are the probe's to report, not this test's)."""
    from google.protobuf import text_format
    from ti2i.benchmarks import queue_stall
    from tritonclient.grpc import model_config_pb2 as mc

    root = queue_stall.write_repository(tmp_path / "repo")
    configs = {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in root.glob("*/config.pbtxt")}
    assert configs["bounded"].dynamic_batching.default_queue_policy.max_queue_size == 32
    assert configs["bounded_2_instances"].instance_group[0].count == 2
    assert not configs["unbounded"].dynamic_batching.HasField("default_queue_policy")
    results = queue_stall.measure(requests=5, busy_cores=0)
    assert set(results) == set(queue_stall.QUEUES) and all(r["requests"] == 5 for r in results.values())


def test_the_adapter_and_controlnet_benchmarks_measure_side_by_side(tmp_path, cache):
    """`ti2i bench --adapters` and `--controlnet` on the tiny preset: each mode measured, ratios from one run."""
    from ti2i.app.cli import main

    assert main(["bench", "--adapters", "--preset", "tiny", "--clients", "2", "--concurrency-requests", "1",
                 "--out", str(tmp_path / "adapters"), "--cache", str(cache), "--quiet"]) == 0
    report = json.loads((tmp_path / "adapters" / "adapters.json").read_text())
    assert set(report["throughput_rps"]) == {"none", "same", "different"}
    assert all(rate > 0 for rate in report["throughput_rps"].values())
    assert set(report["unet_s"]) == {"adapter", "none", "bare"} and report["adapter_vs_none_call"] > 0
    assert "Different adapters vs the same one" in (tmp_path / "adapters" / "adapters.md").read_text()
    assert main(["bench", "--controlnet", "--preset", "tiny", "--unet-calls", "2", "--out", str(tmp_path / "cn"),
                 "--cache", str(cache), "--quiet"]) == 0
    report = json.loads((tmp_path / "cn" / "controlnet.json").read_text())
    assert report["step_s"]["controlnet_and_unet"] > report["step_s"]["unet"] > 0  # the ControlNet adds a call
