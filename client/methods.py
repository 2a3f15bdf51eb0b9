"""Which served models each method calls, so a deployment can load only what its methods need."""

from __future__ import annotations

from collections.abc import Iterable

from ti2i.client.registry import METHODS
from ti2i.engines.ensembles import ENSEMBLES
from ti2i.errors import InvalidInputError

# read from the method records (client/registry.py): one declaration per method
METHOD_MODELS: dict[str, tuple[str, ...]] = {name: method.models for name, method in METHODS.items()}


def components_for(methods: Iterable[str]) -> list[str]:
    """The components (ensembles expanded into their steps) the given methods call."""
    chains = {e.name: e.steps for e in ENSEMBLES}
    names: list[str] = []
    for method in methods:
        if method not in METHOD_MODELS:
            raise InvalidInputError(f"unknown method {method!r} (known: {', '.join(METHOD_MODELS)})")
        for model in METHOD_MODELS[method]:
            for component in chains.get(model, (model,)):
                if component not in names:
                    names.append(component)
    return names
