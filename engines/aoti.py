"""AOTInductor backend: a `torch._inductor` package (compiled ahead of time) behind the `Engine` interface.

The package holds the component compiled by Inductor for one device (CPU here, CUDA on a GPU) in
the graph's precision, with the declared dynamic dims where `torch.export` could keep them, else at
the component's opt shapes (then only those shapes are accepted, with a clear error otherwise).
It needs only torch: the compiled engine a GPU machine without TensorRT can still measure.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines import profiles
from ti2i.engines.base import Engine
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.spec import ComponentSpec


LATENT_DIMS = ("height", "width")


class AotiEngine(Engine):
    def __init__(self, package: str | Path, spec: ComponentSpec, profile: profiles.Profile, dynamic: bool,
                 device: str = "cpu", multiple: int | None = None):
        super().__init__(spec)
        import torch

        path = Path(package)
        if not path.is_file():
            raise ModelNotFoundError(f"{spec.name}: AOTInductor package {path} does not exist (run `ti2i build`)")
        self._torch = torch
        self.device = device
        self.dynamic = dynamic
        self.static_shapes = None if dynamic else {name: shapes[1] for name, shapes in profile.items()}
        self.multiple = multiple if dynamic and multiple and multiple > 1 else None  # latent height/width
        self._runner = torch._inductor.aoti_load_package(str(path))

    def run_device(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on torch tensors already on the package's device; outputs stay there."""
        if self.static_shapes is not None:
            for name, shape in self.static_shapes.items():
                if tuple(inputs[name].shape) != shape:
                    raise InvalidInputError(f"{self.spec.name}.{name}: this AOTInductor package was compiled for "
                                            f"shape {list(shape)} only, got {list(inputs[name].shape)}")
        if self.multiple is not None:
            for tensor in self.spec.inputs:
                for axis, dim in enumerate(tensor.shape):
                    size = inputs[tensor.name].shape[axis]
                    if dim in LATENT_DIMS and size % self.multiple:
                        raise InvalidInputError(f"{self.spec.name}.{tensor.name}: this AOTInductor package takes "
                                                f"{dim} in multiples of {self.multiple}, got {size}")
        with self._torch.inference_mode():
            out = self._runner(*(inputs[t.name] for t in self.spec.inputs))
        out = out if isinstance(out, (list, tuple)) else (out,)
        return {t.name: value for t, value in zip(self.spec.outputs, out)}

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = {k: self._torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inputs.items()}
        return {k: v.detach().cpu().numpy() for k, v in self.run_device(device).items()}

    def close(self) -> None:
        self._runner = None
