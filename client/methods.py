"""Which served models each method calls, so a deployment can load only what its methods need."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from ti2i.client.registry import CONTROLLED_UNETS, CONTROLNET_PREFIX, METHODS, REFINER
from ti2i.engines.ensembles import ENSEMBLES, chain_steps
from ti2i.errors import InvalidInputError
from ti2i.manifest import Manifest

# read from the method records (client/registry.py): one declaration per method
METHOD_MODELS: dict[str, tuple[str, ...]] = {name: method.models for name, method in METHODS.items()}


def components_for(methods: Iterable[str], available: Iterable[str] = ()) -> list[str]:
    """The components (ensembles expanded into their steps) the given methods call; of `available` (an engine
    directory's), also the ControlNets and the UNet taking their residuals that a method's control image uses."""
    available = list(available)
    chains = {e.name: chain_steps(e.name, available) for e in ENSEMBLES}
    names: list[str] = []
    for method in methods:
        if method not in METHOD_MODELS:
            raise InvalidInputError(f"unknown method {method!r} (known: {', '.join(METHOD_MODELS)})")
        models = list(METHOD_MODELS[method])
        if "control_image" in METHODS[method].optional_images:
            models += [n for n in available if n.startswith(CONTROLNET_PREFIX)
                       or n == CONTROLLED_UNETS.get(METHODS[method].unet)]
        if any(p.name == "refine" for p in METHODS[method].params) and REFINER in available:
            models.append(REFINER)
        for model in models:
            for component in chains.get(model, (model,)):
                if component not in names:
                    names.append(component)
    return names


SDXL_MARK = "tokenize_2"  # only SDXL engine directories tokenize twice (two text encoders)


def runs_on(method: str, components: Collection[str]) -> bool:
    """Whether an engine directory (or family) with `components` serves `method`: it has every model the method
    calls, and an SDXL one only the methods written for SDXL's UNet."""
    have = set(components)
    return set(components_for([method], have)) <= have and (METHODS[method].sdxl or SDXL_MARK not in have)


def components_by_family(methods: Iterable[str], manifests: Mapping[str, Manifest]) -> dict[str, list[str]]:
    """Per family, the components of the methods it can serve; every method must be served by one family."""
    methods = [m.strip() for m in methods if m.strip()]
    served: dict[str, list[str]] = {name: [] for name in manifests}
    for method in methods:
        able = [name for name, manifest in manifests.items() if runs_on(method, manifest.components)]
        if not able:  # a ControlNet is optional: a family that has one serves it
            raise InvalidInputError(f"no engine directory ({', '.join(manifests)}) serves {method} (it needs "
                                    f"{components_for([method])})")
        for name in able:
            wanted = components_for([method], manifests[name].components)
            served[name] += [n for n in wanted if n not in served[name]]
    return served
