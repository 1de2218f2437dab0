"""ConcurrencyLimit: how the limit follows latency and drops, the FIFO wait, caps, the signal."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from service.worker.limiter import (
    CONSTRAINED_AFTER_SECONDS,
    DROP_FACTOR,
    INITIAL_LIMIT,
    MIN_RTT_BUCKET_SECONDS,
    CallOutcome,
    ConcurrencyLimit,
    NoSlotsError,
)

UNLOADED = 0.1  # the target's latency when nothing queues


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, *, floor: int = 1, ceiling: int = 32, **kwargs: bool) -> ConcurrencyLimit:
    return ConcurrencyLimit("crm", floor=floor, ceiling=ceiling, clock=clock, **kwargs)


async def window(
    limit: ConcurrencyLimit,
    clock: Clock,
    latency: float,
    outcome: CallOutcome = CallOutcome.OK,
    calls: int | None = None,
) -> None:
    """Run one window: ``calls`` (default: the whole limit) calls that take ``latency``."""
    count = limit.limit if calls is None else calls
    started = [await limit.acquire() for _ in range(count)]
    clock.now += latency
    for start in started:
        limit.release(start, outcome)


async def test_the_limit_doubles_until_congestion_then_grows_a_slot_at_a_time() -> None:
    clock = Clock()
    limit = limiter(clock, ceiling=1000)
    assert limit.limit == INITIAL_LIMIT  # a new process starts low
    seen = []
    for _ in range(4):
        await window(limit, clock, UNLOADED)
        seen.append(limit.limit)
    assert seen == [INITIAL_LIMIT * 2**n for n in range(1, 5)]  # slow start
    assert limit.min_rtt == pytest.approx(UNLOADED)
    await window(limit, clock, UNLOADED * 2)  # the target queues: congestion...
    peak = limit.limit  # (...seen one window late: a window closes at a release after it)
    await window(limit, clock, UNLOADED * 2)
    await window(limit, clock, UNLOADED)
    after_congestion = limit.limit
    assert after_congestion < peak
    for _ in range(5):
        await window(limit, clock, UNLOADED)
    assert limit.limit == after_congestion + 5  # one slot per window from now on


async def test_an_idle_limit_is_not_raised() -> None:
    clock = Clock()
    limit = limiter(clock, floor=4)
    for _ in range(10):
        await window(limit, clock, UNLOADED, calls=1)  # 1 call in use of 4: proves nothing
    assert limit.limit == 4


async def test_the_limit_shrinks_when_the_target_queues_the_calls() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1)
    while limit.limit < 20:
        await window(limit, clock, UNLOADED)
    before = limit.limit
    for _ in range(4):  # a window closes at its first release after it ends: one lags
        await window(limit, clock, UNLOADED * 2)  # twice the unloaded latency: queueing
    assert limit.limit < before * 0.8
    await window(limit, clock, UNLOADED * 1.45)  # between the bounds: hold
    held = limit.limit
    await window(limit, clock, UNLOADED * 1.45)
    assert limit.limit == held


async def mixed_window(
    limit: ConcurrencyLimit, clock: Clock, latency: float, dropped_share: float
) -> None:
    """One window of the whole limit's calls, ``dropped_share`` of them dropped."""
    started = [await limit.acquire() for _ in range(limit.limit)]
    clock.now += latency
    dropped = round(len(started) * dropped_share)
    for index, start in enumerate(started):
        limit.release(start, CallOutcome.DROPPED if index < dropped else CallOutcome.OK)


async def test_drops_cut_the_limit_but_never_below_the_floor() -> None:
    clock = Clock()
    limit = limiter(clock, floor=3)
    while limit.limit < 20:
        await window(limit, clock, UNLOADED)
    before = limit.limit
    await mixed_window(limit, clock, UNLOADED, 0.5)
    await mixed_window(limit, clock, UNLOADED, 0.5)  # a window closes one release late
    assert limit.limit <= int(before * DROP_FACTOR)
    for _ in range(20):
        await mixed_window(limit, clock, UNLOADED, 0.75)
    assert limit.limit == 3


async def test_a_flaky_target_s_occasional_drops_do_not_cut_the_limit() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1)
    while limit.limit < 16:
        await window(limit, clock, UNLOADED)
    for _ in range(20):
        await mixed_window(limit, clock, UNLOADED, 0.125)  # 1 call in 8 fails, at random
    assert limit.limit >= 16  # a share of drops under DROP_TOLERANCE is not overload


async def test_the_ceiling_bounds_the_limit() -> None:
    clock = Clock()
    limit = limiter(clock, ceiling=5)
    for _ in range(20):
        await window(limit, clock, UNLOADED)
    assert limit.limit == 5


async def test_ignored_outcomes_do_not_move_the_limit() -> None:
    clock = Clock()
    limit = limiter(clock, floor=2)
    await window(limit, clock, UNLOADED)
    before = limit.limit
    for _ in range(5):
        await window(limit, clock, 5.0, CallOutcome.IGNORED)  # refusals say nothing of capacity
    assert limit.limit == before


async def test_a_fixed_limit_never_moves() -> None:
    clock = Clock()
    limit = limiter(clock, ceiling=32, adaptive=False)
    assert limit.limit == 32
    for _ in range(5):
        await window(limit, clock, 5.0, CallOutcome.DROPPED)
    assert limit.limit == 32


async def test_calls_over_the_limit_wait_in_order() -> None:
    clock = Clock()
    limit = limiter(clock, floor=2, ceiling=2)
    first, second = await limit.acquire(), await limit.acquire()
    order: list[int] = []

    async def call(number: int) -> None:
        started = await limit.acquire()
        order.append(number)
        limit.release(started, CallOutcome.IGNORED)

    waiting = [asyncio.create_task(call(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert (limit.in_use, limit.waiting) == (2, 3)
    limit.release(first, CallOutcome.IGNORED)
    limit.release(second, CallOutcome.IGNORED)
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2]
    assert (limit.in_use, limit.waiting) == (0, 0)


async def test_a_cancelled_wait_gives_its_slot_back() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1)
    held = await limit.acquire()
    queued = asyncio.create_task(limit.acquire())
    handed_over = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    queued.cancel()  # cancelled while waiting
    await asyncio.sleep(0)
    limit.release(held, CallOutcome.IGNORED)  # the slot goes to handed_over...
    handed_over.cancel()  # ...which is cancelled before it runs
    for task in (queued, handed_over):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (limit.in_use, limit.waiting) == (0, 0)
    await asyncio.wait_for(limit.acquire(), 1)  # the slot is free again


async def test_a_fleet_share_caps_the_limit_and_a_raise_wakes_the_waiters() -> None:
    clock = Clock()
    limit = limiter(clock, floor=8, ceiling=8)
    limit.set_cap(1)
    held = await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    limit.set_cap(3)
    await asyncio.wait_for(waiting, 1)
    assert limit.limit == 3
    limit.release(held, CallOutcome.IGNORED)
    limit.set_cap(None)
    assert limit.limit == 8


async def test_constrained_after_minutes_of_waiting_below_the_ceiling() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=8)
    held = [await limit.acquire() for _ in range(limit.limit)]
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    assert not limit.constrained
    clock.now += CONSTRAINED_AFTER_SECONDS
    assert limit.constrained
    for started in held:
        limit.release(started, CallOutcome.IGNORED)
    await waiting
    assert not limit.constrained  # nobody waits any more


async def test_waiting_at_the_ceiling_is_not_the_target_s_fault() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1)
    held = await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    clock.now += CONSTRAINED_AFTER_SECONDS * 2
    assert not limit.constrained  # courier's own ceiling holds the calls: more instances help
    limit.release(held, CallOutcome.IGNORED)
    await waiting


async def test_changes_are_counted_exported_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limit = ConcurrencyLimit("billing", floor=1, ceiling=32, clock=clock)
    with caplog.at_level(logging.INFO, logger="courier.limiter"):
        for _ in range(10):
            await window(limit, clock, UNLOADED)  # 4 -> 8 -> 16 -> 32 within one second
    changes = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "limit_changed"
    ]
    assert len(changes) == 1
    assert changes[0].fields == {  # type: ignore[attr-defined]
        "event": "limit_changed",
        "target": "billing",
        "limit": INITIAL_LIMIT * 2,
        "previous": INITIAL_LIMIT,
        "reason": "probe",
        "latency_ms": 100.0,
        "min_rtt_ms": 100.0,
        "drops": 0,
    }

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"target": "billing", **labels})

    assert sample("courier_target_limit_changes_total", direction="up") == 3
    assert sample("courier_target_concurrency_limit") == 32
    assert sample("courier_target_concurrency_in_use") == 0
    assert sample("courier_target_min_rtt_seconds") == pytest.approx(UNLOADED)
    assert sample("courier_target_limit_last_change") == 16


async def test_a_limit_of_zero_refuses_at_once_and_sends_the_waiters_away() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1)
    held = await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.set_cap(0)  # this process lost its share of a fleet-wide cap
    with pytest.raises(NoSlotsError):
        await waiting
    with pytest.raises(NoSlotsError):
        await limit.acquire()
    limit.release(held, CallOutcome.IGNORED)
    assert (limit.in_use, limit.waiting) == (0, 0)


async def test_a_waiter_cancelled_as_a_slot_frees_raises_cancelled_and_leaks_nothing() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1)
    held = await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    waiting.cancel()  # cancelled, and in the same pass the slot is given back (a drain)
    limit.release(held, CallOutcome.IGNORED)
    with pytest.raises(asyncio.CancelledError):  # not a ValueError from the queue
        await waiting
    assert (limit.in_use, limit.waiting) == (0, 0)


async def test_a_waiter_sent_away_then_cancelled_gives_back_no_slot_it_never_had() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1)
    held = await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.set_cap(0)  # the waiter gets NoSlotsError...
    waiting.cancel()  # ...and is cancelled before it runs
    with pytest.raises((asyncio.CancelledError, NoSlotsError)):
        await waiting
    limit.release(held, CallOutcome.IGNORED)
    assert limit.in_use == 0  # never -1: that would let one call too many through


async def test_an_old_minimum_is_forgotten_after_an_idle_spell() -> None:
    clock = Clock()
    limit = limiter(clock, floor=4)
    await window(limit, clock, UNLOADED)
    clock.now += 3 * MIN_RTT_BUCKET_SECONDS  # idle for longer than two buckets
    await window(limit, clock, UNLOADED * 3)  # the target is slower for good now
    assert limit.min_rtt == pytest.approx(UNLOADED * 3)


async def test_after_an_outage_the_limit_doubles_again() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=1000)
    await window(limit, clock, UNLOADED * 3)  # congestion: slow start is over
    for _ in range(40):
        await mixed_window(limit, clock, UNLOADED, 1.0)  # down: every call dropped
    assert limit.limit == 1
    limit.recovered()  # the circuit closed again
    for _ in range(12):
        await window(limit, clock, UNLOADED)
    assert limit.limit >= 8  # doubling: 1, 2, 4, 8 (a window needs 4 calls), not 1 -> 4


async def test_a_fast_target_s_few_milliseconds_of_jitter_are_not_queueing() -> None:
    clock = Clock()
    limit = limiter(clock, floor=1, ceiling=64)
    await window(limit, clock, 0.002)  # answers in 2 ms when nothing queues
    for _ in range(10):
        await window(limit, clock, 0.006)  # 3x, but 4 ms: courier's own event-loop lag
    assert limit.limit > INITIAL_LIMIT
