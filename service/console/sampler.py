"""The process's own counters, sampled every few seconds into a 15-minute ring buffer.

The console's charts and rates come from here, never from the hot path: the worker and the
API only increment their Prometheus metrics as they always do. Every ``interval`` seconds one
task reads four metric families (``collect()``: a walk over their few children) into a
``Sample``: 0.5 to 1 ms of CPU on the 2-vCPU test machine (derived from the idle cost
``bench/console.py`` measures). Rates and percentiles are differences between two samples,
computed only when a page or the chart's JSON asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase

from .. import metrics

WINDOW_SECONDS = 15 * 60
# The chart's three lines: messages_processed outcomes.
CHARTED = ("completed", "retried", "dead_lettered")
API_PREFIX = "/v1/"  # the public API's routes; health and metrics are not "API requests"
# Percentiles and per-second rates on the pages are over this much of the most recent history.
RECENT_SECONDS = 60.0
FAILED_OUTCOMES = frozenset({"timeout", "connection_error", "http_4xx", "http_5xx"})

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +inf last


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counter values at one moment (``at``: Unix time)."""

    at: float
    processed: Mapping[str, float] = field(default_factory=dict)
    api_requests: float = 0.0
    api_latency: Buckets = ()
    target_calls: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    target_latency: Mapping[str, Buckets] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rates:
    """What happened between two samples, per second, with latency percentiles."""

    seconds: float
    per_second: float
    p50: float | None
    p99: float | None
    error_rate: float | None = None


def take_sample() -> Sample:
    """Read the counters the console shows (a few dozen values)."""
    processed = _totals(metrics.messages_processed, "outcome")
    # The latency histogram counts every request too: one family read instead of two (the
    # requests counter has a child per status as well).
    api_latency = _buckets(metrics.http_latency, API_PREFIX)
    api_requests = api_latency[-1][1] if api_latency else 0.0
    calls: dict[str, dict[str, float]] = {}
    for labels, value in _values(metrics.target_calls, "_total"):
        by_outcome = calls.setdefault(labels["target"], {})
        by_outcome[labels["outcome"]] = by_outcome.get(labels["outcome"], 0.0) + value
    latency = _per_label_buckets(metrics.target_latency, "target")
    return Sample(time.time(), processed, api_requests, api_latency, calls, latency)


def _values(metric: MetricWrapperBase, suffix: str) -> Iterable[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample.labels, sample.value


def _totals(metric: MetricWrapperBase, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in _values(metric, "_total"):
        totals[labels[label]] = totals.get(labels[label], 0.0) + value
    return totals


def _buckets(metric: MetricWrapperBase, prefix: str) -> Buckets:
    """Bucket counts summed over the children whose route starts with ``prefix``."""
    summed: dict[float, float] = {}
    for labels, value in _values(metric, "_bucket"):
        if labels.get("route", "").startswith(prefix):
            bound = float(labels["le"])
            summed[bound] = summed.get(bound, 0.0) + value
    return tuple(sorted(summed.items()))


def _per_label_buckets(metric: MetricWrapperBase, label: str) -> dict[str, Buckets]:
    grouped: dict[str, dict[float, float]] = {}
    for labels, value in _values(metric, "_bucket"):
        grouped.setdefault(labels[label], {})[float(labels["le"])] = value
    return {name: tuple(sorted(buckets.items())) for name, buckets in grouped.items()}


def quantile(q: float, before: Buckets, after: Buckets) -> float | None:
    """The ``q`` quantile of what was observed between two bucket snapshots (Prometheus'
    ``histogram_quantile``: linear within the bucket); None when nothing was observed."""
    earlier = dict(before)
    counts = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in counts:
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, count
    return lower


class CounterSampler:
    """A ring buffer of ``Sample``s, one per ``interval`` seconds over the last 15 minutes."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=int(WINDOW_SECONDS / interval) + 1)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CounterSampler]:
        """Sample in the background while the block runs."""
        task = asyncio.create_task(self._run(), name="console-sampler")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def sample(self) -> None:
        """Take a sample now and keep it."""
        self._samples.append(take_sample())

    def series(self, now: Sample) -> dict[str, list[float]]:
        """Per-second rates of the charted outcomes between consecutive samples, plus the
        time of each point (``t``, Unix seconds), ending with the live point ``now`` (a
        ``take_sample()`` the caller took for this request)."""
        points = [*self._samples, now]
        series: dict[str, list[float]] = {"t": [], **{name: [] for name in CHARTED}}
        for before, after in itertools.pairwise(points):
            seconds = after.at - before.at
            if seconds < 1.0:  # the live point right after a sample: too short to be a rate
                continue
            series["t"].append(round(after.at, 3))
            for name in CHARTED:
                delta = after.processed.get(name, 0.0) - before.processed.get(name, 0.0)
                series[name].append(round(delta / seconds, 3))
        return series

    def recent(self, now: Sample) -> tuple[Sample, Sample]:
        """(about RECENT_SECONDS before ``now``, ``now``): the span the pages' rates and
        percentiles cover."""
        earlier = [s for s in self._samples if now.at - s.at >= RECENT_SECONDS]
        start = earlier[-1] if earlier else (self._samples[0] if self._samples else now)
        return start, now

    @staticmethod
    def api_rates(start: Sample, end: Sample) -> Rates:
        """API requests per second and latency percentiles between two samples."""
        seconds = max(end.at - start.at, 1e-9)
        return Rates(
            seconds,
            (end.api_requests - start.api_requests) / seconds,
            quantile(0.5, start.api_latency, end.api_latency),
            quantile(0.99, start.api_latency, end.api_latency),
        )

    @staticmethod
    def target_rates(target: str, start: Sample, end: Sample) -> Rates:
        """One target's calls per second, error rate and latency percentiles between two
        samples."""
        seconds = max(end.at - start.at, 1e-9)
        before, after = start.target_calls.get(target, {}), end.target_calls.get(target, {})
        deltas = {k: v - before.get(k, 0.0) for k, v in after.items()}
        calls = sum(v for k, v in deltas.items() if k not in ("circuit_open", "misconfigured"))
        failed = sum(v for k, v in deltas.items() if k in FAILED_OUTCOMES)
        latency_before = start.target_latency.get(target, ())
        latency_after = end.target_latency.get(target, ())
        return Rates(
            seconds,
            calls / seconds,
            quantile(0.5, latency_before, latency_after),
            quantile(0.99, latency_before, latency_after),
            failed / calls if calls else None,
        )
