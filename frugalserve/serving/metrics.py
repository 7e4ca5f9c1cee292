"""Serving statistics, kept as plain counters on the hot path and turned into Prometheus
metric families only when /metrics is scraped (a labelled prometheus_client Histogram costs
a lock and a dict lookup per observation; these cost a bisect and an add)."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..economics.meter import PICO_PER_USD

TIME_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class VersionStats:
    """Everything measured for one model version (updated on the event loop thread only)."""

    __slots__ = ("model", "version", "ok", "errors", "queue", "compute", "total", "batch_size",
                 "batches", "busy_s", "cost_pusd", "escalated")

    def __init__(self, model: str, version: str):
        self.model = model
        self.version = version
        self.ok = 0
        self.errors: defaultdict[int, int] = defaultdict(int)
        self.queue = Histogram(TIME_BUCKETS_S)
        self.compute = Histogram(TIME_BUCKETS_S)
        self.total = Histogram(TIME_BUCKETS_S)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batches = 0
        self.busy_s = 0.0
        self.cost_pusd: defaultdict[str, int] = defaultdict(int)  # by tenant
        self.escalated: defaultdict[str, int] = defaultdict(int)  # rows a variant passed on


class ServingMetrics(Collector):
    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}
        # requests for a model or version that is not served, by status; labelled model="" so
        # that arbitrary names in URLs cannot grow the label set
        self.unresolved: defaultdict[int, int] = defaultdict(int)

    def for_version(self, model: str, version: str) -> VersionStats:
        key = (model, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = VersionStats(model, version)
        return stats

    def collect(self):
        labels = ["model", "version"]
        requests = CounterMetricFamily("frugalserve_requests", "Successful inference requests",
                                       labels=labels)
        errors = CounterMetricFamily("frugalserve_errors", "Failed inference requests",
                                     labels=[*labels, "status"])
        batches = CounterMetricFamily("frugalserve_batches", "Batches executed", labels=labels)
        busy = CounterMetricFamily("frugalserve_busy_seconds",
                                   "Engine time spent computing batches", labels=labels)
        cost = CounterMetricFamily("frugalserve_cost_usd", "Metered cost of inference in USD",
                                   labels=[*labels, "tenant"])
        escalated = CounterMetricFamily("frugalserve_cascade_escalated_rows",
                                        "Rows a cascade stage passed to the next stage",
                                        labels=[*labels, "variant"])
        hists = {
            "queue": HistogramMetricFamily("frugalserve_queue_seconds",
                                           "Time requests wait for a batch", labels=labels),
            "compute": HistogramMetricFamily("frugalserve_compute_seconds",
                                             "Compute time of the batch a request rode in",
                                             labels=labels),
            "total": HistogramMetricFamily("frugalserve_request_seconds",
                                           "Time from arrival to result", labels=labels),
            "batch_size": HistogramMetricFamily("frugalserve_batch_size",
                                                "Rows per executed batch", labels=labels),
        }
        for status, n in self.unresolved.items():
            errors.add_metric(["", "", str(status)], n)
        for s in self._stats.values():
            lv = [s.model, s.version]
            requests.add_metric(lv, s.ok)
            batches.add_metric(lv, s.batches)
            busy.add_metric(lv, s.busy_s)
            for status, n in s.errors.items():
                errors.add_metric([*lv, str(status)], n)
            for tenant, pico in s.cost_pusd.items():
                cost.add_metric([*lv, tenant], pico / PICO_PER_USD)
            for variant, n in s.escalated.items():
                escalated.add_metric([*lv, variant], n)
            for attr, family in hists.items():
                h = getattr(s, attr)
                family.add_metric(lv, h.cumulative(), h.total)
        yield from (requests, errors, batches, busy, cost, escalated, *hists.values())


class QueueGauge(Collector):
    """Current queue depth per model version, read at scrape time."""

    def __init__(self, depths) -> None:
        self._depths = depths  # () -> iterable of (model, version, depth)

    def collect(self):
        gauge = GaugeMetricFamily("frugalserve_queue_depth", "Requests waiting for a batch",
                                  labels=["model", "version"])
        for model, version, depth in self._depths():
            gauge.add_metric([model, version], depth)
        yield gauge
