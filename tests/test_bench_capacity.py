"""bench.capacity's arithmetic: the stub's timeline and courier's samples turned into numbers.

Hand-made timelines with known answers; nothing is started and matplotlib is not needed.
"""

from __future__ import annotations

import math

import pytest

from bench import capacity
from courier_testkit.timeline import TimelineEntry


def served(arrival: float, seconds: float = 0.1, waited: float = 0.0) -> TimelineEntry:
    return TimelineEntry(arrival, arrival + seconds, 200, waited, "/legacy")


def turned_away(arrival: float, status: int = 503) -> TimelineEntry:
    return TimelineEntry(arrival, arrival + 0.001, status, 0.0, "/legacy")


def test_goodput_counts_2xx_from_the_resume_to_the_last_2xx() -> None:
    # 20 served calls ending between 0.1 and 2.0 s after t0 = 0, and refusals that do not count.
    calls = [served(i * 0.1) for i in range(20)] + [turned_away(0.5), turned_away(2.5)]
    rate, elapsed = capacity.goodput(calls, 0.0)
    assert elapsed == pytest.approx(2.0)
    assert rate == pytest.approx(10.0)
    assert capacity.goodput([turned_away(1.0)], 0.0)[0] == 0.0


def test_steady_goodput_leaves_out_the_first_and_last_tenth() -> None:
    # A slow start (10 calls in 5 s), then 90 at 100/s: the steady rate is the fast part's.
    calls = [served(i * 0.5) for i in range(10)] + [served(5 + i * 0.01) for i in range(90)]
    assert capacity.steady_goodput(calls) == pytest.approx(100.0, rel=0.15)
    assert math.isnan(capacity.steady_goodput(calls[:5]))


def test_drain_summary_reports_p99_refused_share_and_the_ratio_to_unloaded() -> None:
    # 99 calls at 100 ms, one at 300 ms (nearest-rank p99 of 100 values is the 99th: 100 ms
    # would hide nothing here, so use 2 slow ones), 100 refused: 1/3 of all calls.
    calls = [served(i * 0.01) for i in range(98)] + [served(1.0, 0.3), served(1.1, 0.3)]
    calls += [turned_away(0.5 + i * 0.001) for i in range(50)]
    summary = capacity.drain_summary(calls, 0.0, unloaded_ms=100.0)
    assert summary["ok_calls"] == 100
    assert summary["refused"] == 50
    assert summary["refused_share"] == pytest.approx(50 / 150)
    assert summary["p50_ms"] == pytest.approx(100.0)
    assert summary["p99_ms"] == pytest.approx(300.0)
    assert summary["p99_over_unloaded"] == pytest.approx(3.0)
    assert summary["statuses"] == {"200": 100, "503": 50}


def test_bins_give_rates_and_latency_per_half_second() -> None:
    calls = [served(0.0), served(0.1), served(0.2, 0.2), turned_away(0.6), served(1.0, 0.3)]
    series = capacity.bins(calls, 0.0, width=0.5)
    assert series["t"] == [0.0, 0.5, 1.0]
    assert series["goodput"] == [6.0, 0.0, 2.0]  # 3, 0 and 1 served calls per 0.5 s
    assert series["refused_per_s"] == [0.0, 2.0, 0.0]
    assert series["p50_ms"][0] == pytest.approx(100.0)
    assert math.isnan(series["p99_ms"][1])
    assert series["p99_ms"][2] == pytest.approx(300.0)
    assert capacity.bins([], 0.0)["t"] == []


def test_summed_limits_treat_a_process_not_yet_started_as_zero() -> None:
    samples = {"t": [0.0, 0.5, 1.0], "limit": {"a": [4, 8, 8], "b": [4, 6, 5], "c": [None, 2]}}
    assert capacity.summed(samples) == [8.0, 16.0, 13.0]


def test_following_a_halving() -> None:
    ts = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    total = [20.0, 20.0, 20.0, 16.0, 11.0, 10.0, 10.0]
    before = capacity.window_median(ts, total, 0.0, 2.0)
    assert before == 20.0
    assert capacity.first_at_or_below(ts, total, 2.0, 0.6 * before) == pytest.approx(2.0)
    assert math.isnan(capacity.first_at_or_below(ts, total, 2.0, 5.0))
    assert math.isnan(capacity.window_median(ts, total, 10.0, 11.0))
    series = {
        "t": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        "p99_ms": [100.0, 110.0, 350.0, 250.0, float("nan"), 150.0, 120.0],
    }
    # Over 200 ms until the bin at 1.5 s; the empty bin at 2.0 s counts neither way, so the
    # first bin under for good is the one at 2.5 s: 1.6 s after the halving at 0.9 s.
    assert capacity.settle_seconds(series, 0.9, 200.0) == pytest.approx(1.6)
    assert math.isnan(capacity.settle_seconds({"t": [0.0, 0.5], "p99_ms": [100, 300]}, 0.0, 200))


def test_counter_deltas_add_up_the_processes_and_ignore_other_targets() -> None:
    def sample(outcome: str, value: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {("courier_messages_processed_total", (("outcome", outcome),)): value}

    before = [
        {**sample("retried", 5), **sample("completed", 10)},
        {
            ("courier_target_calls_total", (("outcome", "http_5xx"), ("target", "legacy"))): 1.0,
        },
    ]
    after = [
        {
            **sample("retried", 8),
            **sample("completed", 110),
            (
                "courier_target_circuit_transitions_total",
                (("state", "open"), ("target", "legacy")),
            ): 2.0,
        },
        {
            ("courier_target_calls_total", (("outcome", "http_5xx"), ("target", "legacy"))): 4.0,
            ("courier_target_calls_total", (("outcome", "ok"), ("target", "other"))): 9.0,
        },
        sample("retried", 1),  # a process that joined during the drain: no baseline
    ]
    found = capacity.counter_deltas(before, after)
    assert found["messages_retried"] == 4.0
    assert found["outcomes"] == {"completed": 100.0, "retried": 4.0}
    assert found["target_calls"] == {"http_5xx": 3.0}
    assert found["circuit_opens"] == 2.0


def _run(goodput: float, refused: int, calls: int, p99_ms: float) -> dict[str, object]:
    target = {
        "goodput": goodput,
        "goodput_fraction": goodput / capacity.MAX_GOODPUT,
        "refused": refused,
        "calls": calls,
        "refused_share": refused / calls,
        "p50_ms": 100.0,
        "p99_ms": p99_ms,
        "unloaded_ms": 100.0,
        "p99_over_unloaded": p99_ms / 100.0,
        "drain_s": 20.0,
        "peak_concurrent": 20,
        "steady_goodput": 157.0,
    }
    courier = {"messages_retried": 0.0, "circuit_opens": 0.0}
    return {"messages": 3200, "drained": True, "window_s": 90, "target": target,
            "courier": courier, "cpu_ms_per_message": 1.5, "dead_lettered": 0}  # fmt: skip


def test_goals_and_the_table_from_a_hand_made_section() -> None:
    runs = {
        "adaptive": _run(150.0, 3, 3300, 180.0),
        "fixed": {**_run(61.0, 2000, 5000, 900.0), "drained": False, "dead_lettered": 335},
        "halved": {
            **_run(100.0, 0, 2600, 190.0),
            "follow": {
                "halved_at_s": 8.0,
                "limit_before": 20.0,
                "limit_after": 10.0,
                "limit_drop_s": 1.5,
                "latency_settle_s": 2.0,
            },
        },
        "retry_after": {
            **_run(100.0, 12, 1700, 150.0),
            "model": {"retry_after_seconds": 5.0},
            "pause": {"refusals": 12, "longest_gap_s": 4.6, "resumed_after_first_429_s": 5.03},
            "messages": 1600,
            "lost": 0,
            "duplicate_effects": 0,
            "dead_lettered": 0,
        },
        "fleet_cap": {
            **_run(155.0, 0, 1600, 110.0),
            "peak_concurrent": 17,
            "peak_after_join": 17,
            "stub_peak_concurrent": 17,
            "joined_at_s": 3.0,
            "first_call_s": 25.5,
            "goodput_calling": 158.0,
            "summed_share_max": 16.0,
            "summed_share_while_joining": 10.0,
            "join_wait_s": 25.0,
        },
    }
    section = {"model": capacity.describe(capacity.model()), "runs": runs}
    rows = {row["goal"].split(":")[0]: row for row in capacity.goals(section)}
    assert [row["met"] for row in capacity.goals(section)] == [True, True, True, True, True, False]
    assert rows["adaptive, 3 processes"]["measured"] == pytest.approx(150 / 160)
    assert "fixed 32: 61" in rows["adaptive, 3 processes"]["detail"]
    assert "peak 17" in capacity.goals(section)[-1]["detail"]
    early = {**runs["retry_after"], "pause": {**runs["retry_after"]["pause"]}}
    early["pause"]["resumed_after_first_429_s"] = 4.2  # a process came back before 5 s
    assert not capacity.goals({**section, "runs": {"retry_after": early}})[0]["met"]
    section["goals"] = capacity.goals(section)
    text = capacity.table(section)
    assert (
        "| adaptive (ceiling 32) | 3,200 | 20.0 | 150 (94%) | 100 / 180 | 3 (0.1%) | 0 | 0 | 0 "
        "| 1.50 |" in text
    )
    assert "| fixed 32 | 3,200 | not drained | 61 (38%) | 100 / 900 | 2,000 (40.0%) |" in text
    assert "| 335 | 1.50 |" in text
    assert "target p99 back under 2x unloaded for good after 2.0 s" in text
    assert "longest gap in calls after the first was 4.60 s" in text
    assert "calls resumed 5.03 s after the first 429" in text
    assert "at most 17 calls open at the target at once" in text
    assert "the first call came 25.5 s after the backlog was released" in text
    assert "then 158 effects/s until drained" in text
    assert "summed to at most 16, and to 10 while the third" in text


def test_the_committed_copy_keeps_what_the_plots_need() -> None:
    samples = {"t": [0.0], "limit": {"a": [4]}, "in_use": {"a": [3]}, "paused": {"a": [0]}}
    section = {
        "model": {},
        "runs": {
            "halved": {"series": {"t": [0.0]}, "samples": samples, "follow": {}},
            "adaptive": {"series": {"t": [0.0]}, "samples": samples},
        },
    }
    slim = capacity.slim(section)
    assert slim["runs"]["halved"]["samples"] == {"t": [0.0], "limit": {"a": [4]}}
    assert slim["runs"]["halved"]["follow"] == {}
    assert "samples" not in slim["runs"]["adaptive"]
    assert slim["runs"]["adaptive"]["series"] == {"t": [0.0]}
    assert section["runs"]["adaptive"]["samples"] is samples  # the full report keeps them


def test_a_pause_lasts_from_its_first_sample_to_the_next_unpaused_one() -> None:
    # Samples drift when /metrics is slow: time between samples counts, not their number.
    ts = [0.0, 0.25, 0.6, 1.0, 1.5, 1.75]
    assert capacity.held_seconds(ts, [0, 1, 1, 1, 0, 0]) == pytest.approx(1.25)
    # The last sample counts for the median gap (0.25, 0.35, 0.4, 0.5, 0.25: 0.35).
    assert capacity.held_seconds(ts, [0, 0, 0, 0, 0, 1]) == pytest.approx(0.35)
    assert capacity.held_seconds(ts[:2], [None]) == 0.0
    assert capacity.held_seconds([], []) == 0.0
