"""Per-stage wall-clock timings of one generation, for the CLI's report and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.samples[name].append(time.perf_counter() - start)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: calls, total and median seconds."""
        return {name: {"calls": len(v), "total_s": sum(v), "median_s": statistics.median(v)}
                for name, v in self.samples.items()}

    def report(self) -> str:
        lines = [f"{'stage':<16} {'calls':>5} {'total ms':>10} {'median ms':>10}"]
        for name, s in self.summary().items():
            lines.append(f"{name:<16} {s['calls']:>5} {s['total_s'] * 1e3:>10.1f} {s['median_s'] * 1e3:>10.1f}")
        return "\n".join(lines)
