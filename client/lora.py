"""A request's LoRA adapters: the runner its method's loop calls adds them to each text-encoder and UNet call.

The adapters travel as inputs of those calls (`engines/adapters.py`), never merged into the weights, so the
engine core batches requests with different adapters, scales or none into one UNet execution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ti2i.engines.adapters import ADAPTED_MODELS, Chosen, adapter_inputs
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner


def with_lora(runner: Runner, lora: Sequence[str]) -> Runner:
    """`runner` (bound to the method's family) with the adapters `lora` names (``NAME[:SCALE]`` each: a file
    in-process, a registered name on a server), checked and loaded before any work; itself without any."""
    if not lora:
        return runner
    registry = getattr(runner, "adapters", None)
    if registry is None:
        raise InvalidInputError("per-request LoRA adapters run in-process (--engines) or in the served methods "
                                "(--remote, the `lora` input), not over a server's component models")
    return LoraRunner(runner, registry.choose(lora))


class LoraRunner(Runner):
    """`base`, each text-encoder and UNet call with the request's adapters (built once per call shape and device:
    a loop's steps reuse them)."""

    def __init__(self, base: Runner, chosen: Chosen):
        self.base, self.chosen = base, chosen
        self.pipeline = base.pipeline
        self._built: dict[tuple[str, int, str], dict[str, Any]] = {}

    def _with_adapters(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        component = ADAPTED_MODELS.get(model)
        if component is None or not inputs:
            return dict(inputs)
        first = next(iter(inputs.values()))
        key = (component, len(first), str(getattr(first, "device", "host")))
        if key not in self._built:
            self._built[key] = adapter_inputs(self.chosen, component, len(first), first)
        return {**inputs, **self._built[key]}

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.base.run(model, outputs, **self._with_adapters(model, inputs))

    @property
    def device(self) -> Any:
        return self.base.device

    def run_tensors(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        return self.base.run_tensors(model, outputs, **self._with_adapters(model, inputs))

    def run_to_host(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        return self.base.run_to_host(model, outputs, **self._with_adapters(model, inputs))

    def __getattr__(self, name: str) -> Any:  # the base runner's other attributes
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)
