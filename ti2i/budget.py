"""Memory a component needs for a request, and the budget a serving machine allows it.

Every request inside a component's declared ranges must run within the memory its model instance may
use: a VAE decoder latent of [1, 4, 256, 256] (inside the ranges) grew one process to 23.9 GB before
the kernel killed it, and the UNet at 256×256 tried to allocate 128 GiB for one attention matrix.
Attention makes memory grow with the *square* of the pixel count, so a limit linear in pixels × batch
would be wrong by orders of magnitude.

A `MemoryModel` holds what `ti2i export` measured for one engine (peak RSS in a fresh process at a
ladder of sizes, see `ti2i.engines.calibrate`): the engine's resident size once loaded (`base`) and the
peak growth per batch item as linear·T + quadratic·T² in the token count T (latent or pixel
height × width; convolutions grow linearly, attention quadratically), fitted to the measurements;
frames scale with a measured power between 1 (per-frame layers) and 2 (temporal attention). It is
stored in the manifest beside the spec, so the serving machine only chooses a budget.

The budget (`TI2I_MEMORY_BUDGET`, e.g. ``8G``; by default `SAFE_SHARE` of the memory available at
start) is split evenly among the model instances that share the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ti2i.errors import InvalidInputError, OverBudgetError

BUDGET_ENV = "TI2I_MEMORY_BUDGET"
# Share of MemAvailable the server's model instances may use together by default: the rest is headroom for
# the server itself, its clients and other work on the machine.
SAFE_SHARE = 0.6
# Estimates are the measured peaks times this: the ONNX Runtime arena grows in chunks, so a size between two
# measured ones may peak above the interpolated figure.
MARGIN = 1.25
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(text: str) -> int:
    """``8G``, ``512M``, ``1.5GiB``, ``2000000000`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise InvalidInputError(f"memory size {text!r}: expected a number with an optional unit (K, M, G, T)")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise InvalidInputError(f"memory size {text!r} must be positive")
    return int(value)


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def loadable_memory() -> int:
    """Bytes one more copy of an engine's weights may take now: what the machine has available, capped by
    TI2I_MEMORY_BUDGET when that is set (the whole server's budget)."""
    value = os.environ.get(BUDGET_ENV)
    return min(available_memory(), parse_bytes(value)) if value else available_memory()


LOAD_LOCK = Path(tempfile.gettempdir()) / f"ti2i-engine-load-{os.getuid()}.lock"


@contextlib.contextmanager
def loading_one_at_a_time(path: Path = LOAD_LOCK) -> Iterator[None]:
    """Hold the machine's engine-loading lock: processes that check `loadable_memory` and then load (hosted
    method models, several per server, or several processes of one) would otherwise all see the memory
    none of them has taken yet, and together load more copies than the machine holds."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def machine_budget() -> int:
    """Bytes every model instance of this process's server (or this in-process runner) may use together."""
    value = os.environ.get(BUDGET_ENV)
    if value:
        return parse_bytes(value)
    return int(SAFE_SHARE * available_memory())


@dataclass(frozen=True)
class MemoryModel:
    """Measured peak memory of one engine as a function of a request's bound dims.

    Peak growth per item = `linear`·tokens + `quadratic`·tokens², fitted to the measured `points`
    ((tokens, growth per item) pairs, kept for the record). Items are the product of `item_dims` (the
    batch), tokens the product of `token_dims` (1 when there are none).
    """

    base: int
    linear: float
    quadratic: float
    token_dims: tuple[str, ...] = ()
    item_dims: tuple[str, ...] = ()
    frames_dim: str | None = None
    frames_ref: int = 1  # frames the points were measured at
    frames_power: float = 1.0
    points: tuple[tuple[float, float], ...] = ()

    def per_item(self, tokens: float) -> float:
        return self.linear * tokens + self.quadratic * tokens * tokens

    def growth(self, bound: Mapping[str, int]) -> float:
        """Estimated bytes above `base` while one request (or merged batch) of these dims runs, margin included."""
        items = math.prod(bound.get(d, 1) for d in self.item_dims)
        tokens = math.prod(bound.get(d, 1) for d in self.token_dims)
        growth = items * self.per_item(tokens)
        if self.frames_dim is not None:
            frames = bound.get(self.frames_dim, self.frames_ref)
            ratio = frames / self.frames_ref
            growth *= ratio ** self.frames_power if ratio > 1 else ratio
        return MARGIN * growth

    def estimate(self, bound: Mapping[str, int]) -> int:
        """Peak resident bytes of an instance running one request (or merged batch) of these dims."""
        return int(self.base + self.growth(bound))

    def affordable_items(self, bound: Mapping[str, int], budget: int) -> int:
        """How many items of these other dims fit in `budget` (0 if not even one does)."""
        one = self.growth({**bound, **{d: 1 for d in self.item_dims}})
        if not self.item_dims:
            return 1 if self.base + one <= budget else 0
        return max(0, math.floor((budget - self.base) / max(one, 1.0)))

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "linear": self.linear, "quadratic": self.quadratic,
                "token_dims": list(self.token_dims), "item_dims": list(self.item_dims), "frames_dim": self.frames_dim,
                "frames_ref": self.frames_ref, "frames_power": self.frames_power,
                "points": [list(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MemoryModel:
        return cls(int(data["base"]), float(data["linear"]), float(data["quadratic"]),
                   tuple(data.get("token_dims", ())), tuple(data.get("item_dims", ())), data.get("frames_dim"),
                   int(data.get("frames_ref", 1)), float(data.get("frames_power", 1.0)),
                   tuple((float(x), float(y)) for x, y in data.get("points", ())))


def io_memory(spec: Any, token_dims: tuple[str, ...], item_dims: tuple[str, ...], copies: int = 3) -> MemoryModel:
    """A numpy step's memory from its tensors' sizes: inputs and outputs and `copies` temporaries of each.

    Pre/post-processing steps allocate exactly their arrays (no arenas, no attention): counted, not measured.
    """
    import numpy as np

    per_token = 0
    for tensor in (*spec.inputs, *spec.outputs):
        itemsize = 8 if tensor.dtype == "object" else np.dtype(tensor.dtype).itemsize
        per_token += itemsize * math.prod(d for d in tensor.shape if isinstance(d, int))
    return MemoryModel(base=0, linear=float(copies * per_token), quadratic=0.0, token_dims=token_dims,
                       item_dims=item_dims)


def fit_growth(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(linear, quadratic) ≥ 0 of growth = l·T + q·T², least squares in relative error, then raised so that
    the curve lies on or above every measured point (the estimate must not undercut what was seen)."""
    import numpy as np

    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.maximum(np.array([p[1] for p in points], dtype=np.float64), 1.0)
    basis = np.stack([xs, xs * xs], axis=1) / ys[:, None]  # rows scaled: relative error
    coef = np.linalg.lstsq(basis, np.ones_like(ys), rcond=None)[0]
    if coef.min() < 0:  # one term alone, whichever fits better
        fits = []
        for k in range(2):
            c = np.zeros(2)
            col = basis[:, k]
            c[k] = max(float(col @ np.ones_like(ys) / (col @ col)), 0.0)
            fits.append((float(np.sum((basis @ c - 1) ** 2)), c))
        coef = min(fits, key=lambda f: f[0])[1]
    curve = coef[0] * xs + coef[1] * xs * xs
    scale = float(np.max(ys / np.maximum(curve, 1e-9)))
    coef = coef * max(scale, 1.0)
    return float(coef[0]), float(coef[1])


def check_budget(component: str, model: MemoryModel, bound: Mapping[str, int], budget: int) -> None:
    """Raise `OverBudgetError` (INVALID_ARG when served) when the request's estimate exceeds `budget`, naming
    the smaller requests that would fit before the budget that would."""
    cost = model.estimate(bound)
    if cost <= budget:
        return
    dims = ", ".join(f"{k}={v}" for k, v in sorted(bound.items()))
    smaller = _smaller_requests(model, bound, budget)
    hint = f"make it smaller ({', or '.join(smaller)}), or " if smaller else ""
    raise OverBudgetError(f"{component}: a request of {dims} needs about {format_bytes(cost)}, over the memory "
                          f"budget of {format_bytes(budget)} per {component} instance: {hint}raise the budget "
                          f"(--memory-budget or {BUDGET_ENV})")


def _smaller_requests(model: MemoryModel, bound: Mapping[str, int], budget: int) -> list[str]:
    """What would fit, each change alone: fewer items, a smaller height and width, fewer frames."""
    fits = []
    items = model.affordable_items(bound, budget)
    if items and model.item_dims and items < math.prod(bound.get(d, 1) for d in model.item_dims):
        fits.append(f"a batch of at most {items}")
    if model.token_dims and all(bound.get(d, 1) > 1 for d in model.token_dims):
        def shrunk(scale: float) -> dict[str, int]:
            return {**bound, **{d: max(1, int(bound[d] * scale)) for d in model.token_dims}}

        low, high = 0.0, 1.0  # the largest scale of height and width (same aspect) that fits
        for _ in range(20):
            middle = (low + high) / 2
            low, high = (middle, high) if model.estimate(shrunk(middle)) <= budget else (low, middle)
        if low >= 0.05:
            fits.append(f"height and width × {math.floor(low * 100) / 100:.2f} or less")
    frames_dim = model.frames_dim
    if frames_dim is not None and bound.get(frames_dim, 1) > 1:
        frames = next((f for f in range(bound[frames_dim] - 1, 0, -1)
                       if model.estimate({**bound, frames_dim: f}) <= budget), 0)
        if frames:
            fits.append(f"at most {frames} frame{'s' if frames > 1 else ''}")
    return fits


def chunk_sizes(model: MemoryModel, bound: Mapping[str, int], sizes: Sequence[int], budget: int) -> list[int]:
    """Split consecutive requests of `sizes` items (same other dims) into groups that each fit `budget`."""
    per_chunk = max(1, model.affordable_items(bound, budget)) if model.item_dims else 1
    groups: list[int] = []
    total = 0
    for size in sizes:
        if groups and total + size <= per_chunk:
            groups[-1] += 1
            total += size
        else:
            groups.append(1)
            total = size
    return groups
