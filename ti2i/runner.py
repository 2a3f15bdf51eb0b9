"""The runner interface: run a model (a component or an ensemble) by name.

Two ways in: `run`, named numpy arrays in and out (what travels over the wire), and `run_tensors`, named
torch tensors in and out on the runner's `device`, which the methods' loops call so that a runner whose
engines live on a GPU keeps the whole loop there. By default `run_tensors` goes through `run` (the
tensors' values exactly as numpy arrays, the results as CPU tensors), so a runner that only speaks numpy
(Triton clients, the server-side BLS runner, ONNX Runtime engines on the CPU) gives bit-identical
results either way; `run_to_host` is the same call for a method's final outputs, numpy on the host.

It sits below both the client (in-process and Triton-client runners, the methods) and the Triton
models (the server-side runner that lets a method run inside the server), so neither imports the other
to share it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np


class Runner(ABC):
    pipeline: dict[str, Any]

    @abstractmethod
    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run `model` on named inputs; return the named outputs (all of them unless `outputs` says)."""

    @property
    def device(self) -> Any:
        """The torch device `run_tensors` returns its tensors on (and where a loop keeps its state): the CPU
        unless the runner's engines live on a device."""
        import torch

        return torch.device("cpu")

    def run_tensors(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        """`run` on torch tensors (numpy arrays, e.g. text, pass as they are); the outputs as torch tensors
        on `device`. This default goes through `run`: exactly the values `run` would see and give."""
        out = self.run(model, outputs, **{k: to_numpy(v) for k, v in inputs.items()})
        device = self.device
        return {k: to_torch(v, device) for k, v in out.items()}

    def run_to_host(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, np.ndarray]:
        """`run` on torch tensors (on any device) for outputs wanted on the host as numpy: a method's final
        results (the decoded images), brought back once."""
        return self.run(model, outputs, **{k: to_numpy(v) for k, v in inputs.items()})

    def for_method(self, method: str) -> Runner:
        """The runner a method's loop calls: the one bound to the model family that serves `method`. A runner
        that reaches one family (the server-side runner, a plain engine directory) is that runner itself."""
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor as a contiguous numpy array on the host (a view where it is a contiguous CPU tensor);
    anything else as numpy."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().contiguous().cpu().numpy()
    return np.asarray(value)


def to_torch(value: np.ndarray, device: Any = None) -> Any:
    """A numpy result as a torch tensor on `device` (a view on the CPU, copied only when read-only, as
    tritonclient's results are); strings stay numpy."""
    import torch

    if value.dtype.kind in "OSU":
        return value
    tensor = torch.from_numpy(np.require(value, requirements="W"))
    return tensor if device is None else tensor.to(device)
