"""Capacity of one replica: whole method requests per second at rising concurrency, with the autoscaler's signal.

One server serves every family given (`--engines NAME=DIR`, as `ti2i serve`); for each method and each
concurrency level, that many clients (one TritonRunner each, gRPC) run the method back to back for a
bounded number of requests. Per level it reports requests/s and the mean queue time per request as the
Prometheus adapter rule computes it from Triton's metrics (Δ nv_inference_queue_duration_us /
Δ nv_inference_request_success, summed over the server's models), which is what the HPA holds at its
target. Usage:

    python -m ti2i.benchmarks.capacity --engines sd=work/engines --engines svd=work/engines-svd \\
        --methods all --concurrency 1,2,4 --requests 8 --out capacity.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from ti2i.benchmarks.harness import EXAMPLE
from ti2i.benchmarks.machine import describe_machine, label, load_average
from ti2i.benchmarks.server_metrics import read_metrics
from ti2i.benchmarks.settle import settled
from ti2i.client.cyclediffusion import cyclediffusion
from ti2i.client.ddib import ddib
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.inpaint import inpaint
from ti2i.client.pix2pix import pix2pix
from ti2i.client.runners import Runner, TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.svd import svd
from ti2i.client.txt2img import txt2img
from ti2i.client.videoldm import videoldm
from ti2i.families import parse_engine_dirs
from ti2i.manifest import Manifest
from ti2i.triton_models.families import write_family_repository
from ti2i.triton_models.server import TritonServer

SIZE = 64  # the tiny models' own size; every method at 64×64
STEPS = 10


def requests(image: Image.Image) -> dict[str, Callable[[Runner], Any]]:
    """One request per method at SIZE×SIZE and STEPS steps (videos: 4 frames)."""
    size = dict(height=SIZE, width=SIZE, progress=False)
    mask = centered_ellipse_mask(image.size)
    return {
        "txt2img": lambda r: txt2img(r, "hills at sunset", steps=STEPS, **size),
        "sdedit": lambda r: sdedit(r, image, "hills at sunset", steps=STEPS, **size),
        "pix2pix": lambda r: pix2pix(r, image, "make it snowy", steps=STEPS, **size),
        "cyclediffusion": lambda r: cyclediffusion(r, image, "mountains", "hills", steps=STEPS, **size),
        "inpaint": lambda r: inpaint(r, image, mask, "a moon", steps=STEPS, **size),
        "ddib": lambda r: ddib(r, image, "mountains", "hills", steps=STEPS, **size),
        "videoldm": lambda r: videoldm(r, image, "clouds", frames=4, steps=STEPS, **size),
        "svd": lambda r: svd(r, image, frames=4, steps=STEPS, **size),
    }


def queue_counters(metrics_url: str) -> tuple[float, float]:
    """(Σ nv_inference_queue_duration_us, Σ nv_inference_request_success) over every model of the server."""
    sums = {"nv_inference_queue_duration_us": 0.0, "nv_inference_request_success": 0.0}
    for (name, _), value in read_metrics(metrics_url, sums).items():
        sums[name] += value
    return sums["nv_inference_queue_duration_us"], sums["nv_inference_request_success"]


def measure(url: str, metrics_url: str, run: Callable[[Runner], Any], clients: int, count: int) -> dict[str, Any]:
    runners = [TritonRunner(url) for _ in range(clients)]
    try:
        for runner in runners:
            run(runner)  # warm-up: configs fetched, sessions loaded
        queue0, success0 = settled(lambda: queue_counters(metrics_url))
        load = os.getloadavg()[0]  # the cores are shared: what else ran is part of the figure
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i: run(runners[i % clients]), range(count)))
        wall = time.perf_counter() - start
        queue1, success1 = settled(lambda: queue_counters(metrics_url))
    finally:
        for runner in runners:
            runner.close()
    calls = success1 - success0
    return {"clients": clients, "requests": count, "wall_s": round(wall, 3), "requests_per_s": round(count / wall, 3),
            "model_calls": int(calls), "queue_us_per_call": round((queue1 - queue0) / max(calls, 1), 1),
            "load_1min": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", action="append", required=True, help="NAME=DIR, repeated (as ti2i serve)")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--requests", type=int, default=8, help="requests per method and level (bounded)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    manifests = {name: Manifest.load(path) for name, path in parse_engine_dirs(args.engines).items()}
    image = Image.open(EXAMPLE).convert("RGB").resize((SIZE, SIZE))
    runs = requests(image)
    methods = list(runs) if args.methods == "all" else args.methods.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    out = args.out
    repository = write_family_repository(manifests, out.with_suffix("") / "repository")
    machine = describe_machine()
    results: dict[str, Any] = {"machine": label(machine), "load_before": load_average(), "size": SIZE,
                               "steps": STEPS, "methods": {}}
    with TritonServer(repository, log_path=out.with_suffix(".log")) as server:
        for method in methods:
            results["methods"][method] = [measure(f"grpc://{server.grpc_url}", server.metrics_url, runs[method], c,
                                                  max(args.requests, c)) for c in levels]
            print(method, json.dumps(results["methods"][method]), flush=True)
    results["load_after"] = load_average()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
