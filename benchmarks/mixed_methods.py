"""Throughput of clients that mix methods of one family: what batching across methods gives.

Each of `clients` threads keeps one connection (`RemoteMethodClient`) and sends whole requests in turn of
txt2img, sdedit, cyclediffusion and ddib (same size, so their UNet calls can merge), `requests` in all, to
a server started here from a repository written beforehand (`ti2i repository --methods ...`). It prints
requests per second and, where the server exports them, the engine core's batching metrics.

    python -m ti2i.benchmarks.mixed_methods --repository R [--clients 8] [--requests 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from pathlib import Path

from PIL import Image

from ti2i.benchmarks.clients import run_clients
from ti2i.benchmarks.server_metrics import by_label, read_metrics
from ti2i.client.registry import METHODS
from ti2i.client.remote import RemoteMethodClient
from ti2i.triton_models.server import TritonServer

MIXED = ("txt2img", "sdedit", "cyclediffusion", "ddib")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"


def request(method: str, image: Image.Image, seed: int, steps: int) -> dict:
    values: dict = {"prompt": "a painting of a house", "steps": steps}
    if method == "txt2img":
        values.update(height=image.height, width=image.width, seed=seed)
    else:
        values.update(image=image, strength=0.5)
        if method != "ddib":
            values["seed"] = seed
        if method in ("cyclediffusion", "ddib"):
            values["source_prompt"] = "a photo of a house"
    return values


def mixed_round(url: str, image: Image.Image, clients: int, requests: int, steps: int) -> float:
    """Requests per second of `clients` threads sending `requests` mixed requests in all."""
    jobs = iter(itertools.islice(itertools.cycle(MIXED), requests))
    lock = threading.Lock()

    def client(index: int) -> None:
        remote = RemoteMethodClient(url)
        try:
            while True:
                with lock:
                    method = next(jobs, None)
                if method is None:
                    return
                remote.run(METHODS[method], progress=False, stream=False, **request(method, image, index, steps))
        finally:
            remote.close()

    return requests / run_clients(client, clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, type=Path, help="written by `ti2i repository`")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="whole requests per round, all clients together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    image = Image.open(EXAMPLE).convert("RGB")
    with TritonServer(args.repository, startup_timeout_s=900) as server:
        url = f"grpc://{server.grpc_url}"
        mixed_round(url, image, args.clients, len(MIXED), args.steps)  # warm every method
        rates = [mixed_round(url, image, args.clients, args.requests, args.steps) for _ in range(args.rounds)]
        time.sleep(0.6)  # the core's metrics are sent every 0.5 s
        metrics = read_metrics(server.metrics_url)
    print(f"{args.clients} clients mixing {', '.join(MIXED)}: " + ", ".join(f"{r:.2f}" for r in rates)
          + f" requests/s (median {sorted(rates)[len(rates) // 2]:.2f})")
    executions = by_label(metrics, "ti2i_executions_total", "component")
    if executions:
        mixed = by_label(metrics, "ti2i_mixed_executions_total", "component")
        calls = by_label(metrics, "ti2i_merged_calls_total", "component")
        print(f"UNet: {executions.get('unet', 0):.0f} executions, {calls.get('unet', 0):.0f} requests' calls "
              f"merged into them, {mixed.get('unet', 0):.0f} holding samples of two or more methods")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
