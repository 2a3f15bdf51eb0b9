"""Per-component latency of the compiled engines against ONNX Runtime, side by side, one process.

    python -m ti2i.benchmarks.compiled --engines DIR [--fp16-engines DIR16] [--backend aoti] [--rounds 40]

For every component with a build of `--backend` (`ti2i build`), the ORT engine and the compiled one
(and, with `--fp16-engines`, their fp16 counterparts) run the same inputs at the component's opt
sizes, interleaved call by call so passing load hits them alike; medians in ms and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ti2i.benchmarks.machine import describe_machine, label, load_average
from ti2i.engines import profiles
from ti2i.engines.builds import BuildIndex
from ti2i.engines.loader import load_engine
from ti2i.manifest import Manifest
from ti2i.spec import sample_inputs


def interleaved_ms(engines: dict, inputs: dict, rounds: int) -> dict[str, float]:
    for engine in engines.values():
        engine.run(inputs)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True)
    parser.add_argument("--fp16-engines", default=None)
    parser.add_argument("--backend", default="aoti", choices=("aoti", "tensorrt"))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    print(f"{label(describe_machine())}; load average {load_average()}")
    manifests = {"fp32": Manifest.load(args.engines)}
    if args.fp16_engines:
        manifests["fp16"] = Manifest.load(args.fp16_engines)
    for name in BuildIndex.load(args.engines, args.backend).entries:
        index = BuildIndex.load(args.engines, args.backend)
        prof = index.profile(name)
        spec = manifests["fp32"].components[name].spec
        sizes = {dim: r[1] for dim, r in profiles.dim_ranges(spec).items()}
        if not index.entries[name].get("dynamic"):  # a static package: its own shapes
            sizes.update(_sizes_of(spec, prof))
        inputs = sample_inputs(spec, sizes)
        engines = {}
        for precision, manifest in manifests.items():
            engines[f"ort {precision}"] = load_engine(manifest, name)
            if name in BuildIndex.load(manifest.root, args.backend).entries:
                engines[f"{args.backend} {precision}"] = load_engine(manifest, name, backend=args.backend)
        ref = engines["ort fp32"].run(inputs)
        got = engines[f"{args.backend} fp32"].run(inputs)
        error = max(float(np.abs(got[k] - v).max() / max(np.abs(v).max(), 1e-12)) for k, v in ref.items())
        ms = interleaved_ms(engines, inputs, args.rounds)
        cells = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
        ratio = ms[f"{args.backend} fp32"] / ms["ort fp32"]
        print(f"{name} at {sizes}: {cells}; {args.backend}/ort fp32 time {ratio:.2f}x; max rel diff {error:.1e}")
    return 0


def _sizes_of(spec, prof) -> dict[str, int]:
    out = {}
    for tensor in spec.inputs:
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                out[dim] = prof[tensor.name][1][axis]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
