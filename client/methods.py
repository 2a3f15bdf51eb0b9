"""Which served models each method calls, so a deployment can load only what its methods need."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ti2i.client.registry import METHODS
from ti2i.engines.ensembles import ENSEMBLES
from ti2i.errors import InvalidInputError
from ti2i.manifest import Manifest

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


def components_by_family(methods: Iterable[str], manifests: Mapping[str, Manifest]) -> dict[str, list[str]]:
    """Per family, the components of the methods it can serve; every method must be served by one family."""
    methods = [m.strip() for m in methods if m.strip()]
    served: dict[str, list[str]] = {name: [] for name in manifests}
    for method in methods:
        needed = components_for([method])
        able = [name for name, manifest in manifests.items() if all(n in manifest.components for n in needed)]
        if not able:
            raise InvalidInputError(f"no engine directory ({', '.join(manifests)}) has every component {method} "
                                    f"needs ({needed})")
        for name in able:
            served[name] += [n for n in needed if n not in served[name]]
    return served
