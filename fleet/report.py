"""What a rolling replacement did: a summary row (chaos's), one row per round, failed attempts by
kind; printed as tables and written as JSON."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos import report as chaos_report
from chaos.load import LoadResult, Request
from chaos.report import Row


def failure_kinds(answers: Iterable[str]) -> dict[str, int]:
    """Attempts not answered 202, by kind: no HTTP answer at all (a refused, reset or timed-out
    connection), 503, another 5xx (HAProxy's 502/504 among them), anything else."""
    counted = Counter(answers)
    return {
        "connection_errors": sum(n for a, n in counted.items() if not a.isdigit()),
        "http_503": counted.get("503", 0),
        "http_5xx_other": sum(
            n for a, n in counted.items() if a.isdigit() and a[0] == "5" and a != "503"
        ),
        "other_not_202": sum(
            n for a, n in counted.items() if a.isdigit() and a[0] != "5" and a != "202"
        ),
    }


def attempts_between(requests: Iterable[Request], start: float, end: float) -> dict[str, int]:
    """``failure_kinds`` of the attempts answered between ``start`` and ``end`` (monotonic)."""
    return failure_kinds(
        answer
        for request in requests
        for answer, at in zip(request.answers, request.answered_at, strict=True)
        if start <= at <= end
    )


@dataclass
class Round:
    """One instance replaced: each step's time and what the stopping instance held."""

    number: int
    replaced: str
    launched: str = ""
    started_at: float = 0.0  # monotonic
    finished_at: float = 0.0
    deregister_s: float = 0.0  # draining until no request was in flight there
    requests_in_flight_at_deregister: int = 0
    deregister_timed_out: bool = False
    messages_in_flight_at_sigterm: float = 0.0
    stop_s: float = 0.0  # SIGTERM -> exit
    exit_code: int | None = None
    released_at_stop: int | None = None
    messages_received: int = 0
    orphaned: list[str] = field(default_factory=list)  # received, neither deleted nor released
    launch_s: float = 0.0  # start -> listening
    healthy_s: float = 0.0  # registered -> UP (healthy threshold of checks passed)
    failed_attempts: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The whole replacement: deregistration start to the new target UP."""
        return self.finished_at - self.started_at

    def check(self, row: Row, stop_bound: float) -> None:
        """This round's invariants, as violations of ``row``."""
        name = f"round {self.number} ({self.replaced} -> {self.launched or '?'})"
        row.check(
            not self.deregister_timed_out, f"{name}: requests still in flight after the delay"
        )
        row.check(self.exit_code == 0, f"{name}: exit code {self.exit_code}")
        row.check(
            self.stop_s <= stop_bound, f"{name}: stopped in {self.stop_s:.1f}s > {stop_bound:g}s"
        )
        row.check(
            not self.orphaned,
            f"{name}: {len(self.orphaned)} messages left invisible at exit (e.g. {self.orphaned[:3]})",
        )


@dataclass
class Outcome:
    """A whole run."""

    scale: str
    row: Row
    rounds: list[Round]
    result: LoadResult
    deployment: dict[str, Any]
    haproxy: dict[str, int]
    served: dict[str, int]  # requests HAProxy sent to each instance in service at the end

    def __post_init__(self) -> None:
        for done in self.rounds:
            done.failed_attempts = attempts_between(
                self.result.requests, done.started_at, done.finished_at
            )

    @property
    def ok(self) -> bool:
        return self.row.ok

    def failed_attempts(self) -> dict[str, int]:
        """Every attempt of the run not answered 202, by kind."""
        return failure_kinds(a for r in self.result.requests for a in r.answers)

    @property
    def refresh_seconds(self) -> float:
        """First deregistration to the last new target in service, pauses between included."""
        if not self.rounds:
            return 0.0
        return self.rounds[-1].finished_at - self.rounds[0].started_at

    def as_json(self) -> dict[str, Any]:
        """The JSON document (without the machine and time a caller adds)."""
        return {
            "scale": self.scale,
            "ok": self.ok,
            "deployment": self.deployment,
            "attempts": sum(len(r.answers) for r in self.result.requests),
            "failed_attempts": self.failed_attempts(),
            "refresh_seconds": round(self.refresh_seconds, 2),
            "rounds": [{**asdict(r), "seconds": round(r.seconds, 2)} for r in self.rounds],
            "haproxy": self.haproxy,
            "served_by_new_instances": self.served,
            "summary": {**asdict(self.row), "ok": self.row.ok},
        }


ROUND_COLUMNS: tuple[tuple[str, Callable[[Round], str]], ...] = (
    ("round", lambda r: str(r.number)),
    ("replaced", lambda r: f"{r.replaced} -> {r.launched}"),
    ("deregister s", lambda r: f"{r.deregister_s:.2f}"),
    ("req in flight", lambda r: str(r.requests_in_flight_at_deregister)),
    ("msgs at SIGTERM", lambda r: f"{r.messages_in_flight_at_sigterm:.0f}"),
    ("stop s", lambda r: f"{r.stop_s:.2f}"),
    ("exit", lambda r: str(r.exit_code)),
    ("released", lambda r: str(r.released_at_stop)),
    ("orphaned", lambda r: str(len(r.orphaned))),
    ("launch s", lambda r: f"{r.launch_s:.2f}"),
    ("healthy s", lambda r: f"{r.healthy_s:.2f}"),
    ("round s", lambda r: f"{r.seconds:.1f}"),
    ("failed attempts", lambda r: str(sum(r.failed_attempts.values()))),
)


def rounds_table(rounds: list[Round]) -> str:
    """One line per round."""
    cells = [[title for title, _ in ROUND_COLUMNS]]
    cells += [[cell(r) for _, cell in ROUND_COLUMNS] for r in rounds]
    widths = [max(len(line[i]) for line in cells) for i in range(len(ROUND_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text(outcome: Outcome) -> str:
    """The summary row, the rounds, the failed attempts and what HAProxy counted."""
    failed = outcome.failed_attempts()
    attempts = sum(len(r.answers) for r in outcome.result.requests)
    group = ", ".join(f"{k}={v}" for k, v in outcome.deployment.items())
    return "\n".join(
        [
            chaos_report.table([outcome.row]),
            "",
            rounds_table(outcome.rounds),
            "",
            f"failed attempts: {sum(failed.values())} of {attempts} ({failed})",
            f"refresh: {outcome.refresh_seconds:.1f}s from the first deregistration to the last"
            " new instance in service",
            f"haproxy counted: {outcome.haproxy}; served by the new instances: {outcome.served}",
            f"from terraform: {group}",
        ]
    )


def write(outcome: Outcome, path: Path, extra: dict[str, Any]) -> None:
    """The JSON report at ``path`` (``extra``: machine, time, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**extra, **outcome.as_json()}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
