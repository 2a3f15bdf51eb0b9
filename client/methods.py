"""Which served models each method calls, so a deployment can load only what its methods need."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ti2i.client.registry import CONTROLLED_UNETS, CONTROLNET_PREFIX, METHODS
from ti2i.engines.ensembles import ENSEMBLES
from ti2i.errors import InvalidInputError
from ti2i.manifest import Manifest

# read from the method records (client/registry.py): one declaration per method
METHOD_MODELS: dict[str, tuple[str, ...]] = {name: method.models for name, method in METHODS.items()}


def components_for(methods: Iterable[str], available: Iterable[str] = ()) -> list[str]:
    """The components (ensembles expanded into their steps) the given methods call; of `available` (an engine
    directory's), also the ControlNets and the UNet taking their residuals that a method's control image uses."""
    chains = {e.name: e.steps for e in ENSEMBLES}
    available = list(available)
    names: list[str] = []
    for method in methods:
        if method not in METHOD_MODELS:
            raise InvalidInputError(f"unknown method {method!r} (known: {', '.join(METHOD_MODELS)})")
        models = list(METHOD_MODELS[method])
        if "control_image" in METHODS[method].optional_images:
            models += [n for n in available if n.startswith(CONTROLNET_PREFIX)
                       or n == CONTROLLED_UNETS.get(METHODS[method].unet)]
        for model in models:
            for component in chains.get(model, (model,)):
                if component not in names:
                    names.append(component)
    return names


def components_by_family(methods: Iterable[str], manifests: Mapping[str, Manifest]) -> dict[str, list[str]]:
    """Per family, the components of the methods it can serve; every method must be served by one family."""
    methods = [m.strip() for m in methods if m.strip()]
    served: dict[str, list[str]] = {name: [] for name in manifests}
    for method in methods:
        needed = components_for([method])  # a ControlNet is optional: a family that has one serves it
        able = [name for name, manifest in manifests.items() if all(n in manifest.components for n in needed)]
        if not able:
            raise InvalidInputError(f"no engine directory ({', '.join(manifests)}) has every component {method} "
                                    f"needs ({needed})")
        for name in able:
            wanted = components_for([method], manifests[name].components)
            served[name] += [n for n in wanted if n not in served[name]]
    return served
