"""TensorRT backend: a plan behind the `Engine` interface, on preallocated device buffers.

TensorRT is optional (``pip install 'ti2i[tensorrt]'``) and imported only here, when a plan is
built or run; `require_tensorrt` turns its absence, or a missing GPU, into one clear error. The
engine follows NVIDIA's demo: input shapes set per call (`set_input_shape`), every tensor bound by
address (`set_tensor_address`) to torch CUDA buffers grown to the largest shape seen, one
`execute_async_v3` on the engine's stream; with a static profile the call is captured once as a
CUDA graph and replayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines import profiles
from ti2i.engines.base import Engine
from ti2i.errors import BackendUnavailableError, ModelNotFoundError
from ti2i.spec import ComponentSpec

INSTALL_HINT = "pip install 'ti2i[tensorrt]'"


def require_tensorrt() -> Any:
    """The `tensorrt` module, or one line saying what is missing: the package or a CUDA GPU."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"TensorRT is not installed ({INSTALL_HINT}); --backend tensorrt "
                                      f"needs it and an NVIDIA GPU") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} is installed but no CUDA GPU is visible "
                                      f"(torch {torch.__version__} sees none); --backend tensorrt needs one")
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of the current GPU: part of every plan's cache key."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


class TrtEngine(Engine):
    def __init__(self, plan_path: str | Path, spec: ComponentSpec, profile: profiles.Profile,
                 cuda_graph: bool | None = None):
        super().__init__(spec)
        trt = require_tensorrt()
        import torch

        path = Path(plan_path)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: TensorRT plan {path} does not exist (run `ti2i build`)")
        self._torch = torch
        self.device = "cuda"  # where run_device takes and returns its tensors
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelNotFoundError(f"{spec.name}: {path} is not a plan this TensorRT/GPU can load; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.profile = profile
        self.cuda_graph = profiles.is_static(profile) if cuda_graph is None else cuda_graph
        self._buffers: dict[str, Any] = {}
        self._graph = None
        self._dtypes = {t.name: getattr(torch, t.dtype) for t in (*spec.inputs, *spec.outputs)}

    def _buffer(self, name: str, shape: tuple[int, ...]):
        """A device view of `shape` on a buffer kept for `name`, grown (never shrunk) as shapes grow."""
        numel = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._torch.empty(max(numel, 1), dtype=self._dtypes[name], device="cuda")
            self._buffers[name] = buf
            self._graph = None  # addresses changed
        return buf[:numel].view(shape)

    def run_device(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on torch CUDA tensors (the loop-on-device path); returns views of the engine's buffers,
        valid until the next call."""
        torch = self._torch
        for tensor in self.spec.inputs:
            value = inputs[tensor.name]
            view = self._buffer(tensor.name, tuple(value.shape))
            view.copy_(value, non_blocking=True)
            self.context.set_input_shape(tensor.name, tuple(value.shape))
            self.context.set_tensor_address(tensor.name, view.data_ptr())
        outputs = {}
        for tensor in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(tensor.name))
            view = self._buffer(tensor.name, shape)
            self.context.set_tensor_address(tensor.name, view.data_ptr())
            outputs[tensor.name] = view
        self.stream.wait_stream(torch.cuda.current_stream())  # the input copies above come first
        with torch.cuda.stream(self.stream):
            if self.cuda_graph and self._graph is not None:
                self._graph.replay()
            elif self.cuda_graph:
                self._execute()  # first call outside capture (TensorRT allocates lazily)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
                self._graph = graph
            else:
                self._execute()
        self.stream.synchronize()
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = {k: self._torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in inputs.items()}
        return {k: v.cpu().numpy() for k, v in self.run_device(device).items()}

    def close(self) -> None:
        self._graph = None
        self._buffers.clear()
        self.context = None
        self.engine = None
