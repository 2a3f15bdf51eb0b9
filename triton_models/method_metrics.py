"""What a hosted method model reports on Triton's metrics endpoint (`/metrics`, Prometheus text), per process.

Triton's own statistics see a method model's requests, not what its processes did with them: how the
requests spread over the processes (each a Triton instance) and how well each step scheduler batched the
loops' calls. So every process reports, labelled with the model and its instance name
(``sdedit_0_1``):

- ``ti2i_method_requests_total`` (counter) and ``ti2i_method_running`` (gauge): the requests it started,
  and runs now;
- per component (label ``component``), ``ti2i_step_executions_total``, ``ti2i_step_calls_total`` and
  ``ti2i_step_samples_total`` (counters): the engine calls its step scheduler ran, the requests' calls
  merged into them, and their samples (with guidance a call holds two). Calls per execution is the batching
  across requests (1 when nothing merged).

Each update is a message to the server that takes milliseconds (finishing a request and sending its
steps took 2.2 ms, median, on 2 cores), so the request path only counts, in the process, and a reporter
thread sends what changed at most every `period_s` (0.5 s): the metrics lag the requests by at most that.
An update that fails is logged and dropped: metrics never cost a request its answer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

REQUESTS = "ti2i_method_requests_total"
RUNNING = "ti2i_method_running"
STEP_COUNTERS = {  # metric: what it counts, per component
    "ti2i_step_executions_total": "engine calls the step scheduler of a method model's process ran",
    "ti2i_step_calls_total": "requests' component calls merged into those engine calls",
    "ti2i_step_samples_total": "samples in those engine calls",
}


class MethodMetrics:
    """One process's metrics (`pb_utils`: the python backend's utilities, which send them to the server).

    `executions` is the step scheduler's count of (component, calls merged, samples) -> engine calls."""

    def __init__(self, pb_utils: Any, model: str, instance: str, executions: Counter[tuple[str, int, int]],
                 period_s: float = 0.5):
        family = pb_utils.MetricFamily
        self._pb = pb_utils
        self._labels = {"model": model, "instance": instance}
        # a family must outlive its metrics (deleting it removes them): every family is kept here
        self._families = {REQUESTS: family(name=REQUESTS, description="requests a method model's process started",
                                           kind=family.COUNTER),
                          RUNNING: family(name=RUNNING, description="requests a method model's process runs now",
                                          kind=family.GAUGE),
                          **{name: family(name=name, description=text, kind=family.COUNTER)
                             for name, text in STEP_COUNTERS.items()}}
        self._requests = self._families[REQUESTS].Metric(labels=self._labels)
        self._running = self._families[RUNNING].Metric(labels=self._labels)
        self._step_metrics: dict[tuple[str, str], Any] = {}
        self._executions = executions
        self._sent: Counter[Any] = Counter()  # what the server has: requests, running, (metric, component)
        self._started = self._now = 0
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = False
        self._period_s = period_s
        self._reporter = threading.Thread(target=self._report, daemon=True, name=f"{instance}-metrics")
        self._reporter.start()

    def started(self) -> None:
        with self._lock:
            self._started += 1
            self._now += 1
        self._changed.set()

    def finished(self) -> None:
        with self._lock:
            self._now -= 1
        self._changed.set()

    def close(self) -> None:
        """Send what is left and stop the reporter."""
        self._closed = True
        self._changed.set()
        self._reporter.join(timeout=10)

    def _report(self) -> None:
        while not self._closed:
            self._changed.wait()
            time.sleep(self._period_s)  # gather what else changes meanwhile into the same messages
            self._changed.clear()
            try:
                self._send()
            except Exception as err:  # the server went away, or refused a metric: the requests go on
                self._pb.Logger.log_warn(f"{self._labels['instance']}: metrics update failed: {err}")

    def _send(self) -> None:
        with self._lock:
            started, now = self._started, self._now
        if started > self._sent["requests"]:
            self._requests.increment(started - self._sent["requests"])
            self._sent["requests"] = started
        if now != self._sent["running"]:
            self._running.set(now)
            self._sent["running"] = now
        totals: Counter[tuple[str, str]] = Counter()
        for (component, calls, samples), count in list(self._executions.items()):
            totals[("ti2i_step_executions_total", component)] += count
            totals[("ti2i_step_calls_total", component)] += count * calls
            totals[("ti2i_step_samples_total", component)] += count * samples
        for key, total in totals.items():
            if total > self._sent[key]:
                self._metric(*key).increment(total - self._sent[key])
                self._sent[key] = total

    def _metric(self, name: str, component: str) -> Any:
        if (name, component) not in self._step_metrics:
            self._step_metrics[(name, component)] = self._families[name].Metric(
                labels={**self._labels, "component": component})
        return self._step_metrics[(name, component)]
