"""Merging requests along the batch dimension: shared by the served component models and the step scheduler.

Requests whose inputs agree in everything but the batch dimension run as one engine call, in chunks
that fit the engine's memory budget, and the outputs are split back in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ti2i.budget import chunk_sizes
from ti2i.engines.base import Engine


def merge_requests(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def split_outputs(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum(sizes)[:-1]
    parts = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]


def shape_key(inputs: Mapping[str, np.ndarray]) -> tuple:
    """Requests batch together when everything but the batch dimension agrees."""
    return tuple(sorted((name, np.shape(value)[1:], np.asarray(value).dtype.str) for name, value in inputs.items()))


def batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(inputs.values())))


def budget_chunks(engine: Engine | None, bound: Mapping[str, int], sizes: Sequence[int]) -> list[int]:
    """How many consecutive requests (of `sizes` items, the same other dims) each merged call takes so that
    it fits the engine's memory budget; one call for all of them where the engine has no memory model."""
    if len(sizes) <= 1 or engine is None or engine.memory is None or engine.budget is None:
        return [len(sizes)] if sizes else []
    return chunk_sizes(engine.memory, bound, sizes, engine.budget)
