"""OpenVINO backend: the exported ONNX graphs compiled for this CPU, in bf16 where its matrix units take it.

No export of its own: the engine reads the ONNX graph the manifest names and compiles it once per process
(OpenVINO's `CACHE_DIR` keeps the compiled blob beside the engines, so a restart does not recompile). The
declared dynamic dims stay dynamic. Precision comes from the hardware: `auto` is bf16 where OpenVINO's
CPU plugin reports BF16 (AMX or AVX-512-BF16) and fp32 elsewhere; a component whose declaration says
``bf16=False`` runs fp32 whatever is asked.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines.base import Engine
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.spec import ComponentSpec

PRECISIONS = ("auto", "fp32", "bf16")
_HINTS = {"fp32": "f32", "bf16": "bf16"}
# /proc/cpuinfo flags of the units bf16 inference runs on (reported with the precision chosen).
MATRIX_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "amx_fp16")
CACHE_FOLDER = "openvino_cache"
# PERFORMANCE_HINT is LATENCY (one stream over every core): the core's callers share one compiled model, and
# LATENCY beat THROUGHPUT both on its merged calls and on two concurrent ones (docs/design-notes.md).


@lru_cache(maxsize=1)
def core() -> Any:
    """One OpenVINO Core per process: every engine's compiled model shares its CPU plugin and thread pool."""
    import openvino as ov

    return ov.Core()


def cpu_supports_bf16() -> bool:
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def matrix_units() -> list[str]:
    """The bf16 matrix-unit flags this CPU reports (empty on CPUs without them, e.g. AMD Zen 3)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in MATRIX_FLAGS if flag in flags]


def resolve_precision(requested: str) -> str:
    """`auto` -> bf16 where the CPU plugin runs bf16 natively, else fp32; bf16 asked of a CPU without it is an
    error rather than a slow emulation."""
    if requested not in PRECISIONS:
        raise InvalidInputError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "bf16" and not cpu_supports_bf16():
        raise InvalidInputError("precision bf16: this CPU has no bf16 units (no AMX or AVX-512-BF16); use fp32")
    return requested


def describe_precision(precision: str) -> str:
    """One line for the start of a run: the precision and the CPU features it follows from."""
    units = matrix_units()
    return (f"openvino {precision} on {core().get_property('CPU', 'FULL_DEVICE_NAME')} "
            f"({', '.join(units) if units else 'no bf16 matrix units'})")


def cache_dir(engine_dir: Path, precision: str) -> Path:
    """Where compiled blobs are kept: beside the engines, or in the user's cache where that is read-only; one
    folder per precision, since OpenVINO 2026.4 keys a blob compiled from a file path without its precision
    (an fp32 blob came back for a bf16 compile and gave NaN)."""
    beside = engine_dir / CACHE_FOLDER / precision
    try:
        beside.mkdir(parents=True, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    folder = hashlib.sha256(str(engine_dir.resolve()).encode()).hexdigest()[:16]
    fallback = Path.home() / ".cache" / "ti2i" / "openvino" / folder / precision
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


class OpenVinoEngine(Engine):
    concurrent_calls = True  # one infer request per calling thread; infer releases the GIL while it runs

    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, precision: str = "fp32",
                 threads: int | None = None, cache: Path | None = None):
        super().__init__(spec)
        path = Path(onnx_path)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: ONNX file {path} does not exist")
        if precision not in _HINTS:
            raise InvalidInputError(f"{spec.name}: OpenVINO precision {precision!r} (fp32 or bf16)")
        self.precision = precision
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        self.compiled = core().compile_model(str(path), "CPU", config)
        self._output_names = [t.name for t in spec.outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request().infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {name: np.array(results[name]) for name in self._output_names}

    def close(self) -> None:
        self.compiled = None
