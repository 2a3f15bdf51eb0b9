"""The engine interface: one component, named arrays in, named arrays out.

Nothing above an engine knows which backend it got. Backends validate inputs against the
component's spec before running, so every caller gets the same clear error for a bad tensor; a request
whose estimated memory exceeds the engine's budget is refused before it runs, and non-finite outputs
are refused after (an error naming the component, never a NaN image).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from ti2i.budget import MemoryModel, check_budget
from ti2i.engines.adapters import with_defaults
from ti2i.spec import ComponentSpec, as_float32


class Engine(ABC):
    """Runs one component. Subclasses implement `_run`; `run` validates first."""

    # What a request costs and what this engine may spend (the loader sets both; None: unchecked).
    memory: MemoryModel | None = None
    budget: int | None = None
    # Whether calls from several threads may run at once (an ONNX Runtime session may); the others take turns,
    # e.g. a fast tokenizer, which one thread's call can find "already borrowed" by another's.
    concurrent_calls = False

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self._turns = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self, inputs: Mapping[str, np.ndarray], spec: ComponentSpec | None = None) -> dict[str, int]:
        """Validate inputs against the spec (or `spec`, e.g. the float32 interface of an fp16 graph) and the
        memory budget; return the bound symbolic dims."""
        bound = (spec or self.spec).validate_inputs(inputs)
        if self.memory is not None and self.budget is not None:
            check_budget(self.name, self.memory, bound, self.budget)
        return bound

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Callers exchange float32 whatever the graph holds: float16 graphs are cast at this boundary. Adapter
        inputs left out mean no adapter (`engines/adapters.py`)."""
        inputs = self.spec.cast_inputs(with_defaults(self.spec, inputs))
        self.check(inputs)
        if self.concurrent_calls:
            outputs = self._run(inputs)
        else:
            with self._turns:
                outputs = self._run(inputs)
        self.spec.validate_outputs(outputs)
        return as_float32(outputs)

    @abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated inputs; return every output of the spec by name."""

    def close(self) -> None:
        """Release backend resources (sessions, device buffers)."""
