"""bench.console's judgement: console off vs on, against the noise of same-setting runs."""

from __future__ import annotations

import math

from bench import console


def runs(off: list[float], on: list[float]) -> list[dict[str, object]]:
    """Runs in ABBA order: off, on, on, off, ..."""
    found: list[dict[str, object]] = []
    offs, ons = iter(off), iter(on)
    for setting in console.abba((max(len(off), len(on)) + 1) // 2):
        value = next(ons if setting else offs, None)
        if value is not None:
            found.append({"console": setting, "value": value, "rate": 1000.0})
    return found


def test_runs_alternate_off_on_on_off() -> None:
    assert console.abba(2) == [False, True, True, False, False, True, True, False]


def test_a_difference_within_the_same_setting_noise_is_not_measurable() -> None:
    result = console.compare(runs([0.50, 0.56], [0.53, 0.52]), unit="message")
    assert result["measured"]
    assert result["within_noise"]
    assert math.isclose(result["off_ms"], 0.53)
    assert math.isclose(result["on_ms"], 0.525)
    assert math.isclose(result["noise_ms"], 0.06)


def test_a_difference_beyond_the_noise_and_the_floor_is_measured_as_such() -> None:
    result = console.compare(runs([0.50, 0.51], [0.60, 0.61]), unit="request")
    assert result["measured"]
    assert not result["within_noise"]
    assert math.isclose(result["difference_share"], 0.100 / 0.505)


def test_runs_that_agree_closely_are_still_judged_against_the_floor() -> None:
    # Same-setting runs 0.001 ms apart: a 2 % difference is within the 3 % floor.
    result = console.compare(runs([0.500, 0.501], [0.510, 0.511]), unit="message")
    assert result["noise_ms"] < 0.002
    assert result["within_noise"]


def test_a_missing_setting_is_reported_unmeasured_and_fails_its_goal() -> None:
    section = {
        "order": ["off", "on"],
        "worker": console.compare(runs([0.5], []), unit="message"),
        "api": console.compare(runs([0.4, 0.4], [0.4, 0.41]), unit="request"),
    }
    rows = console.goal_rows(section)
    assert [met for _, _, met, _ in rows] == [False, True]
    assert "not measured" in rows[0][3]
    text = console.table(section)
    assert "| worker, ms CPU/msg | n/a |" in text
    assert "Same-setting noise: the largest gap" in text  # no idle row: the note stands alone
    assert "idle" not in text


def test_the_table_shows_both_settings_the_difference_and_the_noise() -> None:
    section = {
        "order": ["off", "on", "on", "off"],
        "worker": console.compare(runs([0.50, 0.56], [0.53, 0.52]), unit="message"),
        "api": console.compare(runs([0.40, 0.41], [0.41, 0.40]), unit="request"),
    }
    text = console.table(section)
    assert "| worker, ms CPU/msg | 0.530 | 0.525 | -0.005 (-0.9%) | 0.060 |" in text
    assert "| API, ms CPU/req | 0.405 | 0.405 | +0.000 (+0.0%) | 0.010 |" in text


def test_the_idle_row_gives_the_standing_cost_per_minute_and_per_message_at_load() -> None:
    idle = {
        "seconds": 30.0,
        "off_ms_per_minute": 80.0,
        "on_ms_per_minute": 92.0,
        "difference_ms_per_minute": 12.0,
        "share_of_a_core": 12.0 / 60_000,
        "per_message_at_load_ms": 12.0 / (60 * 1000.0),
    }
    section = {
        "order": ["off", "on"],
        "idle": idle,
        "worker": console.compare(runs([0.5], [0.5]), unit="message"),
        "api": console.compare(runs([0.4], [0.4]), unit="request"),
    }
    text = console.table(section)
    assert (
        "| idle worker, ms CPU/minute | 80.0 | 92.0 | +12.0 (0.020% of a core; 0.0002 ms/msg at load) | |"
        in text
    )
    assert "two idle workers side by side for 30 s" in text
