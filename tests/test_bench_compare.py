"""bench.compare: the before/after table reads the report shape the bench writes.

(The plot needs matplotlib, which only `make bench` installs: not tested here.)
"""

from __future__ import annotations

from typing import Any

from bench.compare import median, table


def report(worker_cpu: float, api_cpu: float, commit: str) -> dict[str, Any]:
    return {
        "started_at": "2026-12-03T15:00:00+00:00",
        "versions": {"commit": commit},
        "workers": {"summary": {"20": {"courier": {"cpu_s_per_1000": {"median": worker_cpu}}}}},
        "api": {
            "saturation": {"summary": {"courier": {"server_cpu_s_per_1000": {"median": api_cpu}}}}
        },
    }


def test_rows_present_in_both_reports_are_compared() -> None:
    text = table(report(2.43, 2.04, "aaa"), report(1.41, 0.87, "bbb"))
    assert "| worker CPU, courier 1 process, 20 ms targets (ms/msg) | 2.43 | 1.41 | 0.58x |" in text
    assert "| API CPU, courier full path (ms/req) | 2.04 | 0.87 | 0.43x |" in text
    assert "100 ms" not in text  # absent from both: left out, not shown as zero
    assert "2026-12-03, bbb" in text


def test_a_missing_or_hung_variant_has_no_median() -> None:
    hung = {"api": {"saturation": {"summary": {"courier": {"hung": 3}}}}}
    assert (
        median(hung, ("api", "saturation", "summary", "courier", "server_cpu_s_per_1000")) is None
    )
