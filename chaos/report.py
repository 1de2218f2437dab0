"""One row per scenario: what was sent, what arrived, what broke, printed and written as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """The outcome of one scenario (or one phase of one)."""

    scenario: str
    requests: int = 0  # logical requests sent through the API (+ messages planted in the queue)
    accepted: int = 0  # answered 202 (or planted)
    refused: int = 0  # final answer not 202: each must be explained by the scenario's fault
    delivered: int = 0  # accepted and delivered to every target
    lost: int = 0  # accepted, not meant to fail, not delivered: must be 0
    duplicate_effects: int = 0  # one request applied under two request ids: must be 0
    redeliveries: int = 0  # same key delivered again (absorbed by Idempotency-Key)
    dlq: int = 0
    dlq_expected: int = 0
    p99_api_ms: float = 0.0
    p99_e2e_s: float = 0.0  # 202 -> effect at the last target
    recover_s: float | None = None  # scenario-specific, see notes
    seconds: float = 0.0  # wall time of the scenario
    violations: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def check(self, condition: bool, violation: str) -> None:
        if not condition:
            self.violations.append(violation)

    def base_invariants(self) -> None:
        self.check(self.lost == 0, f"{self.lost} accepted requests lost")
        self.check(self.duplicate_effects == 0, f"{self.duplicate_effects} duplicate effects")
        self.check(
            self.dlq == self.dlq_expected,
            f"DLQ holds {self.dlq}, expected {self.dlq_expected}",
        )


COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("requests", "requests", "{}"),
    ("accepted", "accepted", "{}"),
    ("refused", "refused", "{}"),
    ("delivered", "delivered", "{}"),
    ("lost", "lost", "{}"),
    ("dup effects", "duplicate_effects", "{}"),
    ("redeliv.", "redeliveries", "{}"),
    ("DLQ/exp", None, ""),
    ("p99 API ms", "p99_api_ms", "{:.0f}"),
    ("p99 e2e s", "p99_e2e_s", "{:.2f}"),
    ("recover s", "recover_s", "{:.1f}"),
    ("wall s", "seconds", "{:.0f}"),
    ("verdict", None, ""),
)


def _cell(row: Row, attribute: str | None, fmt: str, title: str) -> str:
    if title == "DLQ/exp":
        return f"{row.dlq}/{row.dlq_expected}"
    if title == "verdict":
        return "ok" if row.ok else "FAIL"
    value = getattr(row, attribute or "")
    return "-" if value is None else fmt.format(value)


def table(rows: list[Row]) -> str:
    """A fixed-width table of ``rows``, then each row's violations and notes."""
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [[_cell(row, attr, fmt, title) for title, attr, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in rows:
        for violation in row.violations:
            lines.append(f"  {row.scenario}: VIOLATION {violation}")
        if row.notes:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in row.notes.items())
            lines.append(f"  {row.scenario}: {shown}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


def write(rows: list[Row], path: Path, extra: dict[str, Any]) -> None:
    document = {
        **extra,
        "ok": all(r.ok for r in rows),
        "scenarios": [{**asdict(r), "ok": r.ok} for r in rows],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
