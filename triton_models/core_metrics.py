"""What a family's engine core reports on Triton's metrics endpoint (`/metrics`, Prometheus text).

Triton's own statistics see the entry-point models' requests, not the wait inside the core's queue nor
what its scheduler merged. So the core reports, labelled with its model name (``core``, ``sd.core``):

- ``ti2i_queue_wait_seconds`` (histogram, per ``method``): how long each request waited for a place, the
  wait requests really experience (what the autoscaler's rule reads);
- ``ti2i_queue_length`` and ``ti2i_active_requests`` (gauges): requests waiting, and running;
- ``ti2i_requests_total`` (counter, per ``method``): requests started;
- per ``component``: ``ti2i_executions_total`` (engine calls), ``ti2i_merged_calls_total`` (the requests'
  calls merged into them), ``ti2i_samples_total`` (their samples, per ``method``; ``component`` for a
  client's own component call) and ``ti2i_mixed_executions_total`` (engine calls holding samples of two or
  more methods: the batching across methods).

Each update is a message to the server that takes milliseconds, so the request path only counts, in the
process, and a reporter thread sends what changed every `period_s` (0.5 s): the metrics lag the requests
by at most that. An update that fails is logged and dropped: metrics never cost a request its answer.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

QUEUE_WAIT = "ti2i_queue_wait_seconds"
QUEUE_WAIT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
FAMILIES = {  # name: (kind, description)
    QUEUE_WAIT: ("HISTOGRAM", "seconds a method request waited in the engine core's queue for a place"),
    "ti2i_queue_length": ("GAUGE", "method requests waiting in the engine core's queue"),
    "ti2i_active_requests": ("GAUGE", "method requests whose loops the engine core runs now"),
    "ti2i_requests_total": ("COUNTER", "method requests the engine core started"),
    "ti2i_executions_total": ("COUNTER", "engine calls the engine core's scheduler ran"),
    "ti2i_merged_calls_total": ("COUNTER", "requests' component calls merged into those engine calls"),
    "ti2i_samples_total": ("COUNTER", "samples in those engine calls, by the method that sent them"),
    "ti2i_mixed_executions_total": ("COUNTER", "engine calls holding samples of two or more methods"),
}
CLIENT_TAG = "component"  # the method label of a client's own component call


class CoreMetrics:
    """`pb_utils`: the python backend's utilities (they send the metrics to the server); `admission`: the
    core's (`core.Admission`); `executions`: its scheduler's (model, samples by tag, calls, samples) -> engine calls."""

    def __init__(self, pb_utils: Any, model: str, period_s: float = 0.5):
        family = pb_utils.MetricFamily
        self._pb, self._model, self._period_s = pb_utils, model, period_s
        # a family must outlive its metrics (deleting it removes them): every family is kept here
        self._families = {name: family(name=name, description=text, kind=getattr(family, kind))
                          for name, (kind, text) in FAMILIES.items()}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._lock = threading.Lock()
        self._waits: list[tuple[str, float]] = []
        self._started: Counter[str] = Counter()
        self._sent: Counter[Any] = Counter()
        self._sources: tuple[Any, Any] | None = None
        self._closed = threading.Event()
        self._reporter = threading.Thread(target=self._report, daemon=True, name=f"{model}-metrics")

    def attach(self, admission: Any, executions: Counter) -> None:
        """Start reporting the core's admission and scheduler counts."""
        self._sources = (admission, executions)
        self._reporter.start()

    def started(self, method: str, waited_s: float) -> None:
        with self._lock:
            self._waits.append((method, waited_s))
            self._started[method] += 1

    def close(self) -> None:
        """Send what is left and stop the reporter."""
        self._closed.set()
        if self._reporter.is_alive():
            self._reporter.join(timeout=10)

    def _report(self) -> None:
        while True:
            closing = self._closed.wait(self._period_s)
            try:
                self._send()
            except Exception as err:  # the server went away, or refused a metric: the requests go on
                self._pb.Logger.log_warn(f"{self._model}: metrics update failed: {err}")
            if closing:
                return

    def _metric(self, name: str, **labels: str) -> Any:
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            extra = {"buckets": QUEUE_WAIT_BUCKETS} if FAMILIES[name][0] == "HISTOGRAM" else {}
            self._metrics[key] = self._families[name].Metric(labels={"model": self._model, **labels}, **extra)
        return self._metrics[key]

    def _increment(self, name: str, total: int, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        if total > self._sent[key]:
            self._metric(name, **labels).increment(total - self._sent[key])
            self._sent[key] = total

    def _send(self) -> None:
        assert self._sources is not None
        admission, executions = self._sources
        with self._lock:
            waits, self._waits = self._waits, []
            started = dict(self._started)
        for method, seconds in waits:
            self._metric(QUEUE_WAIT, method=method).observe(seconds)
        for method, total in started.items():
            self._increment("ti2i_requests_total", total, method=method)
        self._metric("ti2i_queue_length").set(admission.waiting)
        self._metric("ti2i_active_requests").set(admission.running)
        totals: Counter[tuple[str, str]] = Counter()
        samples: Counter[tuple[str, str]] = Counter()
        for (component, tags, calls, _), count in list(executions.items()):
            totals[("ti2i_executions_total", component)] += count
            totals[("ti2i_merged_calls_total", component)] += count * calls
            if len([tag for tag, _ in tags if tag]) >= 2:
                totals[("ti2i_mixed_executions_total", component)] += count
            for tag, tag_samples in tags:
                samples[(component, tag or CLIENT_TAG)] += count * tag_samples
        for (name, component), total in totals.items():
            self._increment(name, total, component=component)
        for (component, method), total in samples.items():
            self._increment("ti2i_samples_total", total, component=component, method=method)
