"""bench.console's judgement: the console's standing cost; console on vs off under load."""

from __future__ import annotations

import math
from typing import Any

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


IDLE: dict[str, Any] = {
    "seconds": 30.0,
    "off_ms_per_minute": 20.0,
    "on_ms_per_minute": 26.0,
    "noise_ms_per_minute": 0.8,
    "difference_ms_per_minute": 6.0,
    "share_of_a_core": 6.0 / 60_000,
}


def unmet_goal_detail(section: dict[str, Any]) -> str:
    """The detail of the standing-cost goal, checked to be the one goal and not met."""
    goal, _, met, detail = console.goal_row(section)
    assert goal.startswith("console's standing cost")
    assert not met
    return detail


def test_runs_alternate_off_on_on_off() -> None:
    assert console.abba(2) == [False, True, True, False, False, True, True, False]


def test_the_difference_is_of_medians_and_the_noise_the_larger_same_setting_gap() -> None:
    result = console.compare(runs([0.50, 0.56], [0.56, 0.58]), unit="message")
    assert result["measured"]
    assert math.isclose(result["off_ms"], 0.53)
    assert math.isclose(result["on_ms"], 0.57)
    assert math.isclose(result["difference_share"], 0.04 / 0.53)
    assert math.isclose(result["noise_ms"], 0.06)


def test_a_run_that_completed_nothing_is_left_out() -> None:
    result = console.compare(runs([0.5, math.nan], [0.52, 0.51]), unit="message")
    assert result["off_ms"] == 0.5
    assert math.isclose(result["noise_ms"], 0.01)


def test_a_missing_setting_is_reported_unmeasured_and_so_is_the_standing_cost() -> None:
    section = {
        "order": ["off", "on"],
        "worker": console.compare(runs([0.5], []), unit="message"),
        "api": console.compare(runs([0.4, 0.4], [0.4, 0.41]), unit="request"),
    }
    assert unmet_goal_detail(section) == "not measured: no loaded worker run to spread it over"
    text = console.table(section)
    assert "| worker, ms CPU/msg | n/a |" in text
    assert "Idle row" not in text


def test_the_standing_cost_is_spread_over_a_minute_of_messages_at_the_loaded_rate() -> None:
    cost = console.standing_cost(IDLE, runs([0.7, 0.7], [0.7, 0.7]), off_ms=0.75)
    assert cost["loaded_msgs_per_s"] == 1000.0
    assert math.isclose(cost["per_message_at_load_ms"], 6.0 / 60_000)
    assert math.isclose(cost["share_of_message_cpu"], 6.0 / 60_000 / 0.75)


def test_the_standing_cost_goal_holds_below_its_limit_and_fails_above() -> None:
    worker = console.compare(runs([0.75, 0.75], [0.75, 0.75]), unit="message")
    api = console.compare(runs([0.5, 0.5], [0.5, 0.5]), unit="request")
    cheap = {**IDLE, **console.standing_cost(IDLE, worker["runs"], 0.75)}
    dear_idle = {**IDLE, "difference_ms_per_minute": 600.0}
    dear = {**dear_idle, **console.standing_cost(dear_idle, worker["runs"], 0.75)}
    for idle, met in ((cheap, True), (dear, False)):
        goal, _, met_, _ = console.goal_row(
            {"order": [], "idle": idle, "worker": worker, "api": api}
        )
        assert goal.startswith("console's standing cost <= 1%")
        assert met_ is met


def test_the_table_shows_both_settings_the_difference_the_noise_and_idle() -> None:
    worker_runs = runs([0.50, 0.56], [0.53, 0.52])
    idle = {**IDLE, **console.standing_cost(IDLE, worker_runs, 0.53)}
    section = {
        "order": ["off", "on", "on", "off"],
        "idle": idle,
        "worker": console.compare(worker_runs, unit="message"),
        "api": console.compare(runs([0.40, 0.41], [0.41, 0.40]), unit="request"),
    }
    text = console.table(section)
    assert "| worker, ms CPU/msg | 0.530 | 0.525 | -0.005 (-0.9%) | 0.060 |" in text
    assert "| API, ms CPU/req | 0.405 | 0.405 | +0.000 (+0.0%) | 0.010 |" in text
    assert "| idle worker, ms CPU/minute | 20.0 | 26.0 | +6.0 (0.010% of a core) | 0.8 |" in text
    assert "0.00010 ms per message at 1000 msg/s, 0.019% of the worker's CPU" in text


def test_a_run_that_completed_nothing_does_not_dilute_the_loaded_rate() -> None:
    worker_runs = [*runs([0.7, 0.7], [0.7, 0.7]), {"console": True, "value": math.nan, "rate": 0.0}]
    assert console.standing_cost(IDLE, worker_runs, off_ms=0.7)["loaded_msgs_per_s"] == 1000.0


def test_an_idle_measurement_that_failed_says_why_in_its_goal_and_its_row() -> None:
    section = {
        "order": ["off", "on", "on", "off"],
        "idle": {
            "seconds": 30.0,
            "error": "an idle worker ended (or has no schedstat) within 30 s",
        },
        "worker": console.compare(runs([0.5, 0.5], [0.5, 0.5]), unit="message"),
        "api": console.compare(runs([0.4, 0.4], [0.4, 0.4]), unit="request"),
    }
    assert (
        unmet_goal_detail(section)
        == "not measured: an idle worker ended (or has no schedstat) within 30 s"
    )
    text = console.table(section)
    assert "| idle worker, ms CPU/minute | n/a | n/a | an idle worker ended" in text
    assert "Idle row" not in text
