"""Fixed chains of models, run server-side as Triton ensembles and in-process as plain calls.

A chain connects tensors by name: each step's inputs come from the chain's inputs or from an
earlier step's outputs with the same name. The same declaration renders the Triton ensemble
config and drives the in-process runner, so both run exactly the same steps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ti2i.spec import ComponentSpec

@dataclass(frozen=True)
class Ensemble:
    name: str
    steps: tuple[str, ...]
    outputs: tuple[str, ...]

    def available(self, models: Mapping[str, ComponentSpec] | Collection[str]) -> bool:
        return all(step in models for step in self.steps)

    def spec(self, models: Mapping[str, ComponentSpec]) -> ComponentSpec:
        """The chain's own interface: unproduced step inputs in, the listed outputs out."""
        produced: dict[str, object] = {}
        inputs = []
        dims: dict[str, tuple[int, int]] = {}
        for step in self.steps:
            spec = models[step]
            for tensor in spec.inputs:
                if tensor.name not in produced and tensor.name not in {t.name for t in inputs}:
                    inputs.append(tensor)
            for tensor in spec.outputs:
                produced[tensor.name] = tensor
            for dim, (low, high) in spec.dims.items():
                old = dims.get(dim, (low, high))
                dims[dim] = (max(old[0], low), min(old[1], high))
        outputs = tuple(produced[name] for name in self.outputs)
        batched = all(models[s].batched for s in self.steps)
        return ComponentSpec(self.name, tuple(inputs), outputs, dims, batched)

    def wiring(self, models: Mapping[str, ComponentSpec]) -> list[tuple[str, list[str], list[str]]]:
        """(model, its input names, its output names) per step, in order."""
        return [(s, [t.name for t in models[s].inputs], [t.name for t in models[s].outputs]) for s in self.steps]

# A name may have several declarations: an engine directory runs the first whose steps it has (SDXL tokenizes
# twice for its two text encoders, and its prompt encoding also gives the pooled text `text_embeds`).
ENSEMBLES: tuple[Ensemble, ...] = (
    Ensemble("encode_prompt", ("tokenize", "tokenize_2", "text_encoder"), ("text_embeddings", "text_embeds")),
    Ensemble("encode_prompt", ("tokenize", "text_encoder"), ("text_embeddings",)),
    Ensemble("encode_image", ("image_preprocess", "vae_encoder"), ("latent_mean", "latent_logvar")),
    Ensemble("decode_image", ("vae_decoder", "image_postprocess"), ("image", "image_float")),
)


def available_ensembles(models: Mapping[str, ComponentSpec] | Collection[str]) -> list[Ensemble]:
    """The ensembles an engine directory with `models` runs: one per name, its first declaration it has."""
    chosen: dict[str, Ensemble] = {}
    for ensemble in ENSEMBLES:
        if ensemble.name not in chosen and ensemble.available(models):
            chosen[ensemble.name] = ensemble
    return list(chosen.values())


def chain_steps(name: str, models: Collection[str] = ()) -> tuple[str, ...]:
    """The steps of ensemble `name` as an engine directory with `models` runs them (without: its plain
    declaration, the last)."""
    declared = [e for e in ENSEMBLES if e.name == name]
    return next((e.steps for e in declared if e.available(models)), declared[-1].steps)
