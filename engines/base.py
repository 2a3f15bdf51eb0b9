"""The engine interface: one component, named arrays in, named arrays out.

Nothing above an engine knows which backend it got. Backends validate inputs against the
component's spec before running, so every caller gets the same clear error for a bad tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from ti2i.spec import ComponentSpec, as_float32


class Engine(ABC):
    """Runs one component. Subclasses implement `_run`; `run` validates first."""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Callers exchange float32 whatever the graph holds: float16 graphs are cast at this boundary."""
        inputs = self.spec.cast_inputs(inputs)
        self.spec.validate_inputs(inputs)
        return as_float32(self._run(inputs))

    @abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated inputs; return every output of the spec by name."""

    def close(self) -> None:
        """Release backend resources (sessions, device buffers)."""
