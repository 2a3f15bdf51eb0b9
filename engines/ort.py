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


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Full graph optimisation; intra-op threads = the cores this process may use unless told."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OrtEngine(Engine):
    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        super().__init__(spec)
        path = Path(onnx_path)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: ONNX file {path} does not exist")
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                            providers=list(providers or default_providers()))
        self._output_names = [t.name for t in spec.outputs]

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return dict(zip(self._output_names, values))
