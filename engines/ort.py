"""ONNX Runtime backend: CPU execution provider here, CUDA where onnxruntime-gpu is installed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ti2i.engines.base import Engine
from ti2i.errors import ModelNotFoundError
from ti2i.spec import ComponentSpec


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# Graphs larger than this (weights included) are compute-bound: each operator runs for milliseconds.
SPIN_MAX_BYTES = 64 * 1024**2
SPIN_ENV = "TI2I_ORT_SPINNING"  # "1"/"0" forces intra-op thread spinning on/off for every session


def spinning_default(model_bytes: int, shared: bool = False) -> bool:
    """Whether idle intra-op threads should spin (busy-wait) for the next operator.

    Spinning saves the wake-up latency between operators: it matters for small graphs whose
    operators take microseconds (a tiny UNet call: 1.3 ms spinning vs 2.2 ms not). For large
    graphs it only burns the cycles other processes need (the Triton stubs and the client share
    the cores): on 2 shared cores the SD 1.5 UNet step ran 1.2× faster without it. `shared`: the
    process runs many loops in threads (a hosted method model), which the spinning threads starve:
    off for every graph (tiny SDEdit under the step scheduler: 1.8× faster per request without it).
    """
    env = os.environ.get(SPIN_ENV)
    if env in ("0", "1"):
        return env == "1"
    return not shared and model_bytes <= SPIN_MAX_BYTES


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Full graph optimisation; intra-op threads = the cores this process may use unless told."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def model_bytes(path: Path) -> int:
    """The graph's size on disk, external weight files included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


class OrtEngine(Engine):
    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, providers: Sequence[str] | None = None,
                 threads: int | None = None, spinning: bool | None = None, shared: bool = False):
        super().__init__(spec)
        path = Path(onnx_path)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: ONNX file {path} does not exist")
        self.spinning = spinning_default(model_bytes(path), shared) if spinning is None else spinning
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads, self.spinning),
                                            providers=list(providers or default_providers()))
        self._output_names = [t.name for t in spec.outputs]

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return dict(zip(self._output_names, values))
