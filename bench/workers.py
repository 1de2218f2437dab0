"""Worker comparison: each consumer drains the same pre-loaded messages, then takes paced load.

One run of one consumer, against three stub targets answering after ``latency`` seconds:

1. a fresh queue pair; the consumer starts on the empty queue and is given a moment to poll;
2. the consumer is paused (SIGSTOP), the queue loaded with the drain set (identical bodies
   for every consumer), and the counters read: requests the proxy forwarded to SQS and KMS,
   CPU of the consumer and of every server; then it is resumed (SIGCONT) at ``t0``;
3. **drain**: until every message reached its last target, or the window closed. msg/s is
   messages completed / (last completion - t0); a message completes when the stub records
   the call to its last target (the ceiling: when its DeleteMessageBatch returned);
4. what is left is purged; the in-flight ones finish;
5. **paced**: the loader sends at half the drain rate for a few seconds (open loop) and
   end-to-end latency is send -> last target call, per message, p50 and p99;
6. the consumer stops; stub records are collected and cleared.

Counters are taken at t0 and at the end of the drain, so SQS requests per message, KMS calls
per 1,000 messages and CPU per 1,000 messages are at load. The drain set is larger than
a window's worth for the slow consumers; they are measured over the window.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import consumers, workload
from courier_testkit.aws import AwsStack
from courier_testkit.events import Event
from courier_testkit.proxy import counter_delta
from courier_testkit.stubs import StubProcess
from service.settings import Settings

POLL_SECONDS = 0.2
SETTLE_TIMEOUT_SECONDS = 15.0
PACED_TAIL_SECONDS = 15.0
_queues = itertools.count()


@dataclass
class WorkerBench:
    """What every worker run shares."""

    stack: AwsStack
    stubs: StubProcess
    base: Settings
    drain: Sequence[Event]
    paced: Sequence[Event]
    window_seconds: float
    paced_seconds: float
    paced_fraction: float = 0.5


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def completions(
    arrivals: Mapping[str, Sequence[tuple[str, float]]],
) -> tuple[dict[str, float], int]:
    """request id -> time of the call to its last target; and how many calls were repeats."""
    first: dict[str, dict[str, float]] = defaultdict(dict)
    repeats = 0
    for target, calls in arrivals.items():
        for key, at in calls:
            request_id = key.rsplit(":", 1)[0]
            if target in first[request_id]:
                repeats += 1
                continue
            first[request_id][target] = at
    every = set(arrivals)
    done = {rid: max(times.values()) for rid, times in first.items() if set(times) == every}
    return done, repeats


async def _snapshot(bench: WorkerBench, consumer: consumers.Consumer) -> dict[str, Any]:
    servers = {**bench.stack.servers(), "stubs": bench.stubs}
    proxy = bench.stack.proxy
    return {
        "at": time.monotonic(),
        "proxy": await proxy.counts() if proxy else {},
        "consumer_cpu": consumer.cpu_seconds(),
        "servers_cpu": {name: server.cpu_seconds() for name, server in servers.items()},
    }


async def _courier_requests(consumer: consumers.Consumer) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for courier in consumer.couriers:
        for service, operations in (await courier.aws_requests()).items():
            totals[service] += sum(operations.values())
    return dict(totals)


async def _targets_done(bench: WorkerBench, wanted: int) -> bool:
    for name, _ in consumers.TARGETS:
        if (await bench.stubs.stats(name))["keys"] < wanted:
            return False
    return True


async def _drain(bench: WorkerBench, consumer: consumers.Consumer, queue_url: str) -> bool:
    """Wait until the drain set is done or the window closes; True when it was all done."""
    deadline = time.monotonic() + bench.window_seconds
    direct = bench.stack.direct
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        if consumer.kind == "ceiling":
            if await workload.depth(direct, queue_url) == (0, 0):
                return True
        elif await _targets_done(bench, len(bench.drain)):
            return True
    return False


async def settle(bench: WorkerBench, queue_url: str, timeout: float) -> bool:  # noqa: ASYNC109
    """Wait until nothing is visible or in flight (True), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await workload.depth(bench.stack.direct, queue_url) == (0, 0):
            return True
        await asyncio.sleep(POLL_SECONDS)
    return False


async def run_once(bench: WorkerBench, kind: str, latency: float) -> dict[str, Any]:
    """One drain + paced run of ``kind`` with targets answering after ``latency`` seconds."""
    stack = bench.stack
    queue = await stack.queue_pair(f"w{next(_queues)}-{kind}")
    direct_url = stack.queue_url(queue.url, direct=True)
    await bench.stubs.reset()
    await bench.stubs.set_all([n for n, _ in consumers.TARGETS], latency_seconds=latency)
    try:
        async with consumers.start(
            kind, stack=stack, stub_urls=bench.stubs.urls, queue=queue, base=bench.base
        ) as consumer:
            courier_before = await _courier_requests(consumer)
            consumer.pause()
            load_seconds = await workload.load(stack.direct, direct_url, bench.drain)
            before = await _snapshot(bench, consumer)
            consumer.resume()
            drained = await _drain(bench, consumer, direct_url)
            after = await _snapshot(bench, consumer)
            courier_after = await _courier_requests(consumer)
            if not drained:
                await workload.purge(stack.direct, direct_url)
            settled = await settle(bench, direct_url, SETTLE_TIMEOUT_SECONDS)
            drain_rate_guess = await _drain_rate(bench, consumer, before, after, drained)
            rate = max(1.0, bench.paced_fraction * drain_rate_guess)
            sent = await workload.paced(
                stack.direct, direct_url, bench.paced, rate, bench.paced_seconds
            )
            paced_settled = await settle(bench, direct_url, PACED_TAIL_SECONDS)
            await asyncio.sleep(0.3)
            peak_rss = consumer.peak_rss()
        done, repeats = await _collect(bench, consumer)
        left = await workload.depth(stack.direct, direct_url)
    finally:
        await bench.stubs.reset()
        await stack.delete_queues(direct_url, stack.queue_url(queue.dlq_url, direct=True))
    return _result(
        bench, kind, latency, before, after, done, sent, rate,
        courier=(courier_before, courier_after),
        extra={
            "drained": drained,
            "settled_after_drain": settled,
            "paced_settled": paced_settled,
            "load_seconds": round(load_seconds, 2),
            "peak_rss_bytes": peak_rss,
            "repeated_calls": repeats,
            "left_in_queue": sum(left),
        },
    )  # fmt: skip


async def _collect(
    bench: WorkerBench, consumer: consumers.Consumer
) -> tuple[dict[str, float], int]:
    if consumer.kind == "ceiling":
        done: dict[str, float] = {}
        for request_id, at in consumer.ceiling_deletions():
            done.setdefault(request_id, at)
        return done, 0
    arrivals = {name: await bench.stubs.arrivals(name) for name, _ in consumers.TARGETS}
    return completions(arrivals)


async def _drain_rate(
    bench: WorkerBench,
    consumer: consumers.Consumer,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    drained: bool,
) -> float:
    """The drain rate as far as known before the consumer stops, to pace the next phase."""
    elapsed = max(1e-3, after["at"] - before["at"])
    if consumer.kind != "ceiling":
        done, _ = await _collect(bench, consumer)
        drain_ids = {event.request_id for event in bench.drain}
        finished = [at for rid, at in done.items() if rid in drain_ids]
        return len(finished) / max(1e-3, max(finished, default=after["at"]) - before["at"])
    if drained:
        return len(bench.drain) / elapsed
    batches = counter_delta(after["proxy"], before["proxy"]).get("sqs", {})
    return min(len(bench.drain), 10 * batches.get("DeleteMessageBatch", 0)) / elapsed


def _result(
    bench: WorkerBench,
    kind: str,
    latency: float,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    done: Mapping[str, float],
    sent: Mapping[str, float],
    rate: float,
    *,
    courier: tuple[Mapping[str, int], Mapping[str, int]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    t0, t_end = before["at"], after["at"]
    drain_ids = {event.request_id for event in bench.drain}
    finished = sorted(at for rid, at in done.items() if rid in drain_ids and t0 <= at <= t_end)
    count = len(finished)
    elapsed = (finished[-1] - t0) if finished else float("nan")
    steady = float("nan")
    if count >= 20:
        low, high = finished[count // 10], finished[(count * 9) // 10]
        steady = ((count * 9) // 10 - count // 10) / max(1e-6, high - low)
    latencies = [done[rid] - at for rid, at in sent.items() if rid in done]
    sqs = counter_delta(after["proxy"], before["proxy"]).get("sqs", {})
    kms = counter_delta(after["proxy"], before["proxy"]).get("kms", {})
    window = max(1e-6, t_end - t0)
    consumer_cpu = after["consumer_cpu"] - before["consumer_cpu"]
    courier_sqs = courier[1].get("sqs", 0) - courier[0].get("sqs", 0)
    return {
        "kind": kind,
        "target_latency_ms": round(latency * 1000),
        "messages": count,
        "msgs_per_s": count / elapsed if count else 0.0,
        "steady_msgs_per_s": steady,
        "sqs_requests": sqs,
        "sqs_requests_per_message": sum(sqs.values()) / count if count else float("nan"),
        "courier_counted_sqs_per_message": (courier_sqs / count) if courier[1] and count else None,
        "kms_calls_per_1000": sum(kms.values()) * 1000 / count if count else float("nan"),
        "cpu_ms_per_message": consumer_cpu * 1000 / count if count else float("nan"),
        "cpu_s_per_1000": consumer_cpu * 1000 / count if count else float("nan"),
        "consumer_cpu_share": consumer_cpu / window,
        "servers_cpu_share": {
            name: (after["servers_cpu"][name] - before["servers_cpu"][name]) / window
            for name in after["servers_cpu"]
        },
        "peak_rss_mb": max(extra["peak_rss_bytes"]) / 2**20,
        "peak_rss_mb_total": sum(extra["peak_rss_bytes"]) / 2**20,
        "paced": {
            "offered_msgs_per_s": rate,
            "sent": len(sent),
            "completed": len(latencies),
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        },
        **{k: v for k, v in extra.items() if k != "peak_rss_bytes"},
    }


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and spread (min, max) of the repeated runs of one consumer and latency."""

    def stat(path: Sequence[str]) -> dict[str, float]:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            if value is not None and value == value:  # not None, not NaN
                values.append(float(value))
        if not values:
            return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }

    return {
        "msgs_per_s": stat(["msgs_per_s"]),
        "steady_msgs_per_s": stat(["steady_msgs_per_s"]),
        "p50_ms": stat(["paced", "p50_ms"]),
        "p99_ms": stat(["paced", "p99_ms"]),
        "sqs_requests_per_message": stat(["sqs_requests_per_message"]),
        "kms_calls_per_1000": stat(["kms_calls_per_1000"]),
        "cpu_s_per_1000": stat(["cpu_s_per_1000"]),
        "peak_rss_mb": stat(["peak_rss_mb"]),
        "consumer_cpu_share": stat(["consumer_cpu_share"]),
    }
