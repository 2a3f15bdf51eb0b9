"""What the HTTP guard costs per call: the same HTTP inference straight to Triton's port and through
the guard, interleaved in one run, at a few request sizes.

    python -m ti2i.benchmarks.guard_cost [--calls 200]

Serves a python-backend echo model (so the figure is the transport's, not a model's) and prints
medians and the guarded/direct ratio per size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ti2i.benchmarks.machine import describe_machine
from ti2i.benchmarks.machine import label as machine_label
from ti2i.triton_models.server import TritonServer

_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x")
                                                            .as_numpy())]) for r in requests]
"""
SIZES = {"16 B": 4, "128 KiB": 32 * 1024, "4 MiB": 1024 * 1024}


def write_echo_repository(root: Path) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def measure(calls: int) -> dict[str, dict[str, float]]:
    import tritonclient.http as httpclient

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            TritonServer(write_echo_repository(Path(tmp) / "repo"), log_path=Path(tmp) / "server.log") as server:
        clients = {"direct": httpclient.InferenceServerClient(server.triton_http_url),
                   "guarded": httpclient.InferenceServerClient(server.http_url)}
        for label, n in SIZES.items():
            x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
            inp = httpclient.InferInput("x", [n], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            times: dict[str, list[float]] = {k: [] for k in clients}
            for i in range(calls + 5):
                for name, client in (clients.items() if i % 2 else reversed(clients.items())):
                    t0 = time.perf_counter()
                    out = client.infer("echo", [inp]).as_numpy("y")
                    dt = time.perf_counter() - t0
                    if i >= 5:
                        times[name].append(dt)
                    assert out.shape == x.shape
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            results[label] = {"direct_ms": med["direct"], "guarded_ms": med["guarded"],
                              "extra_ms": med["guarded"] - med["direct"], "ratio": med["guarded"] / med["direct"]}
        for client in clients.values():
            client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="measured calls per size and path")
    args = parser.parse_args(argv)
    print(f"machine: {machine_label(describe_machine())}; {args.calls} interleaved calls per size and path")
    print("| request | direct ms (median) | guarded ms (median) | extra ms | guarded/direct |")
    print("|---|---|---|---|---|")
    for label, r in measure(args.calls).items():
        print(f"| {label} | {r['direct_ms']:.2f} | {r['guarded_ms']:.2f} | {r['extra_ms']:+.2f} | {r['ratio']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
