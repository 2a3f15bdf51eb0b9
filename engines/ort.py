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


SPIN_ENV = "TI2I_ORT_SPINNING"  # "1" turns intra-op thread spinning on for every session ("0": off, the default)


def spinning_default() -> bool:
    """Whether idle intra-op threads should spin (busy-wait) for the next operator: off unless TI2I_ORT_SPINNING=1.

    Spinning wins only for calls made back to back (a tiny UNet: 3.0-3.3 ms per call spinning, 4.2 ms not, on
    2 cores). A sampling loop does Python and torch work between its calls, which the spinning threads starve:
    with a 200² numpy matmul between calls the same UNet took 6.7-8.7 ms spinning and 5.2-5.9 ms not, and a
    whole tiny SDEdit in-process 0.12-0.15 s spinning against 0.05-0.06 s not (`ti2i bench --preset tiny
    --backends ort` with TI2I_ORT_SPINNING=1 / 0, four runs). Large graphs gain nothing either (the SD 1.5 UNet
    step ran 1.2× faster without it), and a hosted method model's loop threads lose most.
    """
    return os.environ.get(SPIN_ENV) == "1"


def session_options(threads: int | None, spinning: bool) -> ort.SessionOptions:
    """Full graph optimisation; intra-op threads = the cores this process may use unless told."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtEngine(Engine):
    concurrent_calls = True  # InferenceSession.run is thread-safe, and releases the GIL while it runs

    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, providers: Sequence[str] | None = None,
                 threads: int | None = None, spinning: bool | None = None):
        super().__init__(spec)
        path = Path(onnx_path)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: ONNX file {path} does not exist")
        self.spinning = spinning_default() if spinning is None else spinning
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads, self.spinning),
                                            providers=list(providers or default_providers()))
        self._output_names = [t.name for t in spec.outputs]

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return dict(zip(self._output_names, values))
