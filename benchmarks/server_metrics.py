"""Reading a Triton server's metrics endpoint (Prometheus text): one sample per name and label set."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, frozenset[tuple[str, str]]]  # (metric name, its labels)


def read_metrics(metrics_url: str, names: Iterable[str] | None = None) -> dict[Sample, float]:
    """The samples of `names` (every sample when None) that the endpoint serves now."""
    wanted = set(names) if names is not None else None
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    samples: dict[Sample, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if wanted is None or name in wanted:
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def by_label(samples: dict[Sample, float], name: str, label: str, **match: str) -> dict[str, float]:
    """The samples of `name` whose labels include `match`, keyed by their value of `label`."""
    out: dict[str, float] = {}
    for (sample_name, labels), value in samples.items():
        found = dict(labels)
        if sample_name == name and label in found and all(found.get(k) == v for k, v in match.items()):
            out[found[label]] = out.get(found[label], 0.0) + value
    return out
