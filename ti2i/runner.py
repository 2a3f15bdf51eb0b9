"""The runner interface: run a model (a component or an ensemble) by name, named numpy arrays in and out.

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
