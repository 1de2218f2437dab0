"""3. poison: 1% poison of six kinds among healthy messages, drained against clean runs.

The same volume is preloaded on the queue and drained by one worker, clean and with every
100th message poison. Each poison message must reach the DLQ with the reason of its kind, the
healthy ones must all arrive, and poison must cost the healthy messages nothing: courier's CPU
time per message drained (its own process, not the wall clock, which 2 busy cores make noisy)
stays within ``cpu_tolerance`` of the clean runs'. Runs alternate clean, poison, poison, clean
(ABBA), so a rig that slows down over the run biases neither side. Even CPU time per message
moves with the machine's load (a starved process works in bigger batches), so the spread
between runs of one kind is measured too: a difference within it is not evidence, and the
bound is the larger of the two. Wall-clock throughput is reported only.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from chaos import verify
from chaos.report import Row
from chaos.rig import REJECTING_TARGET, TARGETS, Rig
from chaos.scenarios.common import Scale, Scenario, fleet, run_id
from chaos.scenarios.planted import preload, sealed_messages
from courier_testkit.courier import CourierProcess
from service.worker.dlq import DeadLetterInfo

ORDER = (0, 100, 100, 0)  # poison every Nth message (0: none), ABBA
MERGED = (  # the counts of Row that add up over the runs of one kind
    "requests",
    "accepted",
    "delivered",
    "lost",
    "duplicate_effects",
    "redeliveries",
    "dlq",
    "dlq_expected",
)


@dataclass
class Drain:
    """One run of the poison scenario: its row and what it cost."""

    row: Row
    throughput: float  # healthy messages per second, first effect to last
    cpu_ms_per_message: float  # courier's CPU time over every message it drained


class PoisonRun(Scenario):
    """One preloaded volume, every ``poison_every``-th message poison (0: a clean run), drained
    by one worker on fresh resources."""

    messages: list[tuple[str, str, str]]  # request id, body, kind
    expected: dict[str, str]  # poison request id -> its DLQ reason
    healthy: set[str]
    worker: CourierProcess
    cpu_before: float
    cpu: float
    states: dict[str, str]
    drain: Drain

    def __init__(self, rig: Rig, scale: Scale, poison_every: int) -> None:
        super().__init__(rig, scale)
        self.poison_every = poison_every
        self.label = "3b poison: 1% poison" if poison_every else "3a poison: clean run"

    async def setup(self) -> None:
        rig = self.rig
        self.row = Row(self.label)
        self.resources = await rig.fresh("poison")
        await rig.stubs.reset()
        self.messages, self.expected = await sealed_messages(
            rig, self.resources, run_id(), self.scale.poison_messages, self.poison_every
        )
        self.healthy = {rid for rid, _, kind in self.messages if kind == "healthy"}
        worker = rig.settings(self.resources, "worker", worker={"wait_seconds": 1})
        name = f"{self.label.split(maxsplit=1)[0]}-worker"
        (self.worker,) = (await self.stack.enter_async_context(fleet(rig, worker, name))).alive()
        # Started, then loaded: its CPU time from here on is the draining, not the start-up.
        self.cpu_before = self.worker.cpu_seconds()

    async def load(self) -> None:
        await preload(self.rig, self.resources.queue_url, self.messages)

    async def fault(self) -> None:
        """None of its own: the poison rides in the load (planted among the healthy messages)."""

    async def recover(self) -> None:
        """Nothing to undo: wait for the healthy deliveries, then for the DLQ to fill."""
        rig, resources = self.rig, self.resources
        self.drained = await verify.wait_delivered(
            rig, resources, self.healthy, timeout=self.scale.drain_timeout
        )
        self.cpu = self.worker.cpu_seconds() - self.cpu_before
        self.dlq = await verify.wait_dead_lettered(rig, resources, len(self.expected), timeout=30)

    async def check(self) -> list[Row]:
        row, effects, healthy = self.row, self.drained.effects, self.healthy
        states = await verify.states_by_id(self.rig, self.resources)
        first = min(
            (at for t, _ in TARGETS for at in effects.by_target[t]["first_at"].values()),
            default=0.0,
        )
        last = max((effects.last_effect_at(rid) or 0.0) for rid in healthy)
        row.requests = row.accepted = len(self.messages)
        delivered = effects.delivered_everywhere(healthy)
        row.delivered = len(delivered)
        row.lost = len(healthy - delivered)
        row.redeliveries = effects.redeliveries()
        row.duplicate_effects = effects.duplicate_effects()
        row.dlq, row.dlq_expected = len(self.dlq), len(self.expected)
        row.base_invariants()
        _check_dead_letters(row, self.dlq, self.expected)
        refused = {rid for rid, _, kind in self.messages if kind == "target-400"}
        _check_refused(row, effects, refused, self.dlq, states)
        row.check(
            all(states.get(rid) == "completed" for rid in delivered),
            f"{sum(states.get(rid) != 'completed' for rid in delivered)} delivered requests "
            "not completed in the status table",
        )
        cpu_ms = 1000 * self.cpu / len(self.messages)
        row.notes.update(
            healthy=len(healthy),
            dlq_reasons=dict(verify.dlq_reasons(self.dlq)),
            cpu_ms_per_message=round(cpu_ms, 3),
        )
        row.recover_s = None
        self.drain = Drain(row, len(healthy) / max(1e-6, last - first), cpu_ms)
        return [row]


def _check_dead_letters(row: Row, dlq: list[dict[str, Any]], expected: dict[str, str]) -> None:
    """Each poison message is in the DLQ with the reason of its kind."""
    got: dict[str, str] = {}
    for raw in dlq:
        attributes = raw.get("MessageAttributes", {})
        rid = attributes.get("request_id", {}).get("StringValue", "")
        got[rid] = verify.dlq_reason(raw)
    wrong = {
        rid: (got.get(rid), reason) for rid, reason in expected.items() if got.get(rid) != reason
    }
    row.check(
        not wrong,
        f"{len(wrong)} poison messages with a wrong or no DLQ reason: {list(wrong.values())[:3]}",
    )


def _check_refused(
    row: Row,
    effects: verify.Effects,
    refused: set[str],
    dlq: list[dict[str, Any]],
    states: dict[str, str],
) -> None:
    """A request the rejecting target refused (400): every other target delivered it, its
    status is ``failed``, and the rejecting target saw exactly one call per attempt (the
    receive count the DLQ copy records), never a retry of the refusal within an attempt."""
    others = [t for t, _ in TARGETS if t != REJECTING_TARGET]
    undelivered = {
        rid for rid in refused if not all(f"{rid}:{t}" in effects.key_counts(t) for t in others)
    }
    row.check(not undelivered, f"{len(undelivered)} refused requests not delivered to {others}")
    not_failed = {rid: states.get(rid) for rid in refused if states.get(rid) != "failed"}
    row.check(
        not not_failed,
        f"{len(not_failed)} refused requests with a status other than failed: "
        f"{sorted(Counter(map(str, not_failed.values())).items())}",
    )
    attempts = {}
    for raw in dlq:
        rid = raw.get("MessageAttributes", {}).get("request_id", {}).get("StringValue", "")
        info = DeadLetterInfo.of_sqs(raw)
        if rid in refused and info is not None:
            attempts[rid] = info.receive_count
    calls = effects.refused(REJECTING_TARGET)
    pairs = {rid: (calls.get(f"{rid}:{REJECTING_TARGET}", 0), attempts.get(rid)) for rid in refused}
    wrong = [pair for pair in pairs.values() if pair[0] != pair[1]]
    if pairs:
        row.notes["refused_calls_per_attempt"] = dict(
            Counter(f"{c}/{a}" for c, a in pairs.values())
        )
    row.check(
        not wrong,
        f"{len(wrong)} refused requests where {REJECTING_TARGET} was not called exactly once "
        f"per attempt (calls, attempts): {wrong[:3]}",
    )
    counted = [
        rid
        for rid in refused
        if f"{rid}:{REJECTING_TARGET}" in effects.key_counts(REJECTING_TARGET)
    ]
    row.check(not counted, f"{len(counted)} refused requests counted as delivered")


def compare_cost(rows: list[Row], clean: list[Drain], dirty: list[Drain], tolerance: float) -> None:
    """Report CPU per message and throughput of each kind with their spreads; check that the
    poison runs' CPU per message is within ``tolerance`` (or the spread, if larger) of clean."""
    for row, runs in zip(rows, (clean, dirty), strict=True):
        cpu = [d.cpu_ms_per_message for d in runs]
        row.notes["cpu_ms_per_message"] = [round(c, 3) for c in cpu]
        row.notes["cpu_spread"] = round(_spread(cpu), 3)
        row.notes["throughput_msg_s"] = [round(d.throughput, 1) for d in runs]
        row.notes["throughput_spread"] = round(_spread([d.throughput for d in runs]), 3)
    clean_cpu = _mean([d.cpu_ms_per_message for d in clean])
    dirty_cpu = _mean([d.cpu_ms_per_message for d in dirty])
    ratio = dirty_cpu / clean_cpu if clean_cpu else float("inf")
    noise = max(_spread([d.cpu_ms_per_message for d in runs]) for runs in (clean, dirty))
    bound = max(tolerance, noise)
    rows[1].notes["cpu_vs_clean"] = round(ratio, 3)
    rows[1].notes["cpu_bound"] = round(1 + bound, 3)
    clean_rate = _mean([d.throughput for d in clean])
    rows[1].notes["throughput_vs_clean"] = round(
        _mean([d.throughput for d in dirty]) / max(1e-6, clean_rate), 3
    )
    rows[1].check(
        ratio <= 1 + bound,
        f"CPU per message {dirty_cpu:.2f} ms with poison is {100 * (ratio - 1):.0f}% above the "
        f"clean runs' {clean_cpu:.2f} ms (bound {100 * bound:.0f}%: tolerance "
        f"{100 * tolerance:.0f}%, spread between repeats {100 * noise:.0f}%)",
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _spread(values: list[float]) -> float:
    """(max - min) / mean of repeated measurements; 0 for fewer than two."""
    if len(values) < 2 or not sum(values):
        return 0.0
    return (max(values) - min(values)) / (sum(values) / len(values))


def _merged(rows: list[Row]) -> Row:
    """One row for several runs of the same kind (counts add up, notes of the first)."""
    merged = rows[0]
    for row in rows[1:]:
        for name in MERGED:
            setattr(merged, name, getattr(merged, name) + getattr(row, name))
        merged.violations += row.violations
        for note in ("dlq_reasons", "refused_calls_per_attempt"):
            for value, count in row.notes.get(note, {}).items():
                counts = merged.notes.setdefault(note, {})
                counts[value] = counts.get(value, 0) + count
    merged.notes["runs"] = len(rows)
    return merged


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """Two rows, clean runs and poison runs (two of each, ABBA), their costs compared."""
    started = time.monotonic()
    clean: list[Drain] = []
    dirty: list[Drain] = []
    for every in ORDER:
        one = PoisonRun(rig, scale, every)
        await one.steps()
        (dirty if every else clean).append(one.drain)
    rows = [_merged([d.row for d in clean]), _merged([d.row for d in dirty])]
    compare_cost(rows, clean, dirty, scale.cpu_tolerance)
    for row in rows:
        row.seconds = (time.monotonic() - started) / len(rows)
    return rows
