"""The server-side runner: a method running inside Triton calls the component models by BLS.

Each `run` is one `pb_utils.InferenceRequest(...).exec()` to the named component or ensemble, so the
calls of all active method requests meet in the components' dynamic batchers exactly as client calls
do (a UNet call of one request merges with those of the others). Tensors follow the same wire
convention as `TritonRunner`: a per-sample scalar of a batched model travels as [B, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ti2i.engines.ensembles import available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError
from ti2i.families import served_name
from ti2i.manifest import Manifest
from ti2i.runner import Runner
from ti2i.spec import ComponentSpec


class BLSRunner(Runner):
    """Runs models of the same Triton server from inside a python-backend model."""

    def __init__(self, manifest: Manifest, pb_utils: Any, family: str | None = None):
        self.pb = pb_utils
        self.pipeline = manifest.pipeline
        self.family = family  # the family's models are served as <family>.<model> (ti2i.families)
        specs = {name: entry.spec.interface() for name, entry in manifest.components.items()}  # float32 wire
        self.specs: dict[str, ComponentSpec] = {**specs, **{e.name: e.spec(specs) for e in available_ensembles(specs)}}
        self.last_sample: np.ndarray | None = None  # the latest UNet input, for previews

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        spec = self.specs.get(model)
        if spec is None:
            raise ModelNotFoundError(f"the server has no model {model!r}")
        tensors = []
        for name, value in inputs.items():
            value = np.ascontiguousarray(value)
            if spec.batched and value.ndim == 1 and spec.input(name).rank == 1:
                value = value.reshape(-1, 1)  # a per-sample scalar travels as [B, 1]
            tensors.append(self.pb.Tensor(name, value))
        if "sample" in inputs:
            self.last_sample = np.asarray(inputs["sample"])
        wanted = list(outputs or [t.name for t in spec.outputs])
        response = self.pb.InferenceRequest(model_name=served_name(self.family, model), inputs=tensors,
                                            requested_output_names=wanted).exec()
        if response.has_error():
            raise _translate(response.error(), model)
        result = {}
        for name in wanted:
            value = np.array(self.pb.get_output_tensor_by_name(response, name).as_numpy(), copy=True)
            if spec.batched and value.ndim == 2 and value.shape[1] == 1 and spec.output(name).rank == 1:
                value = value.reshape(-1)
            result[name] = value
        return result


def _translate(error: Any, model: str) -> Exception:
    message = error.message()
    code = error.code() if hasattr(error, "code") else None
    if code == getattr(error, "INVALID_ARG", object()) or "InvalidInputError" in message:
        return InvalidInputError(f"{model}: {message}")
    return ServerUnavailableError(f"{model}: {message}")
