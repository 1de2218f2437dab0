"""Prometheus metrics: every courier metric is declared here, named ``courier_*`` in base units.

One registry per process (prometheus_client's default, which also carries the process and
GC collectors). Metrics are observability only: code that updates them must never fail
because of them, so they are plain counters/gauges/histograms with bounded label sets.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# prometheus_client also exposes a ``<name>_created`` gauge (a Unix time, named without its
# unit) beside every counter and histogram: twice the series to scrape and store, for nothing
# courier's dashboards or alarms read. Process-wide: it applies to every prometheus_client
# metric in the process, which for courier (one registry, all metrics here) is the intent.
disable_created_metrics()  # type: ignore[no-untyped-call]

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class LabelCache(Generic[_Metric]):
    """``metric.labels(*values)``, remembered per label values.

    ``labels`` takes a lock and validates its arguments on every call (about 1 µs); the hot
    paths (one per request, several per message) look the child up in a dict instead. At most
    ``limit`` children are remembered, so a label fed by a client (an HTTP method) cannot grow
    it without bound; past that, ``labels`` answers as before.
    """

    def __init__(self, metric: _Metric, limit: int = 1000) -> None:
        self._metric: _Metric = metric
        self._limit = limit
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        """The child of ``values`` (the same object ``metric.labels(*values)`` returns)."""
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._limit:
                self._children[values] = child
        return child


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

build_info = Gauge(
    "courier_build_info", "courier version and role of this process", ["version", "role"]
)

aws_requests = Counter(
    "courier_aws_requests_total",
    "AWS API requests sent, by service and operation",
    ["service", "operation"],
)

secret_lookups = Counter(
    "courier_secret_lookups_total", "secret cache lookups by result (hit, miss, stale)", ["result"]
)
secret_fetches = Counter(
    "courier_secret_fetches_total",
    "reads of the CredStash store by trigger (miss, refresh) and outcome (ok, error)",
    ["trigger", "outcome"],
)

data_keys = Counter(
    "courier_envelope_data_keys_total",
    "envelope data key events: generated (KMS), decrypted (KMS), cache_hit",
    ["event"],
)

http_requests = Counter(
    "courier_http_requests_total",
    "HTTP requests answered, by route, method and status",
    ["route", "method", "status"],
)
http_latency = Histogram(
    "courier_http_request_duration_seconds",
    "HTTP request latency by route and method",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)

ready = Gauge("courier_ready", "1 when this process reports ready on /readyz")


def exposition() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


auth_rejected = Counter(
    "courier_auth_rejected_total", "requests refused by authentication, by reason", ["reason"]
)

sqs_batch_size = Histogram(
    "courier_sqs_batch_entries",
    "entries per SQS batch request, by operation (send, delete, visibility)",
    ["operation"],
    buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
)

idm_calls = Counter("courier_idm_calls_total", "IdM call attempts by outcome", ["outcome"])
idm_latency = Histogram(
    "courier_idm_call_duration_seconds", "IdM call attempt latency", buckets=LATENCY_BUCKETS
)

idempotent_replays = Counter(
    "courier_idempotent_replays_total",
    "create requests answered from an earlier request with the same Idempotency-Key",
)

# --- worker -------------------------------------------------------------------------------
messages_received = Counter(
    "courier_messages_received_total", "SQS messages received by the worker"
)
messages_processed = Counter(
    "courier_messages_processed_total",
    "messages finished by outcome: completed, duplicate, retried, dead_lettered, released",
    ["outcome"],
)
processing_latency = Histogram(
    "courier_message_processing_seconds", "time from receive to outcome", buckets=LATENCY_BUCKETS
)
queue_lag = Histogram(
    "courier_message_queue_lag_seconds",
    "time a message waited in SQS (now - SentTimestamp)",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
in_flight = Gauge("courier_messages_in_flight", "messages being processed by this process")
pollers_active = Gauge("courier_pollers_active", "long-polls currently running")
sqs_entry_failures = Counter(
    "courier_sqs_entry_failures_total",
    "batch entries SQS refused, by operation and code",
    ["operation", "code"],
)
target_calls = Counter(
    "courier_target_calls_total",
    "legacy target call attempts by target and outcome",
    ["target", "outcome"],
)
target_latency = Histogram(
    "courier_target_call_duration_seconds",
    "legacy target call latency",
    ["target"],
    buckets=LATENCY_BUCKETS,
)
circuit_state = Gauge(
    "courier_target_circuit_state", "circuit per target: 0 closed, 1 open, 2 half-open", ["target"]
)
circuit_open = Gauge(
    "courier_target_circuit_open", "1 while the target's circuit is open", ["target"]
)
circuit_transitions = Counter(
    "courier_target_circuit_transitions_total",
    "circuit state changes by target and new state",
    ["target", "state"],
)
# The adaptive concurrency limit per target (service/worker/limiter.py); the gauges are read
# at scrape time.
target_concurrency_limit = Gauge(
    "courier_target_concurrency_limit", "concurrent calls this process allows now", ["target"]
)
target_concurrency_in_use = Gauge(
    "courier_target_concurrency_in_use", "calls open towards the target now", ["target"]
)
target_min_rtt = Gauge(
    "courier_target_min_rtt_seconds",
    "lowest recent call latency: the target's latency when nothing queues",
    ["target"],
)
target_limit_last_change = Gauge(
    "courier_target_limit_last_change", "the latest change of the limit, in calls", ["target"]
)
target_limit_changes = Counter(
    "courier_target_limit_changes_total",
    "changes of the concurrency limit by direction (up, down)",
    ["target", "direction"],
)
target_paused = Gauge(
    "courier_target_paused", "1 while calls wait out the target's Retry-After", ["target"]
)
target_pauses = Counter(
    "courier_target_pauses_total", "Retry-After pauses begun, by target", ["target"]
)
target_constrained = Gauge(
    "courier_target_constrained",
    "1 while the target is the bottleneck (circuit open, Retry-After pause, or its limit has"
    " held calls back for minutes): more instances would not deliver more",
    ["target"],
)
dlq_moves = Counter("courier_dlq_moves_total", "messages moved to the DLQ, by reason", ["reason"])
visibility_extensions = Counter(
    "courier_visibility_extensions_total",
    "heartbeat visibility extensions of long-running messages",
)

instance_info = Gauge(
    "courier_instance_info",
    "the EC2 instance this process runs on",
    ["instance_id", "availability_zone"],
)

# The fleet-wide cap per target (service/worker/fleet.py).
fleet_share = Gauge(
    "courier_target_fleet_share",
    "this process's share of the target's fleet_max_concurrency (0: no calls for now)",
    ["target"],
)
fleet_members = Gauge(
    "courier_fleet_members", "live worker processes in this process's latest view of the fleet"
)
