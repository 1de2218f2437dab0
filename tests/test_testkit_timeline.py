"""courier_testkit.timeline: the arithmetic bench.capacity and chaos's legacy scenario share.

Hand-made timelines with known answers; no stub is started.
"""

from __future__ import annotations

import pytest

from courier_testkit import timeline
from courier_testkit.timeline import TimelineEntry


def entry(arrival: float, end: float, status: int = 200, waited: float = 0.0) -> TimelineEntry:
    return TimelineEntry(arrival, end, status, waited, "/legacy/p0")


def test_served_refused_and_since_pick_calls_by_status_and_arrival() -> None:
    calls = [entry(0.0, 0.1), entry(0.5, 0.501, 503), entry(1.0, 1.001, 429), entry(1.0, 1.2, 404)]
    assert timeline.served(calls) == calls[:1]
    assert timeline.refused(calls) == calls[1:3]
    assert timeline.since(calls, 1.0) == calls[2:]


def test_a_window_holds_the_calls_that_arrived_and_ended_inside_it() -> None:
    calls = [entry(i / 10, (i + 1) / 10) for i in range(99)]
    assert timeline.in_window(calls, 1.0, 2.0) == calls[10:19]
    assert timeline.in_window(calls, 9.0) == calls[90:]


def test_latency_is_of_served_calls_only_and_includes_the_queue_wait() -> None:
    calls = [entry(0.0, 0.1), entry(0.0, 0.25, waited=0.15), entry(0.0, 0.001, 503)]
    assert sorted(timeline.latencies(calls)) == pytest.approx([0.1, 0.25])


def test_peak_counts_overlaps_not_back_to_back_calls() -> None:
    back_to_back = [entry(0.0, 1.0), entry(1.0, 2.0), entry(2.0, 3.0)]
    assert timeline.peak(back_to_back, include_refused=True) == 1
    overlapping = [entry(0.0, 1.0), entry(0.5, 1.5), entry(0.9, 1.2, 503)]
    assert timeline.peak(overlapping, include_refused=True) == 3
    # chaos counts the calls the target took on: a refusal is not one of them.
    assert timeline.peak(overlapping, include_refused=False) == 2
    assert timeline.peak([], include_refused=True) == 0
    calls = [entry(i / 10, (i + 1) / 10) for i in range(99)] + [entry(5.0, 5.001, 503)]
    assert timeline.peak(calls, include_refused=False) == 1
    assert timeline.peak([*calls, entry(0.05, 0.3), entry(0.06, 0.2)], include_refused=False) == 3


def test_the_longest_gap_after_a_429_starts_at_its_arrival() -> None:
    calls = [
        entry(0.0, 0.1),
        entry(0.5, 0.6),
        entry(1.0, 1.001, 429),
        entry(1.01, 1.11),
        entry(6.2, 6.3),
        entry(6.3, 6.4),
    ]
    first = timeline.first_with_status(calls, 429)
    assert first is not None
    assert first.arrival == 1.0
    gap, began = timeline.longest_gap(calls, first.arrival)
    assert gap == pytest.approx(5.19)
    assert began == pytest.approx(1.01)
    # Nothing after the start: no gap (the end of the run is not one).
    assert timeline.longest_gap(calls, 7.0) == (0.0, 7.0)
    assert timeline.first_with_status(calls, 418) is None
