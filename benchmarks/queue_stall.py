"""Triton's 500 ms lost wake-up: the same python-backend echo model with and without the bounded queue
that `ti2i repository` writes, sequential requests interleaved in one run, while other processes keep
cores busy (as a server's other models and its clients do).

    python -m ti2i.benchmarks.queue_stall [--requests 4000] [--busy-cores 1]

Why: with any queue policy (`default_queue_policy`: a size bound or a timeout), Triton 2.51's dynamic
batcher cannot prefetch; when a request arrives while the model's only instance is still finishing the
previous one, the batcher waits for a free instance on a condition variable that the instance signals
before it is counted as free again (core `DynamicBatchScheduler::WaitForPayloadSlotAvailable` waits with
`WaitingConsumerCount() > 0` as its predicate; `Payload::Execute` notifies first). The signal is lost and
the request sits out the batcher's default wait, 500 ms. Without a policy the batcher prefetches and the
predicate is its own payload queue's size, which the finishing instance does not race; with a second
instance the batcher finds the other one waiting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.benchmarks.guard_cost import ECHO_MODEL
from ti2i.benchmarks.machine import describe_machine
from ti2i.benchmarks.machine import label as machine_label
from ti2i.benchmarks.stats import summarize
from ti2i.triton_models.repository import RepositoryOptions, bounded_queue
from ti2i.triton_models.server import TritonServer

STALL_S = 0.25  # a request this slow stalled: the echo answers in about a millisecond
QUEUES = {"bounded": RepositoryOptions(), "bounded_2_instances": RepositoryOptions(instances=2),
          "unbounded": RepositoryOptions(max_queue_size=0)}  # model name: its repository options
_BURN = "import time\nend = time.time() + float(__import__('sys').argv[1])\nwhile time.time() < end: pass\n"


def write_repository(root: Path) -> Path:
    """One echo model per queue kind, batched as a component model is, with that kind's queue."""
    for name, options in QUEUES.items():
        config = mc.ModelConfig(name=name, backend="python", max_batch_size=8)
        config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[4])
        config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[4])
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
        bounded_queue(config, options, batched=True)
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        (root / name / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def _summary(times: list[float]) -> dict[str, float]:
    stats = summarize(times)
    return {"requests": stats["n"], "total_s": sum(times), "median_ms": stats["median"] * 1e3,
            "p99_ms": stats["p99"] * 1e3, "max_ms": stats["max"] * 1e3, "stalls": sum(t >= STALL_S for t in times)}


def measure(requests: int, busy_cores: int) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient

    times: dict[str, list[float]] = {name: [] for name in QUEUES}
    with tempfile.TemporaryDirectory() as tmp, \
            TritonServer(write_repository(Path(tmp) / "repo"), log_path=Path(tmp) / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
        for name in QUEUES:  # warm
            client.infer(name, [x])
        burners = [subprocess.Popen([sys.executable, "-c", _BURN, str(3600)]) for _ in range(busy_cores)]
        try:
            for i in range(requests):
                for name in (list(QUEUES) if i % 2 else reversed(list(QUEUES))):
                    start = time.perf_counter()
                    out = client.infer(name, [x]).as_numpy("y")
                    times[name].append(time.perf_counter() - start)
                    assert out.shape == (1, 4)
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
            client.close()
    return {name: _summary(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="sequential requests per model")
    parser.add_argument("--busy-cores", type=int, default=1, help="processes spinning on a core meanwhile")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    machine = describe_machine()
    results = measure(args.requests, args.busy_cores)
    print(f"machine: {machine_label(machine)}; {args.requests} sequential gRPC requests per model, interleaved, "
          f"{args.busy_cores} core(s) kept busy; a stall: a request of {STALL_S * 1e3:.0f} ms or more")
    print("| queue | requests | stalls | median ms | p99 ms | max ms | total s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests']} | {r['stalls']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['max_ms']:.1f} | {r['total_s']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "busy_cores": args.busy_cores, "results": results},
                                       indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
