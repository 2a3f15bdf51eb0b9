"""Merging requests along the batch dimension: shared by the served component models and the step scheduler.

Requests whose inputs agree in everything but the batch dimension run as one engine call, in chunks
that fit the engine's memory budget, and the outputs are split back in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ti2i.budget import chunk_sizes
from ti2i.engines.adapters import RANK_AXES, pad_rank
from ti2i.engines.base import Engine


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def merge_requests(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """numpy arrays by `np.concatenate`; torch tensors (on a device) by `torch.cat`, where they are. Adapter
    inputs of different ranks are zero-padded to the largest first (exact: a zero rank adds nothing)."""
    merged = {}
    for name, first in batches[0].items():
        parts = [b[name] for b in batches]
        if name in RANK_AXES:
            rank = max(p.shape[RANK_AXES[name]] for p in parts)
            parts = [pad_rank(p, name, rank) for p in parts]
        if _is_torch(first):
            import torch

            merged[name] = torch.cat(parts)
        else:
            merged[name] = np.concatenate(parts)
    return merged


def split_outputs(outputs: Mapping[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    parts = {}
    for name, value in outputs.items():
        if _is_torch(value):
            parts[name] = value.split(list(sizes))
        else:
            parts[name] = np.split(value, np.cumsum(sizes)[:-1])
    return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]


def shape_key(inputs: Mapping[str, Any]) -> tuple:
    """Requests batch together when everything but the batch dimension (and an adapter's rank) agrees."""
    def key(name: str, value: Any) -> tuple:
        shape = list(value.shape[1:] if _is_torch(value) else np.shape(value)[1:])
        if name in RANK_AXES:
            del shape[RANK_AXES[name] - 1]
        return name, tuple(shape), str(value.dtype) if _is_torch(value) else np.asarray(value).dtype.str

    return tuple(sorted(key(name, value) for name, value in inputs.items()))


def batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(inputs.values())))


def budget_chunks(engine: Engine | None, bound: Mapping[str, int], sizes: Sequence[int]) -> list[int]:
    """How many consecutive requests (of `sizes` items, the same other dims) each merged call takes so that
    it fits the engine's memory budget; one call for all of them where the engine has no memory model."""
    if len(sizes) <= 1 or engine is None or engine.memory is None or engine.budget is None:
        return [len(sizes)] if sizes else []
    return chunk_sizes(engine.memory, bound, sizes, engine.budget)
