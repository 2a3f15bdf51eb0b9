"""Order statistics of repeated measurements (seconds in, the same unit out)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, median, p90, p99, mean, min, max (percentiles interpolate linearly between order statistics)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return {"n": 0}
    return {
        "n": int(data.size),
        "median": float(np.median(data)),
        "p90": float(np.percentile(data, 90)),
        "p99": float(np.percentile(data, 99)),
        "mean": float(data.mean()),
        "min": float(data.min()),
        "max": float(data.max()),
    }


def median(values: Sequence[float]) -> float | None:
    data = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(data)) if data else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def interleaved_medians(runs: dict[str, Callable[[], Any]], calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each run: one warm-up call each, then `rounds` rounds in which every run
    makes `calls` calls in turn (side by side, so load that comes and goes hits each alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(t)) for name, t in times.items()}
