"""7. legacy: three worker processes against a legacy system with real capacity.

billing is stubbed as a system that serves K calls at once at 100 ms each, queues Q more
(their latency rises) and answers 503 with ``Retry-After: 1`` beyond that
(``service.stubs.base.Behaviour``). Every call it answers is on its timeline (arrival, end,
status, queue wait, path), and each process calls it under a path of its own
(``/billing/p<i>``), so the timeline tells the processes apart. A backlog is planted on the
queue (``planted``) so that billing, not the API or the emulators, is the bottleneck.

- a. adaptive limits: goodput, share of calls refused, p99 latency at the target. The goals
  (>= 90% of K / latency, < 1% refused, p99 <= 2x the unloaded latency) are reported, not
  checked: the rig shares two cores, so these are measurements, not invariants;
- b. the capacity halved mid-run (K -> K/2): how fast the refusals stop, and nothing lost;
- c. 429 with ``Retry-After: 5`` for a few seconds: after the first 429 a process gets, it
  makes no call to billing for 5 s (calls it had already started, arriving within
  ``IN_FLIGHT_GRACE`` after the 429, excepted), and nothing is lost;
- d. a fleet cap (``targets[].fleet_max_concurrency``) with three processes (full scale: the
  third started under load, a scale-out): the stub never sees more calls open at once than
  the cap.

a to c run one after the other on one fleet and one queue (a batch of messages planted per
phase, each row accounting for its own batch after one drain); d runs on a fleet and a queue
of its own, started before a (its processes wait ~25 s to join the fleet before any call).
Every row checks 0 lost, 0 duplicate effects and an empty DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos import verify
from chaos.load import username
from chaos.report import Row
from chaos.rig import Rig
from chaos.scenarios.common import Fleet, Scale, Scenario, metric, run_id
from chaos.scenarios.planted import preload, sealed_messages
from courier_testkit.courier import CourierProcess
from courier_testkit.stubs import DEFAULT_BEHAVIOUR
from courier_testkit.timeline import in_window, latencies, peak, refused, served
from service.settings import Settings, TargetSettings
from service.stubs.base import TimelineEntry

LEGACY = "billing"
PROCESSES = 3
IN_FLIGHT_GRACE = 0.3  # seconds after the first 429 in which calls already started may arrive
PAUSE_TOLERANCE = 0.25  # a pause may end this much before Retry-After (clocks, rounding)
SAMPLE_SECONDS = 0.5
LIMIT = "courier_target_concurrency_limit"
# Planted per phase: this many times what the target can serve in the phase, so it never idles.
BACKLOG_FACTOR = 1.2
# d: longest wait for a process's first call to a capped target (it joins the fleet first).
JOIN_WAIT_BOUND = 60.0
JOIN_WAIT_ESTIMATE = 30.0  # what it takes with courier's 5 s heartbeat (sizes the backlog)


@dataclass(frozen=True)
class Sizes:
    """The legacy scenario's sizes at one scale (``SIZES``)."""

    capacity: int  # K: calls billing serves at once
    queue: int  # Q: calls that wait for a slot beyond K
    latency: float  # seconds per call, unloaded
    steady_seconds: float  # a
    halved_seconds: float  # b
    throttle_seconds: float  # c: how long every call is answered 429
    retry_after: float  # c: the 429's Retry-After
    after_pause_seconds: float  # c: load kept after the pauses end
    fleet_cap: int  # d: fleet_max_concurrency
    fleet_seconds: float  # d: load at the cap, from the first call
    scale_out: bool  # d: the third process starts under load (it waits to join: longer)


SIZES = {
    "small": Sizes(
        capacity=8,
        queue=8,
        latency=0.1,
        steady_seconds=6,
        halved_seconds=5,
        throttle_seconds=1.5,
        retry_after=5,
        after_pause_seconds=2,
        fleet_cap=6,
        fleet_seconds=4,
        scale_out=False,
    ),
    "full": Sizes(
        capacity=16,
        queue=16,
        latency=0.1,
        steady_seconds=30,
        halved_seconds=20,
        throttle_seconds=3,
        retry_after=5,
        after_pause_seconds=5,
        fleet_cap=6,
        fleet_seconds=30,
        scale_out=True,
    ),
}


@dataclass
class Batch:
    """Messages planted together: request ids and usernames, to account for them apart."""

    messages: list[tuple[str, str, str]]
    usernames: set[str]

    @property
    def ids(self) -> set[str]:
        return {request_id for request_id, _, _ in self.messages}


async def seal(rig: Rig, scenario: Scenario, count: int) -> Batch:
    """``count`` healthy messages for ``scenario``'s resources, usernames of their own."""
    run = run_id()
    messages, _ = await sealed_messages(rig, scenario.resources, run, count, 0)
    return Batch(messages, {username(run, index) for index in range(count)})


def per_process(settings: Settings, index: int, **changes: Any) -> Settings:
    """Process ``index``'s settings: its own instance number and its own path at ``LEGACY``
    (``/<name>/p<index>``, which the timeline records), plus ``changes`` to that target."""
    missing = set(changes) - {f.name for f in dataclasses.fields(TargetSettings)}
    if missing:
        raise RuntimeError(f"courier has no target setting {sorted(missing)} yet")
    targets = tuple(
        dataclasses.replace(t, url=f"{t.url}/p{index}", **changes) if t.name == LEGACY else t
        for t in settings.targets
    )
    return settings.replace(targets=targets, instance=index)


def path_of(index: int) -> str:
    return f"/{LEGACY}/p{index}"


def measure(
    entries: Sequence[TimelineEntry], seconds: float, capacity: int, latency: float
) -> dict[str, Any]:
    """Goodput, refused share and p99 latency at the target of the calls in one window."""
    ok = served(entries)
    turned_away = len(refused(entries))
    p99 = verify.percentile(latencies(entries), 99)
    goodput = len(ok) / seconds if seconds > 0 else 0.0
    return {
        "calls": len(entries),
        "goodput_per_s": round(goodput, 1),
        "goodput_of_max": round(goodput / (capacity / latency), 3),
        "refused_share": round(turned_away / len(entries), 4) if entries else 0.0,
        "p99_at_target_ms": round(1000 * p99, 1),
        "p99_vs_unloaded": round(p99 / latency, 2),
    }


def pauses_after_first_429(
    entries: Sequence[TimelineEntry], paths: Sequence[str], retry_after: float
) -> dict[str, dict[str, Any]]:
    """Per process (path): its first 429's answer time, the calls that arrived inside the
    pause (after ``IN_FLIGHT_GRACE``), and how long until its next call."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        mine = sorted((e for e in entries if e.path == path), key=lambda e: e.arrival)
        throttled = [e.end for e in mine if e.status == 429]
        if not throttled:
            found[path] = {"first_429": None}
            continue
        first = min(throttled)
        inside = [
            e
            for e in mine
            if first + IN_FLIGHT_GRACE < e.arrival < first + retry_after - PAUSE_TOLERANCE
        ]
        later = [e.arrival for e in mine if e.arrival > first + IN_FLIGHT_GRACE]
        found[path] = {
            "first_429": first,
            "calls_in_pause": len(inside),
            "in_pause_after_s": [round(e.arrival - first, 2) for e in inside[:5]],
            "next_call_after_s": round(min(later) - first, 2) if later else None,
            "answered_429": len(throttled),
        }
    return found


def account(
    row: Row, drained: verify.Drained, batch: Batch, dlq_ids: set[str], states: dict[str, str]
) -> None:
    """0 lost, 0 duplicate effects, none of the batch in the DLQ, every one completed."""
    effects, ids = drained.effects, batch.ids
    delivered = effects.delivered_everywhere(ids)
    row.requests = row.accepted = len(ids)
    row.delivered = len(delivered)
    row.lost = len(ids - delivered)
    row.redeliveries = effects.redeliveries(ids)
    row.duplicate_effects = effects.duplicate_effects(batch.usernames)
    row.dlq = len(ids & dlq_ids)
    row.base_invariants()
    row.check(drained.complete, "delivery did not complete in time")
    incomplete = sum(1 for rid in delivered if states.get(rid) != "completed")
    row.check(incomplete == 0, f"{incomplete} delivered requests not completed in the status table")


def dlq_request_ids(dlq: Iterable[dict[str, Any]]) -> set[str]:
    return {
        raw.get("MessageAttributes", {}).get("request_id", {}).get("StringValue", "") for raw in dlq
    }


@dataclass
class Sampler:
    """Every ``SAMPLE_SECONDS``, each process's adaptive limit for ``LEGACY`` (metric ``LIMIT``)."""

    processes: list[CourierProcess]
    origin: float
    samples: list[tuple[float, list[float]]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            limits = []
            for process in self.processes:
                try:
                    limits.append(await metric(process, LIMIT, target=LEGACY))
                except Exception:  # a process that cannot answer now: a gap, not a failure
                    limits.append(-1.0)
            self.samples.append((round(time.monotonic() - self.origin, 2), limits))
            await asyncio.sleep(SAMPLE_SECONDS)

    def around(self, start: float, end: float) -> list[float]:
        """The summed limits sampled in [start, end) (seconds since ``origin``)."""
        return [sum(limits) for at, limits in self.samples if start <= at < end]


class LegacyPhases(Scenario):
    """a, b and c on one fleet of ``PROCESSES`` workers and one queue."""

    sizes: Sizes
    batches: dict[str, Batch]
    processes: list[CourierProcess]
    sampler: Sampler
    sampling: asyncio.Task[None]
    marks: dict[str, float]
    counters: dict[str, dict[str, float]]
    timeline: list[TimelineEntry]
    states: dict[str, str]

    async def setup(self) -> None:
        rig, scale = self.rig, self.scale
        sizes = self.sizes = SIZES[scale.name]
        self.row = Row("7a legacy: adaptive limits")
        self.resources = await rig.fresh("legacy")
        await rig.stubs.reset()
        self.stack.push_async_callback(restore, rig)
        await rig.stubs.behave(
            LEGACY,
            latency_seconds=sizes.latency,
            capacity=sizes.capacity,
            queue=sizes.queue,
            overload_status=503,
            retry_after_seconds=1,
        )
        rate = sizes.capacity / sizes.latency
        self.batches = {
            "a": await seal(rig, self, math.ceil(rate * sizes.steady_seconds * BACKLOG_FACTOR)),
            "b": await seal(rig, self, math.ceil(rate / 2 * sizes.halved_seconds * BACKLOG_FACTOR)),
            "c": await seal(
                rig,
                self,
                math.ceil(rate / 2 * (sizes.throttle_seconds + sizes.after_pause_seconds)),
            ),
        }
        settings = worker_settings(rig, self)
        adaptive = [per_process(settings, i, limit="adaptive") for i in range(PROCESSES)]
        self.processes = await start(self, adaptive, "legacy")
        self.marks = {}
        self.counters = {}

    async def load(self) -> None:
        """The first batch; the limits sampled from here on."""
        self.marks["a"] = time.monotonic()
        self.sampler = Sampler(self.processes, self.marks["a"])
        self.sampling = asyncio.create_task(self.sampler.run())
        self.stack.callback(self.sampling.cancel)  # also when a later step fails
        await preload(self.rig, self.resources.queue_url, self.batches["a"].messages)

    async def fault(self) -> None:
        """b: capacity halved (and its batch planted); c: 429 + Retry-After for a while."""
        stubs, sizes = self.rig.stubs, self.sizes
        await sleep_until(self.marks["a"] + sizes.steady_seconds)
        self.counters["a"] = await self._counters()
        self.marks["b"] = time.monotonic()
        await stubs.behave(LEGACY, capacity=max(1, sizes.capacity // 2))
        await preload(self.rig, self.resources.queue_url, self.batches["b"].messages)
        await sleep_until(self.marks["b"] + sizes.halved_seconds)
        self.counters["b"] = await self._counters()
        self.marks["c"] = time.monotonic()
        await stubs.behave(LEGACY, fixed_status=429, retry_after_seconds=sizes.retry_after)
        await preload(self.rig, self.resources.queue_url, self.batches["c"].messages)
        await sleep_until(self.marks["c"] + sizes.throttle_seconds)
        await stubs.behave(LEGACY, fixed_status=0, retry_after_seconds=1)
        self.marks["c_cleared"] = time.monotonic()

    async def recover(self) -> None:
        """Load past the pauses, then every message of every batch delivered."""
        sizes = self.sizes
        await sleep_until(
            self.marks["c"]
            + max(sizes.throttle_seconds, sizes.retry_after)
            + sizes.after_pause_seconds
        )
        self.marks["drain"] = time.monotonic()
        ids = set().union(*(batch.ids for batch in self.batches.values()))
        self.drained = await verify.wait_delivered(
            self.rig, self.resources, ids, timeout=self.scale.drain_timeout, settle_seconds=1
        )
        self.marks["end"] = time.monotonic()
        self.counters["end"] = await self._counters()
        self.sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sampling
        self.dlq = await verify.dlq_messages(self.rig, self.resources)
        self.timeline = [
            e for e in await self.rig.stubs.timeline(LEGACY) if e.path.startswith(f"/{LEGACY}/")
        ]
        self.states = await verify.states_by_id(self.rig, self.resources)

    async def check(self) -> list[Row]:
        dlq_ids = dlq_request_ids(self.dlq)
        rows = [self.row, Row("7b legacy: capacity halved"), Row("7c legacy: 429 Retry-After")]
        for row, phase in zip(rows, "abc", strict=True):
            account(row, self.drained, self.batches[phase], dlq_ids, self.states)
        self._steady(rows[0])
        self._halved(rows[1])
        self._throttled(rows[2])
        seconds = (time.monotonic() - self.started) / len(rows)
        for row in rows:
            row.seconds = seconds
        return rows

    def _steady(self, row: Row) -> None:
        sizes, marks = self.sizes, self.marks
        window = in_window(self.timeline, marks["a"], marks["b"])
        half = (marks["b"] - marks["a"]) / 2
        row.notes.update(
            measure(window, marks["b"] - marks["a"], sizes.capacity, sizes.latency),
            second_half=measure(
                in_window(window, marks["a"] + half), half, sizes.capacity, sizes.latency
            ),
            target=f"K={sizes.capacity} at {sizes.latency * 1000:.0f} ms, Q={sizes.queue}, "
            f"503 + Retry-After: 1 beyond; {PROCESSES} processes",
            goals=">= 0.9 of max goodput, < 1% refused, p99 <= 2x unloaded (reported, not checked)",
            limit_sum_end=self.sampler.around(marks["b"] - marks["a"] - 2, marks["b"] - marks["a"]),
            messages_retried=self.counters["a"]["retried"],
            limit_series=self.sampler.samples,
        )

    def _halved(self, row: Row) -> None:
        sizes, marks = self.sizes, self.marks
        window = in_window(self.timeline, marks["b"], marks["c"])
        refused_at = [e.arrival for e in refused(window)]
        half = (marks["c"] - marks["b"]) / 2
        row.recover_s = round(max(refused_at) - marks["b"], 2) if refused_at else 0.0
        row.notes.update(
            measure(window, marks["c"] - marks["b"], max(1, sizes.capacity // 2), sizes.latency),
            capacity=f"{sizes.capacity} -> {max(1, sizes.capacity // 2)}",
            second_half=measure(
                in_window(window, marks["b"] + half),
                half,
                max(1, sizes.capacity // 2),
                sizes.latency,
            ),
            limit_sum_before=self.sampler.around(
                marks["b"] - marks["a"] - 1.5, marks["b"] - marks["a"]
            ),
            limit_sum_end=self.sampler.around(
                marks["c"] - marks["a"] - 1.5, marks["c"] - marks["a"]
            ),
            messages_retried=self.counters["b"]["retried"] - self.counters["a"]["retried"],
            recover="capacity halved -> the last call refused for capacity",
        )

    def _throttled(self, row: Row) -> None:
        sizes = self.sizes
        paths = [path_of(i) for i in range(PROCESSES)]
        # The whole timeline: the first 429s answer calls that arrived before the fault began.
        pauses = pauses_after_first_429(self.timeline, paths, sizes.retry_after)
        resumed = [p["next_call_after_s"] for p in pauses.values() if p.get("next_call_after_s")]
        row.recover_s = max(resumed) if resumed else None
        row.notes.update(
            throttle_seconds=sizes.throttle_seconds,
            retry_after_s=sizes.retry_after,
            pauses={
                path: {k: v for k, v in p.items() if k != "first_429"} for path, p in pauses.items()
            },
            messages_retried=self.counters["end"]["retried"] - self.counters["b"]["retried"],
            recover="first 429 -> the process's next call (slowest process)",
        )
        for path, pause in pauses.items():
            if pause["first_429"] is None:
                row.check(False, f"{path} got no 429: the fault never reached that process")
                continue
            row.check(
                pause["calls_in_pause"] == 0,
                f"{path} made {pause['calls_in_pause']} calls during the {sizes.retry_after:g}s "
                f"Retry-After pause after its first 429 (at +{pause['in_pause_after_s']} s)",
            )

    async def _counters(self) -> dict[str, float]:
        retried = 0.0
        for process in self.processes:
            with contextlib.suppress(Exception):
                retried += await metric(
                    process, "courier_messages_processed_total", outcome="retried"
                )
        return {"retried": retried}


class FleetCap(Scenario):
    """d: ``fleet_max_concurrency`` at ``LEGACY`` with three processes (full scale: two, then a
    third joins under load).

    A process takes a share of the cap only some time after it joined the fleet (courier's
    ``worker/fleet.py``: three heartbeats, plus the capped target's timeout, plus one beat).
    So ``run`` starts the first processes before a to c (their queue is empty until ``load``),
    the phase is timed from the first call, and a scale-out runs until the joiner has been
    calling for a while. billing's timeout is 1 s here (calls take 0.1 s) to keep the wait
    short.
    """

    sizes: Sizes
    batch: Batch
    settings: list[Settings]
    started_at: float
    loaded_at: float
    first_call: float | None
    joined_at: float | None
    joiner_first_call: float | None
    stats: dict[str, Any]
    timeline: list[TimelineEntry]
    states: dict[str, str]

    async def setup(self) -> None:
        """Sealed messages and the first processes (``run`` starts them before a to c, so that
        their join wait passes meanwhile: their queue stays empty until ``load``)."""
        rig = self.rig
        sizes = self.sizes = SIZES[self.scale.name]
        self.row = Row("7d legacy: fleet cap")
        self.resources = await rig.fresh("legacy-cap")
        self.stack.push_async_callback(restore, rig)
        settings = worker_settings(rig, self)
        # The processes hold messages while a joiner waits to join; it must still find some.
        held = PROCESSES * settings.worker.max_in_flight
        seconds = sizes.fleet_seconds + (JOIN_WAIT_ESTIMATE if sizes.scale_out else 0)
        rate = sizes.fleet_cap / sizes.latency
        self.batch = await seal(rig, self, held + math.ceil(rate * seconds * BACKLOG_FACTOR))
        cap = {"fleet_max_concurrency": sizes.fleet_cap, "timeout_seconds": 1.0}
        self.settings = [per_process(settings, i, **cap) for i in range(PROCESSES)]
        self.started_at = time.monotonic()
        await start(self, self.settings[: self._first_processes], "legacy-cap")
        self.joined_at = self.joiner_first_call = None

    @property
    def _first_processes(self) -> int:
        return PROCESSES - 1 if self.sizes.scale_out else PROCESSES

    async def load(self) -> None:
        """billing as a legacy system that could take more than the cap (so the cap, not the
        stub, must hold the fleet back); the backlog; then wait for the first call."""
        sizes, stubs = self.sizes, self.rig.stubs
        await stubs.reset()  # the peak and the timeline start here
        await stubs.behave(
            LEGACY,
            latency_seconds=sizes.latency,
            capacity=sizes.capacity,
            queue=sizes.queue,
            retry_after_seconds=1,
        )
        self.loaded_at = time.monotonic()
        await preload(self.rig, self.resources.queue_url, self.batch.messages)
        self.first_call = await first_call(self.rig, self.loaded_at, JOIN_WAIT_BOUND)

    async def fault(self) -> None:
        """Scale-out (full scale): the last process starts a third of the way in, under load;
        the run goes on a third of the phase after its first call."""
        sizes = self.sizes
        if self.first_call is None:
            return  # nobody called: the check says so, the drain would only time out
        if not sizes.scale_out:
            await sleep_until(self.first_call + sizes.fleet_seconds)
            return
        await sleep_until(self.first_call + sizes.fleet_seconds / 3)
        last = PROCESSES - 1
        await start(self, self.settings[last:], "legacy-cap", first=last)
        self.joined_at = time.monotonic()
        self.joiner_first_call = await first_call(
            self.rig, self.joined_at, JOIN_WAIT_BOUND, path_of(last)
        )
        await sleep_until((self.joiner_first_call or 0.0) + sizes.fleet_seconds / 3)

    async def recover(self) -> None:
        timeout = self.scale.drain_timeout if self.first_call is not None else 1.0
        self.drained = await verify.wait_delivered(
            self.rig, self.resources, self.batch.ids, timeout=timeout, settle_seconds=1
        )
        self.stats = await self.rig.stubs.stats(LEGACY)
        self.dlq = await verify.dlq_messages(self.rig, self.resources)
        self.timeline = [
            e for e in await self.rig.stubs.timeline(LEGACY) if e.path.startswith(f"/{LEGACY}/")
        ]
        self.states = await verify.states_by_id(self.rig, self.resources)

    async def check(self) -> list[Row]:
        row, sizes = self.row, self.sizes
        account(row, self.drained, self.batch, dlq_request_ids(self.dlq), self.states)
        peak = int(self.stats["peak_concurrent"])
        row.notes.update(fleet_cap=sizes.fleet_cap, peak_concurrent=peak)
        row.check(
            peak <= sizes.fleet_cap,
            f"the target saw {peak} calls open at once, above the fleet cap of {sizes.fleet_cap}",
        )
        row.check(
            self.first_call is not None,
            f"no call to {LEGACY} within {JOIN_WAIT_BOUND:g}s of the backlog planted",
        )
        if self.first_call is not None:
            self._report(row, self.first_call)
        row.seconds = time.monotonic() - self.loaded_at
        return [row]

    def _report(self, row: Row, first: float) -> None:
        sizes = self.sizes
        steady = in_window(self.timeline, first, first + sizes.fleet_seconds)
        measured = measure(steady, sizes.fleet_seconds, sizes.fleet_cap, sizes.latency)
        row.recover_s = round(first - self.loaded_at, 1)
        row.notes.update(
            {k: measured[k] for k in ("goodput_per_s", "goodput_of_max", "p99_at_target_ms")},
            refused_by_target=self.stats["refused"],
            processes_started_s_before_load=round(self.loaded_at - self.started_at, 1),
            first_call_after_load_s=row.recover_s,
            calls_per_process={
                path_of(i): sum(1 for e in self.timeline if e.path == path_of(i))
                for i in range(PROCESSES)
            },
            recover="backlog planted -> first call to the capped target",
        )
        if self.joined_at is not None:
            joiner = self.joiner_first_call
            row.notes.update(
                scale_out=f"process {PROCESSES - 1} started {self.joined_at - first:.1f}s "
                "after the first call",
                joiner_first_call_after_start_s=None
                if joiner is None
                else round(joiner - self.joined_at, 1),
                peak_after_scale_out=peak(
                    in_window(self.timeline, self.joined_at), include_refused=False
                ),
            )
            row.check(joiner is not None, "the process that joined never called the target")


async def first_call(rig: Rig, since: float, bound: float, path: str = "") -> float | None:
    """The arrival of the first call to ``LEGACY`` after ``since`` (on ``path`` if given); None
    if there is none within ``bound`` seconds."""
    deadline = time.monotonic() + bound
    seen = since
    while time.monotonic() < deadline:
        entries = await rig.stubs.timeline(LEGACY, since=seen)
        found = [
            e.arrival for e in entries if e.arrival >= since and e.path.startswith(path or "/")
        ]
        if found:
            return min(found)
        if entries:
            seen = max(e.end for e in entries)
        await asyncio.sleep(SAMPLE_SECONDS)
    return None


def worker_settings(rig: Rig, scenario: Scenario) -> Settings:
    scale = scenario.scale
    return rig.settings(
        scenario.resources,
        "worker",
        worker={
            "wait_seconds": 1,
            "visibility_timeout_seconds": scale.visibility,
            "backoff_base_seconds": scale.backoff[0],
            "backoff_max_seconds": scale.backoff[1],
        },
    )


async def start(
    scenario: Scenario, settings: Sequence[Settings], name: str, first: int = 0
) -> list[CourierProcess]:
    """One process per settings, started together; each stops with ``scenario.stack``."""
    fleets = [Fleet(scenario.rig, one, f"{name}-{first + i}", 1) for i, one in enumerate(settings)]
    for one in fleets:
        scenario.stack.push_async_callback(one.stop)
    await asyncio.gather(*(one.start() for one in fleets))
    return [process for one in fleets for process in one.alive()]


async def restore(rig: Rig) -> None:
    """billing's knobs back to their defaults (latency, capacity, queue, statuses)."""
    await rig.stubs.behave(LEGACY, **DEFAULT_BEHAVIOUR)


async def sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """Four rows: adaptive limits, capacity halved, 429 + Retry-After, fleet cap.

    d's steps, with a to c between its setup and its load: a process joining a capped fleet
    takes no share for about 25 s, and that wait passes while a to c run.
    """
    capped = FleetCap(rig, scale)
    async with capped.stack:
        await capped.setup()
        rows = await LegacyPhases(rig, scale).steps()
        await capped.load()
        await capped.fault()
        await capped.recover()
    return rows + await capped.check()
