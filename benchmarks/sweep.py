"""The concurrency sweep: N client threads, each with its own runner, sending whole requests for a while.

Each level (a client count) records its throughput, its latencies and what the server's models did meanwhile:
Triton's statistics for each model, and for the method's UNet the engine core's own counts of what its
scheduler ran (`triton_models/core_metrics.py`): every served call reaches the engines through the core, so
how many requests' calls each engine call merged is known there only (the UNet's entry model sees one
request per execution).

`rounds` > 1 runs every level once per round, the levels back to back in each round, so that the load a
shared machine passes through lands on every level alike: a level's gain is the median over rounds of its
throughput over the one-client level's in the same round (the figures of one pass moved by ±20 % from one
minute to the next on the 2-core machine these were written on), and its throughput pools the rounds'
requests over their time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from ti2i.benchmarks.backends import BACKENDS, UNET_OF, BenchContext
from ti2i.benchmarks.cpu_time import cpu_figures, gain_factors, own_cpu_s, tree_cpu_s
from ti2i.benchmarks.server_metrics import by_label, read_metrics
from ti2i.benchmarks.settle import settled
from ti2i.benchmarks.stats import median, ratio, summarize
from ti2i.triton_models.core_wire import core_name

CORE_METRICS = ("ti2i_executions_total", "ti2i_merged_calls_total", "ti2i_samples_total")
METRICS_PERIOD_S = 0.5  # how often the engine core sends its metrics


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def run_sweep(method: str, name: str, levels: list[int], per_client: int, rounds: int, ctx: BenchContext,
              image: Image.Image, seed: int, entry: dict[str, Any], save: Callable[[], None], progress: Any) -> None:
    """Sweep `levels` with backend `name`; the sweep goes into `entry` (and is saved after every level)."""
    info = BACKENDS[name]  # an in-process backend (ort) sweeps too: concurrent loops in one process, no server
    try:
        backend = info.factory(name, ctx)
    except Exception as err:
        record_sweep(entry, {"backend": name, "skipped": f"{type(err).__name__}: {first_line(err)}"})
        return
    if not hasattr(backend, "new_client"):
        record_sweep(entry, {"backend": name, "skipped": "the backend cannot make concurrent clients"})
        backend.close()
        return
    backend.close()
    sweep: dict[str, Any] = {"backend": name, "requests_per_client": per_client, "rounds": [], "levels": [],
                             "cores": len(os.sched_getaffinity(0))}
    record_sweep(entry, sweep)
    for round_index in range(rounds):
        runs: list[dict[str, Any]] = []
        sweep["rounds"].append(runs)
        for n in levels:
            progress.phase = f"{method} · concurrency {n}" + (f" · round {round_index + 1}/{rounds}" if rounds > 1
                                                             else "")
            run = _level(method, name, n, per_client, backend, ctx, image, seed, progress)
            run["throughput_gain"] = ratio(run["throughput_rps"], (runs[0] if runs else run)["throughput_rps"])
            runs.append(run)
            sweep["levels"] = pooled_levels(sweep["rounds"], sweep["cores"])
            unet = run["server"].get(UNET_OF[method], {})
            progress.log(f"[{method}] concurrency {n}: {run['throughput_rps'] or 0:.3f} req/s, "
                         f"p50 {run['latency_s'].get('median', 0):.3f} s, {UNET_OF[method]} avg batch "
                         f"{unet.get('avg_requests_per_execution', 0) or 0:.2f} requests/execution")
            save()
    gains = [lv["throughput_gain"] for lv in sweep["levels"] if lv.get("throughput_gain")]
    if gains:
        best = max(range(len(gains)), key=lambda i: gains[i])
        sweep["best_gain"] = gains[best]
        sweep["best_clients"] = sweep["levels"][best]["clients"]


def _level(method: str, name: str, n: int, per_client: int, backend: Any, ctx: BenchContext, image: Image.Image,
           seed: int, progress: Any) -> dict[str, Any]:
    """One run of `n` clients, `per_client` requests each."""
    runners = [backend.new_client() for _ in range(n)]  # each ready (configs fetched) before the clock starts
    try:
        before = settled(lambda: _server_stats(ctx.server))
        core_before = _core_metrics(ctx.server)
        counts = getattr(backend, "step_counts", None)  # an in-process step scheduler's own counts
        counts_before = counts() if counts else {}
        spans: list[tuple[float, float]] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n)
        done = [0]

        def client(runner: Any) -> None:
            barrier.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                try:
                    runner(image, seed)
                except Exception as err:  # recorded; the other clients go on
                    with lock:
                        errors.append(f"{type(err).__name__}: {first_line(err)}")
                    return
                with lock:
                    spans.append((start, time.perf_counter()))
                    done[0] += 1

        threads = [threading.Thread(target=client, args=(r,), daemon=True) for r in runners]
        cpu_start = (tree_cpu_s(), own_cpu_s(), time.perf_counter())
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            progress.status(f"{name} · {n} clients · {done[0]}/{n * per_client} requests done")
            for t in threads:
                t.join(timeout=0.5)
        tree_end, own_end, cpu_wall = tree_cpu_s(), own_cpu_s(), time.perf_counter() - cpu_start[2]
        after = settled(lambda: _server_stats(ctx.server))
        core_after = _core_metrics(ctx.server)
        counts_after = counts() if counts else {}
    finally:
        for runner in runners:
            with contextlib.suppress(Exception):
                runner.close()
    tree = tree_end - cpu_start[0] if tree_end is not None and cpu_start[0] is not None else None
    latencies = [b - a for a, b in spans]
    wall = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else None
    raw = raw_delta(before, after)
    server = derive_stats(raw)
    unet = UNET_OF[method]
    batching = _core_batching(core_before, core_after, unet)
    if batching["executions"]:  # the core ran the level's UNet calls (not an in-process sweep beside the server)
        server[unet] = with_batching(server.get(unet), batching)
    if counts:
        server[unet] = _counted_batching(counts_before, counts_after, unet)
    return {
        "clients": n,
        "requests": len(spans),
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": (len(spans) / wall) if wall else None,
        "latency_s": summarize(latencies),
        "latencies_s": latencies,
        "server": server,
        "raw_server": raw,
        "cpu": cpu_figures(tree, own_end - cpu_start[1], len(spans), cpu_wall),
    }


def pooled_levels(rounds: list[list[dict[str, Any]]], cores: int) -> list[dict[str, Any]]:
    """One level per client count over every round so far: requests over time pooled, the gain the median of
    the rounds' own gains (each over the one-client run of its round), server figures from pooled counts, CPU
    pooled and the gain split into its factors over the first level (`cpu_time.py`; `cores`: the machine's)."""
    levels: list[dict[str, Any]] = []
    for position in range(max(len(r) for r in rounds)):
        runs = [r[position] for r in rounds if len(r) > position]
        walls = [r["wall_s"] for r in runs if r["wall_s"]]
        requests = sum(r["requests"] for r in runs)
        latencies = [x for r in runs for x in r["latencies_s"]]
        raw: dict[str, Any] = {}
        for run in runs:
            raw = add_raw(raw, run["raw_server"])
        server = derive_stats(raw)
        for model, item in runs[0]["server"].items():  # batching from the core's counts, not Triton's statistics
            if item.get("source") == "metrics":
                pooled = _pool_batching([r["server"][model] for r in runs if model in r["server"]])
                server[model] = with_batching(server.get(model), pooled)
        gains = [r["throughput_gain"] for r in runs if r.get("throughput_gain")]
        cpus = [r["cpu"] for r in runs if r.get("cpu")]
        cpu = cpu_figures(sum(c["tree_s"] for c in cpus), sum(c["own_s"] for c in cpus),
                          sum(r["requests"] for r in runs if r.get("cpu")),
                          sum(c["elapsed_s"] for c in cpus)) if cpus else {}
        level = {
            "clients": runs[0]["clients"],
            "rounds": len(runs),
            "requests": requests,
            "errors": [e for r in runs for e in r["errors"]],
            "wall_s": sum(walls) if walls else None,
            "throughput_rps": requests / sum(walls) if walls else None,
            "throughput_gain": median(gains) if gains else None,
            "throughput_gain_range": [min(gains), max(gains)] if gains else None,
            "latency_s": summarize(latencies),  # each round's run keeps its latencies
            "server": server,
            "cpu": cpu,
        }
        level["cpu"].update(gain_factors(level, levels[0] if levels else level, cores))
        levels.append(level)
    return levels


def record_sweep(entry: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The first sweep is `concurrency` (as before); every sweep is also in `concurrency_sweeps`."""
    entry.setdefault("concurrency", sweep)
    entry.setdefault("concurrency_sweeps", []).append(sweep)


# --- what the server did: Triton's statistics ---------------------------------------------------------

def _server_stats(server: Any) -> dict[str, Any]:
    if server is None:
        return {}
    import tritonclient.grpc as grpcclient

    with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client:
        stats = client.get_inference_statistics(headers=getattr(server, "api_headers", None), as_json=True)
    return {m["name"]: m for m in stats.get("model_stats", [])}


def _ns(stat: dict[str, Any] | None, key: str = "ns") -> int:
    return int((stat or {}).get(key, 0) or 0)


TIMES = ("queue", "compute_input", "compute_infer", "compute_output")


def raw_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per model, the counts between two statistics snapshots: executions, inferences, successful requests,
    nanoseconds per phase, executions per batch size."""
    out: dict[str, Any] = {}
    for name, now in after.items():
        old = before.get(name, {})
        executions = int(now.get("execution_count", 0) or 0) - int(old.get("execution_count", 0) or 0)
        inferences = int(now.get("inference_count", 0) or 0) - int(old.get("inference_count", 0) or 0)
        if executions <= 0 and inferences <= 0:
            continue
        s_new, s_old = now.get("inference_stats", {}), old.get("inference_stats", {})
        batches: dict[str, int] = {}
        old_batches = {int(b["batch_size"]): _ns(b.get("compute_infer"), "count") for b in old.get("batch_stats", [])}
        for b in now.get("batch_stats", []):
            size = int(b["batch_size"])
            count = _ns(b.get("compute_infer"), "count") - old_batches.get(size, 0)
            if count > 0:
                batches[str(size)] = count
        out[name] = {"executions": executions, "inferences": inferences,
                     "requests": _ns(s_new.get("success"), "count") - _ns(s_old.get("success"), "count"),
                     **{f"{t}_ns": _ns(s_new.get(t)) - _ns(s_old.get(t)) for t in TIMES},
                     "executed_batch_sizes": batches}
    return out


def add_raw(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two `raw_delta`s added, model by model."""
    out = {name: dict(item, executed_batch_sizes=dict(item["executed_batch_sizes"])) for name, item in a.items()}
    for name, item in b.items():
        into = out.setdefault(name, {k: 0 for k in item if k != "executed_batch_sizes"} | {"executed_batch_sizes": {}})
        for key, value in item.items():
            if key == "executed_batch_sizes":
                for size, count in value.items():
                    into[key][size] = into[key].get(size, 0) + count
            else:
                into[key] += value
    return out


def derive_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Per model: counts, mean batch, queue and compute milliseconds per request, executed batch sizes."""
    out: dict[str, Any] = {}
    for name, r in raw.items():
        executions, requests = r["executions"], r["requests"]
        out[name] = {
            "requests": requests,
            "executions": executions,
            "inferences": r["inferences"],
            "avg_batch_samples": r["inferences"] / executions if executions else None,
            "avg_requests_per_execution": requests / executions if executions else None,
            **{f"{t}_ms_per_request": r[f"{t}_ns"] / requests / 1e6 if requests else None for t in TIMES},
            "executed_batch_sizes": r["executed_batch_sizes"],
        }
    return out


# --- what the engines did: the engine core's counts ------------------------------------------------------

def _core_metrics(server: Any) -> dict[Any, float]:
    """The engine core's execution counters, once settled (they arrive every 0.5 s)."""
    if server is None:
        return {}
    return settled(lambda: read_metrics(server.metrics_url, CORE_METRICS), wait_s=METRICS_PERIOD_S + 0.1)


def _core_batching(before: dict[Any, float], after: dict[Any, float], component: str) -> dict[str, Any]:
    """What the bench's one core (`core`) ran of `component`'s calls between the two reads, every method's."""
    def total(samples: dict[Any, float], name: str) -> float:
        return sum(by_label(samples, name, "component", model=core_name(None), component=component).values())

    executions, calls, samples = (int(total(after, n) - total(before, n)) for n in CORE_METRICS)
    return _pool_batching([{"executions": executions, "requests": calls, "inferences": samples}])


def _counted_batching(before: dict[Any, int], after: dict[Any, int], component: str) -> dict[str, Any]:
    """The same figures from a `StepScheduler.executions` counter, (model, samples by tag, calls, samples) ->
    engine calls, read before and after."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after if key[0] == component}
    return _pool_batching([{"executions": sum(delta.values()),
                            "requests": sum(key[2] * n for key, n in delta.items()),
                            "inferences": sum(key[3] * n for key, n in delta.items())}])


def _pool_batching(items: list[dict[str, Any]]) -> dict[str, Any]:
    executions, calls, samples = (sum(i[k] for i in items) for k in ("executions", "requests", "inferences"))
    return {"source": "metrics", "executions": executions, "requests": calls, "inferences": samples,
            "avg_requests_per_execution": calls / executions if executions else None,
            "avg_batch_samples": samples / executions if executions else None}


def with_batching(stats: dict[str, Any] | None, batching: dict[str, Any]) -> dict[str, Any]:
    """A model's Triton statistics with its batching taken from the core's counts: its entry model's own
    executions (one request each) and batch sizes are not what the engines ran; its queue and compute times
    per request (the entry's requests, as clients see them) stay."""
    kept = {k: v for k, v in (stats or {}).items() if k.endswith("_ms_per_request")}
    return {**kept, **batching}
