"""Arithmetic on a stub's timeline (``StubProcess.timeline``): which calls were served or
refused, which fell in a window, how long they took, how many were open at once.

One set for every caller that measures at the target (``bench.capacity`` and
``chaos.scenarios.legacy``), so the two report the same thing by the same name. Times are
the stub's, on the system-wide monotonic clock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from service.stubs.base import TimelineEntry

__all__ = [
    "OVERLOAD_STATUSES",
    "TimelineEntry",
    "first_with_status",
    "in_window",
    "latencies",
    "longest_gap",
    "peak",
    "refused",
    "served",
    "since",
]

# What the stub answers a call beyond its capacity and queue (``Behaviour.overload_status``).
OVERLOAD_STATUSES = (429, 503)


def served(entries: Iterable[TimelineEntry]) -> list[TimelineEntry]:
    """The calls answered 2xx (effects)."""
    return [e for e in entries if 200 <= e.status < 300]


def refused(entries: Iterable[TimelineEntry]) -> list[TimelineEntry]:
    """The calls the target refused as overloaded (429 or 503)."""
    return [e for e in entries if e.status in OVERLOAD_STATUSES]


def since(entries: Iterable[TimelineEntry], t0: float) -> list[TimelineEntry]:
    """The calls that arrived at or after ``t0``."""
    return [e for e in entries if e.arrival >= t0]


def in_window(
    entries: Iterable[TimelineEntry], start: float, end: float = math.inf
) -> list[TimelineEntry]:
    """The calls that arrived and were answered in [start, end): a call that straddles a
    change of behaviour belongs to neither side (e.g. one that arrived before the 429s began
    but was answered 429 is no refusal for capacity)."""
    return [e for e in entries if start <= e.arrival and e.end < end]


def latencies(entries: Iterable[TimelineEntry]) -> list[float]:
    """end - arrival of the served (2xx) calls, seconds: what the target's clients wait,
    the time in its queue included."""
    return [e.end - e.arrival for e in served(entries)]


def peak(entries: Iterable[TimelineEntry], *, include_refused: bool) -> int:
    """The most calls open at the target at once (arrival to end, queued ones included);
    refused calls count while open only with ``include_refused``.

    A call ending at the instant another arrives is not counted with it.
    """
    counted = [e for e in entries if include_refused or e.status not in OVERLOAD_STATUSES]
    # (time, -1) sorts before (time, +1): an end before an arrival at the same instant.
    events = sorted([(e.arrival, 1) for e in counted] + [(e.end, -1) for e in counted])
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


def longest_gap(entries: Iterable[TimelineEntry], start: float) -> tuple[float, float]:
    """(the longest time without a call arriving, counted from ``start``; when it began).

    The gaps are between ``start`` and the first arrival after it, and between consecutive
    arrivals after it (the time after the last arrival is not a gap: the run was over).
    """
    times = sorted([start] + [e.arrival for e in entries if e.arrival > start])
    best, began = 0.0, start
    for before, after in itertools.pairwise(times):
        if after - before > best:
            best, began = after - before, before
    return best, began


def first_with_status(entries: Sequence[TimelineEntry], status: int) -> TimelineEntry | None:
    """The first call (by arrival) answered ``status``."""
    return next((e for e in sorted(entries) if e.status == status), None)
