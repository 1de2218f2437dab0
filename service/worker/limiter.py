"""How many calls one process may have open at once towards one legacy system.

The legacy systems set the pace (DESIGN.md). A fixed number of concurrent calls per process
is wrong in both directions: too many for a struggling target, and multiplied by every
instance the Auto Scaling group adds. ``ConcurrencyLimit`` instead *finds* the target's
capacity from what its calls show, in the family of TCP Vegas and Netflix's
concurrency-limits (Gradient2):

- It keeps ``min_rtt``, the lowest call latency seen lately: the latency of a call that did
  not queue anywhere.
- Once per window (the calls made under the current limit: about one ``min_rtt``, at least
  ``MIN_WINDOW_CALLS``), it compares the window's mean latency with ``min_rtt``:
  - near it (under ``GROW_BELOW`` times) while the limit was in use: one more slot, or twice
    the limit until the first sign of congestion (slow start, as TCP's);
  - well above it (over ``SHRINK_ABOVE`` times): the target is queueing our calls, so
    ``SHRINK_FACTOR`` of the limit is kept;
  - a window where more than ``DROP_TOLERANCE`` of the calls (and more than one) dropped
    (429, 502-504, a timeout, a refused connection) keeps ``DROP_FACTOR``. Fewer drops are a flaky target's,
    not an overloaded one's.
  Other answers (a 400, a 500) are no sample at all: a refusal often comes back at once.
- It starts at ``INITIAL_LIMIT`` and stays within the floor and the ceiling.

Every process decides on the same signal, the target's latency, which all of them share. So
N processes converge on the concurrency where the target's latency sits between the two
bounds, whatever N is, as N TCP flows share a link, and no coordination is needed. A
fleet-wide cap, when one is agreed with a target's owners, comes on top through
``set_cap`` (``service/worker/fleet.py``).

Calls over the limit wait here, in FIFO order, rather than at the target: the message stays
in flight (its visibility is extended by the heartbeat) and no call adds to the target's
queue. With ``adaptive=False`` the limit is the ceiling, always (the old fixed limit).

Nothing here runs per call beyond a few additions: the window's arithmetic runs once per
window, and the gauges are read by Prometheus when it scrapes (``set_function``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from enum import Enum

from .. import metrics

log = logging.getLogger("courier.limiter")

GROW_BELOW = 1.2  # mean latency under 1.2 times min_rtt: the target is not queueing our calls
SHRINK_ABOVE = 1.5  # over 1.5 times min_rtt: it is; a p99 near twice the unloaded latency follows
SHRINK_FACTOR = 0.9
DROP_FACTOR = 0.75
# Drops up to this share of a window's calls are taken for a flaky target, not an overloaded
# one: random failures must not drive the limit to its floor (as random loss does TCP Reno).
DROP_TOLERANCE = 0.25
MIN_WINDOW_CALLS = 4  # fewer make a share of drops (and a mean latency) mostly noise
QUEUEING_MARGIN_SECONDS = 0.01  # latency above min_rtt that counts as queueing, at least
INITIAL_LIMIT = 4
SLOW_START_FACTOR = 2.0
MIN_WINDOW_SECONDS = 0.01
# The latency a call shows when nothing queues it is remembered for two buckets of this
# length: long enough that a standing queue does not become the new baseline at once, short
# enough that a target that really got slower is believed within a minute or two.
MIN_RTT_BUCKET_SECONDS = 60.0
LOG_INTERVAL_SECONDS = 5.0  # at most one limit_changed line per target per interval
CONSTRAINED_AFTER_SECONDS = 120.0


class NoSlotsError(Exception):
    """The limit is 0 (this process holds no share of a fleet-wide cap): no call may start."""


class CallOutcome(Enum):
    """What a finished call says about the target's capacity."""

    OK = "ok"  # answered: its latency is a sample
    DROPPED = "dropped"  # overloaded or unreachable: 429, 502-504, timeout, connection error
    IGNORED = "ignored"  # says nothing about capacity (a refusal, a cancelled call)


class ConcurrencyLimit:
    """An adaptive (or fixed) bound on concurrent calls to one target, with a FIFO wait."""

    def __init__(
        self,
        target: str,
        *,
        floor: int,
        ceiling: int,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.adaptive = adaptive
        self._floor = floor
        self._ceiling = ceiling
        self._clock = clock
        # An adaptive limit starts low and grows a slot per window: a new process (scale-out)
        # must not open with a burst on a target the fleet already keeps busy. Not at 1: one
        # slow call would then hold every other call back until it ends.
        self._estimate = float(max(floor, min(ceiling, INITIAL_LIMIT)) if adaptive else ceiling)
        self._cap: int | None = None
        # Until the first sign of congestion the limit doubles per window, as TCP's slow
        # start: a target at 1.6 s that needs 100 calls at once would take minutes to reach
        # them one slot per window.
        self._slow_start = adaptive
        self._changed_at = -math.inf  # when the estimate last moved
        self.in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._window = _Window(clock())
        self._min_rtt = _MinRtt(MIN_RTT_BUCKET_SECONDS)
        self._saturated_since: float | None = None
        self._last_log = -math.inf
        self.last_change = 0
        self._export()

    @property
    def limit(self) -> int:
        """Calls allowed at once now: the adaptive estimate, under the fleet share if any."""
        estimate = int(self._estimate)
        return estimate if self._cap is None else min(estimate, self._cap)

    @property
    def min_rtt(self) -> float:
        """The lowest recent call latency, in seconds (0.0 before any call)."""
        return self._min_rtt.value

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return len(self._waiters)

    @property
    def constrained(self) -> bool:
        """Whether this limit, not the ceiling, has held calls back for minutes.

        Calls have waited for a slot without a break for ``CONSTRAINED_AFTER_SECONDS``, and
        the limit is below the ceiling now: the target's latency (or its fleet share) is what
        bounds delivery, and more processes would not deliver more.
        """
        since = self._saturated_since
        if since is None or self.limit >= self._ceiling:
            return False
        return self._clock() - since >= CONSTRAINED_AFTER_SECONDS

    def recovered(self) -> None:
        """The target is back after an outage (its circuit closed): find its capacity afresh,
        doubling per window, rather than a slot at a time from the floor the outage left."""
        if self.adaptive:
            self._slow_start = True
            self._window = _Window(self._clock())  # its drops belong to the outage

    def set_cap(self, cap: int | None) -> None:
        """Bound the limit by this process's share of a fleet-wide cap (None: no cap)."""
        self._cap = cap
        self._wake()

    async def acquire(self) -> float:
        """Wait for a slot; returns the time the call starts, for ``release``.

        Raises NoSlotsError at once when the limit is 0, and for calls still waiting when it
        drops to 0: their messages are better back in the queue, where a process with a share
        can take them, than held here for as long as the share stays 0.
        """
        if self.limit == 0:
            raise NoSlotsError(self.target)
        if not self._waiters and self.in_use < self.limit:
            self.in_use += 1
            return self._clock()
        if self._saturated_since is None:
            self._saturated_since = self._clock()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(0.0, CallOutcome.IGNORED)  # the slot was handed over: give it back
            elif waiter in self._waiters:  # _wake may have dropped it already (cancelled)
                self._waiters.remove(waiter)
            raise
        return self._clock()

    def release(self, started: float, outcome: CallOutcome) -> None:
        """Give the slot back; the call's latency and outcome steer the limit."""
        self.in_use -= 1
        if self.adaptive and outcome is not CallOutcome.IGNORED:
            self._sample(started, outcome)
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        if self.limit == 0:
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(NoSlotsError(self.target))
        while waiters and self.in_use < self.limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)
        if not waiters:
            self._saturated_since = None

    def _sample(self, started: float, outcome: CallOutcome) -> None:
        now = self._clock()
        window = self._window
        if outcome is CallOutcome.OK:
            self._min_rtt.add(now - started, now)
        # Only calls made under the current limit judge it. A call started before the last
        # change says how the old limit did: doubling on it overshoots (slow start would
        # quadruple before the first sign of congestion arrived), and cutting on it cuts
        # twice for one overload.
        if started >= self._changed_at:
            if outcome is CallOutcome.DROPPED:
                window.drops += 1
            else:
                window.count += 1
                window.total += now - started
        window.busiest = max(window.busiest, self.in_use + 1)
        if self._window_over(window, now):
            self._adapt(window)
            self._window = _Window(now)

    def _window_over(self, window: _Window, now: float) -> bool:
        """A window judges a whole limit's worth of calls (or two min_rtt's worth), never fewer
        than MIN_WINDOW_CALLS: drops come back faster than answers, so a window closed at its
        first few calls would hold mostly drops."""
        calls = window.count + window.drops
        elapsed = (now - window.started) / max(self._min_rtt.value, MIN_WINDOW_SECONDS)
        return calls >= MIN_WINDOW_CALLS and (
            (elapsed >= 1 and calls >= self.limit) or elapsed >= 2
        )

    def _adapt(self, window: _Window) -> None:
        before = self.limit
        estimate = self._estimate
        reason = self._verdict(window)
        if reason == "drop":
            self._slow_start = False
            estimate *= DROP_FACTOR
        elif reason == "latency":
            self._slow_start = False
            estimate *= SHRINK_FACTOR
        elif reason == "probe":
            estimate = estimate * SLOW_START_FACTOR if self._slow_start else estimate + 1
        else:
            return
        self._estimate = min(float(self._ceiling), max(float(self._floor), estimate))
        self._changed_at = self._clock()
        if self.limit != before:
            self._changed(before, reason, window)

    def _verdict(self, window: _Window) -> str | None:
        """What the window says: "drop", "latency" (the target queues our calls), "probe"
        (room for more) or None (hold)."""
        # "+ 1": in a window of a few calls, one random failure is not a quarter's worth.
        if window.drops > DROP_TOLERANCE * (window.count + window.drops) + 1:
            return "drop"
        unloaded = self._min_rtt.value
        if not window.count or unloaded <= 0:
            return None
        mean = window.total / window.count
        # Both a ratio and a margin: for a target answering in 2 ms, a few ms of courier's
        # own event-loop lag would otherwise look like the target queueing.
        if mean > unloaded * SHRINK_ABOVE and mean - unloaded > QUEUEING_MARGIN_SECONDS:
            return "latency"
        near = mean < unloaded * GROW_BELOW or mean - unloaded < QUEUEING_MARGIN_SECONDS / 2
        # Only a limit in use is tested: an idle one proves nothing.
        if near and window.busiest >= int(self._estimate):
            return "probe"
        return None

    def _changed(self, before: int, reason: str, window: _Window) -> None:
        self.last_change = self.limit - before
        direction = "up" if self.last_change > 0 else "down"
        metrics.target_limit_changes.labels(self.target, direction).inc()
        now = self._clock()
        if now - self._last_log < LOG_INTERVAL_SECONDS:
            return
        self._last_log = now
        mean = window.total / window.count if window.count else 0.0
        log.info(
            "target %s concurrency limit %d -> %d",
            self.target,
            before,
            self.limit,
            extra={
                "fields": {
                    "event": "limit_changed",
                    "target": self.target,
                    "limit": self.limit,
                    "previous": before,
                    "reason": reason,
                    "latency_ms": round(mean * 1000, 1),
                    "min_rtt_ms": round(self._min_rtt.value * 1000, 1),
                    "drops": window.drops,
                }
            },
        )

    def _export(self) -> None:
        # Read when Prometheus scrapes, so no call pays for them.
        name = self.target
        metrics.target_concurrency_limit.labels(name).set_function(lambda: self.limit)
        metrics.target_concurrency_in_use.labels(name).set_function(lambda: self.in_use)
        metrics.target_min_rtt.labels(name).set_function(lambda: self.min_rtt)
        metrics.target_limit_last_change.labels(name).set_function(lambda: self.last_change)


class _Window:
    """The samples of one adaptation window."""

    __slots__ = ("busiest", "count", "drops", "started", "total")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.total = 0.0
        self.drops = 0
        self.busiest = 0


class _MinRtt:
    """The minimum of the latencies seen in the current and the previous bucket."""

    def __init__(self, bucket_seconds: float) -> None:
        self._bucket_seconds = bucket_seconds
        self._bucket_started = -math.inf
        self._current = math.inf
        self._previous = math.inf
        self.value = 0.0

    def add(self, rtt: float, now: float) -> None:
        elapsed = now - self._bucket_started
        if elapsed >= self._bucket_seconds:
            # After an idle spell longer than a bucket, the current one is old news as well.
            recent = elapsed < 2 * self._bucket_seconds
            self._previous = self._current if recent else math.inf
            self._current = math.inf
            self._bucket_started = now
        self._current = min(self._current, rtt)
        self.value = min(self._current, self._previous)
