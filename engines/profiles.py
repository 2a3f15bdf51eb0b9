"""Shape profiles of compiled engines, derived from the declaration in one place.

A TensorRT plan (and a statically compiled engine) needs, per input, the smallest, the usual and
the largest shape it will see. They come from the spec: each symbolic dim's declared range gives
min and max, its `opt` size (the model's default resolution, the CFG batch) the optimum. A build
may cap a dim below its declared maximum (`limits`): a plan's device memory grows with its max.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ti2i.errors import InvalidInputError
from ti2i.spec import ComponentSpec

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def dim_ranges(spec: ComponentSpec, limits: Mapping[str, int] | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dim: the declared range, capped by `limits`, opt inside it."""
    out = {}
    for dim, (low, high) in spec.dims.items():
        cap = (limits or {}).get(dim)
        if cap is not None:
            if cap < low:
                raise InvalidInputError(f"{spec.name}: limit {dim}={cap} is below the declared minimum {low}")
            high = min(high, cap)
        opt = min(max(spec.opt.get(dim, low), low), high)
        out[dim] = (low, opt, high)
    return out


def profile(spec: ComponentSpec, limits: Mapping[str, int] | None = None) -> Profile:
    """Per input: its (min, opt, max) shapes."""
    ranges = dim_ranges(spec, limits)
    result: Profile = {}
    for tensor in spec.inputs:
        shapes = [tuple(d if isinstance(d, int) else ranges[d][i] for d in tensor.shape) for i in range(3)]
        result[tensor.name] = (shapes[0], shapes[1], shapes[2])
    return result


def is_static(prof: Profile) -> bool:
    """Whether every input has one shape (then CUDA graphs can replay the engine)."""
    return all(low == high for low, _, high in prof.values())


def max_batch(spec: ComponentSpec, prof: Profile) -> int:
    """The largest batch the profile admits: Triton's max_batch_size must not exceed it (0: unbatched)."""
    if not spec.batched:
        return 0
    return min(shapes[2][0] for shapes in prof.values())


def to_json(prof: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in shapes] for name, shapes in sorted(prof.items())}


def from_json(data: Mapping[str, list[list[int]]]) -> Profile:
    return {name: (tuple(s[0]), tuple(s[1]), tuple(s[2])) for name, s in data.items()}


def canonical(prof: Profile) -> str:
    return json.dumps(to_json(prof), sort_keys=True, separators=(",", ":"))


def parse_limits(text: str | None) -> dict[str, int]:
    """``"batch=4,height=128"`` -> {"batch": 4, "height": 128} (the CLI's --limit)."""
    limits: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise InvalidInputError(f"limit {item!r} must look like DIM=SIZE (e.g. batch=4)")
        limits[name.strip()] = int(value)
    return limits
