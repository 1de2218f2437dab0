"""Issue 16's proof: three courier processes against one legacy system with a real capacity.

The target is one stub (``service.stubs`` ``Behaviour``): it serves ``K`` calls at once in
100 ms each (so at most ``K / 0.1`` effects per second), queues ``Q`` more first-in first-out
(their latency rises by the wait), and answers every call beyond ``K + Q`` at once with the
overload status (503, or 429) and ``Retry-After``. courier is configured with this one target
only, so the target alone decides how fast a message is done. Every run uses a fresh queue,
fresh events (new request ids: a status record from an earlier run must not turn a message
into a "duplicate") and freshly started courier processes (a drained run's stop overlaps
the next run's start).

Runs (``run_section``):

- ``adaptive`` and ``fixed``: a backlog sized to take ``backlog_seconds`` at the target's
  capacity, drained by 3 processes with ``limit = "adaptive"`` (ceiling 32), then with
  ``limit = "fixed"`` and ``concurrency = 32`` (the behaviour before issue 16);
- ``halved``: adaptive; the target's ``K`` drops from 16 to 8 ``halve_after_seconds`` into
  the drain (a third of the way through in full mode);
- ``retry_after``: adaptive, overload answered 429 with ``Retry-After: 5``; a second or two
  into the drain the target is overloaded on purpose (its capacity cut to 2 with no queue
  until every process shows ``courier_target_paused`` 1, at most ``DIP_MAX_SECONDS``, then
  restored), as when another client grabs it: the longest gap in calls after the first 429,
  each process's sampled pause, and whether every message was still delivered once;
- ``fleet_cap``: ``fleet_max_concurrency = K`` on a target with no limit of its own (so the
  adaptive limits alone would grow to 3 x 32); two processes start, the third joins once
  they are calling (a scale-out under load): the most calls the target ever had open at
  once. Full mode only: a process takes a share only after the fleet's join wait (about
  25 s), so the run lasts about a minute.

Measured at the target, from the stub's ``GET /_stub/timeline`` (per call: arrival, end,
status, time waited in its queue; CLOCK_MONOTONIC, comparable with ``time.monotonic()``
here): goodput (2xx answers per second from the resume to the last 2xx), latency of the
served calls (end - arrival, so including the queue wait), the share of calls refused, the
most calls open at once. From courier's ``/metrics`` (each process, sampled every
``sample_seconds``): the concurrency limit, in use, Retry-After pause; counters before and
after the drain: messages retried, target call outcomes, circuit openings, limit changes.
CPU per message: user + system CPU of the courier processes during the drain / messages.

The pure functions (timeline -> numbers) are at the top and tested in
``tests/test_bench_capacity.py``; the timeline arithmetic shared with chaos's legacy scenario
(served, refused, latencies, peak, longest gap) is ``courier_testkit.timeline``, tested in
``tests/test_testkit_timeline.py``. Nothing here imports matplotlib (``bench.plots`` draws).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import signal
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import report, workload
from bench.workers import percentile
from courier_testkit.aws import AwsStack, plain_client
from courier_testkit.courier import CourierProcess, courier_process
from courier_testkit.events import Event
from courier_testkit.stubs import StubProcess, stub_process
from courier_testkit.timeline import (
    OVERLOAD_STATUSES,
    TimelineEntry,
    first_with_status,
    latencies,
    longest_gap,
    peak,
    refused,
    served,
    since,
)
from service.settings import Settings, TargetSettings

TARGET = "legacy"
K = 16  # calls the target serves at once
Q = 16  # calls it queues beyond that
LATENCY_SECONDS = 0.1
MAX_GOODPUT = K / LATENCY_SECONDS  # 160 effects/s
PROCESSES = 3
CEILING = 32  # concurrency: the adaptive ceiling, and the fixed limit of the "fixed" run
RETRY_AFTER_SECONDS = 5.0  # the 429 run's Retry-After
BIN_SECONDS = 0.5
DIP_MAX_SECONDS = 2.0  # retry_after: the overload lasts until every process paused, or this
SETTLE_SECONDS = 0.3  # after readiness, before the pause: the pollers are polling
# What Fleet.sample keeps per process: key -> courier's gauge (labelled with the target).
GAUGES = {
    "limit": "courier_target_concurrency_limit",
    "in_use": "courier_target_concurrency_in_use",
    "paused": "courier_target_paused",
    "share": "courier_target_fleet_share",
}
Log = Callable[[str], None]
# A side action beside a drain: (t0, the processes, start another) -> what it reports.
Side = Callable[..., Coroutine[Any, Any, Any]]
_runs = itertools.count()


@dataclass(frozen=True)
class CapacityMode:
    """How long each run of the section is."""

    name: str
    backlog_seconds: float  # adaptive and fixed: messages = MAX_GOODPUT x this
    fixed_window_seconds: float  # the fixed run stops here even if not drained
    halve_after_seconds: float  # halved: K drops here
    halved_tail_seconds: float  # halved: messages for about this long at K/2 after that
    retry_after_messages: int
    dip_after_seconds: float  # retry_after: when the target is briefly overloaded
    fleet_messages: int  # 0: no fleet_cap run
    join_after_seconds: float  # fleet_cap: the third process starts this long after the join wait
    sample_seconds: float
    window_seconds: float  # any other run stops here even if not drained


# Quick mode leaves the fleet cap out: a process takes a share only after the fleet's join
# wait (service/worker/fleet.py, ~25 s with the default timing), longer than quick allows.
QUICK = CapacityMode("quick", 4.0, 12.0, 3.0, 4.0, 320, 1.0, 0, 1.5, 0.25, 30.0)
FULL = CapacityMode("full", 20.0, 90.0, 8.0, 16.0, 1600, 2.0, 4000, 5.0, 0.25, 90.0)


# -- the pure part: timelines and samples to numbers --------------------------------------------


def goodput(calls: Sequence[TimelineEntry], t0: float) -> tuple[float, float]:
    """(2xx answers per second from ``t0`` to the last 2xx end, seconds to that end)."""
    ok = served(calls)
    if not ok:
        return 0.0, float("nan")
    last = max(c.end for c in ok)
    elapsed = max(1e-6, last - t0)
    return len(ok) / elapsed, elapsed


def steady_goodput(calls: Sequence[TimelineEntry]) -> float:
    """2xx answers per second between the 10th and the 90th percentile of their ends."""
    ends = sorted(c.end for c in served(calls))
    if len(ends) < 20:
        return float("nan")
    low, high = len(ends) // 10, (len(ends) * 9) // 10
    return (high - low) / max(1e-6, ends[high] - ends[low])


def bins(
    calls: Sequence[TimelineEntry], t0: float, width: float = BIN_SECONDS
) -> dict[str, list[float]]:
    """Per ``width`` seconds from ``t0`` (by a call's end): 2xx/s, refused/s, p50 and p99 ms.

    Latency is NaN in a bin with no served call.
    """
    if not calls:
        return {"t": [], "goodput": [], "refused_per_s": [], "p50_ms": [], "p99_ms": []}
    count = max(1, math.ceil((max(c.end for c in calls) - t0) / width))
    served: list[list[float]] = [[] for _ in range(count)]
    refusals = [0] * count
    for call in calls:
        index = min(count - 1, max(0, int((call.end - t0) / width)))
        if 200 <= call.status < 300:
            served[index].append(call.end - call.arrival)
        elif call.status in OVERLOAD_STATUSES:
            refusals[index] += 1
    return {
        "t": [round(i * width, 3) for i in range(count)],
        "goodput": [round(len(s) / width, 1) for s in served],
        "refused_per_s": [round(r / width, 1) for r in refusals],
        "p50_ms": [round(percentile(s, 0.5) * 1000, 1) for s in served],
        "p99_ms": [round(percentile(s, 0.99) * 1000, 1) for s in served],
    }


def summed(samples: Mapping[str, Any], key: str = "limit") -> list[float]:
    """The per-process series ``samples[key]`` added up per sample (a missing value: 0)."""
    per_process: Mapping[str, Sequence[float | None]] = samples.get(key, {})
    length = len(samples.get("t", []))
    return [
        sum(float(series[i] or 0) for series in per_process.values() if i < len(series))
        for i in range(length)
    ]


def held_seconds(ts: Sequence[float], values: Sequence[float | None]) -> float:
    """How long ``values`` (sampled at ``ts``) were true: each true sample counts until the
    next sample (the last one: the median sampling interval)."""
    if not ts:
        return 0.0
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    tail = statistics.median(gaps) if gaps else 0.0
    return sum(
        (ts[i + 1] - ts[i] if i + 1 < len(ts) else tail)
        for i, value in enumerate(values[: len(ts)])
        if value
    )


def window_median(ts: Sequence[float], values: Sequence[float], start: float, end: float) -> float:
    """The median of ``values`` sampled at ``ts`` within [start, end]; NaN when none."""
    chosen = [v for t, v in zip(ts, values, strict=True) if start <= t <= end and v == v]
    return statistics.median(chosen) if chosen else float("nan")


def first_at_or_below(
    ts: Sequence[float], values: Sequence[float], after: float, level: float
) -> float:
    """Seconds from ``after`` to the first sample at or below ``level``; NaN if never."""
    for t, value in zip(ts, values, strict=True):
        if t >= after and value <= level:
            return t - after
    return float("nan")


def settle_seconds(series: Mapping[str, Sequence[float]], after: float, ceiling_ms: float) -> float:
    """Seconds from ``after`` until the binned p99 is at or under ``ceiling_ms`` for good.

    Bins without a served call do not count either way; NaN if the last one is still over.
    """
    settled: float | None = None
    for t, p99 in zip(series["t"], series["p99_ms"], strict=True):
        if t + BIN_SECONDS <= after or p99 != p99:
            continue
        if p99 > ceiling_ms:
            settled = None
        elif settled is None:
            settled = max(0.0, t - after)
    return float("nan") if settled is None else settled


def metric(samples: Mapping[Any, float], name: str, **labels: str) -> float:
    """The sum of the ``name`` samples of a ``CourierProcess.metrics()`` answer with ``labels``."""
    return sum(by_label(samples, name, "", **labels).values())


def by_label(
    samples: Mapping[Any, float], name: str, label: str, **labels: str
) -> dict[str, float]:
    """``name``'s samples with ``labels``, added up per value of ``label``."""
    found: dict[str, float] = defaultdict(float)
    for (sample, pairs), value in samples.items():
        pairs_ = dict(pairs)
        if sample == name and all(pairs_.get(k) == v for k, v in labels.items()):
            found[pairs_.get(label, "")] += value
    return found


def counter_deltas(
    before: Sequence[Mapping[Any, float]], after: Sequence[Mapping[Any, float]]
) -> dict[str, Any]:
    """Courier's counters over a drain, added up over the processes (``before`` may be {})."""

    none: Mapping[Any, float] = {}  # a process that joined during the drain: no baseline

    def total(name: str, label: str, **labels: str) -> dict[str, float]:
        found: dict[str, float] = defaultdict(float)
        for old, new in itertools.zip_longest(before, after, fillvalue=none):
            for key, value in by_label(new, name, label, **labels).items():
                found[key] += value
            for key, value in by_label(old, name, label, **labels).items():
                found[key] -= value
        return {k: v for k, v in sorted(found.items()) if v}

    outcomes = total("courier_messages_processed_total", "outcome")
    return {
        "messages_retried": outcomes.get("retried", 0.0),
        "outcomes": outcomes,
        "target_calls": total("courier_target_calls_total", "outcome", target=TARGET),
        "circuit_opens": total(
            "courier_target_circuit_transitions_total", "state", target=TARGET
        ).get("open", 0.0),
        "limit_changes": total("courier_target_limit_changes_total", "direction", target=TARGET),
    }


def drain_summary(calls: Sequence[TimelineEntry], t0: float, unloaded_ms: float) -> dict[str, Any]:
    """What a drain did at the target: goodput, latency, refusals, concurrency."""
    rate, elapsed = goodput(calls, t0)
    served = latencies(calls)
    statuses = Counter(str(c.status) for c in calls)
    turned_away = len(refused(calls))
    return {
        "calls": len(calls),
        "statuses": dict(sorted(statuses.items())),
        "ok_calls": len(served),
        "goodput": rate,
        "goodput_fraction": rate / MAX_GOODPUT,
        "steady_goodput": steady_goodput(calls),
        "drain_s": elapsed,
        "p50_ms": percentile(served, 0.5) * 1000,
        "p99_ms": percentile(served, 0.99) * 1000,
        "max_ms": max(served) * 1000 if served else float("nan"),
        "unloaded_ms": unloaded_ms,
        "p99_over_unloaded": percentile(served, 0.99) * 1000 / unloaded_ms,
        "refused": turned_away,
        "refused_share": turned_away / len(calls) if calls else float("nan"),
        "queued_share": sum(1 for c in calls if c.waited > 0) / len(calls) if calls else 0.0,
        "peak_concurrent": peak(calls, include_refused=True),
    }


def slim(section: Mapping[str, Any]) -> dict[str, Any]:
    """The section without what only the per-run report needs: the committed copy keeps the
    binned series and the halved run's limits (the plots), not every sampled gauge."""
    copy: dict[str, Any] = {**section, "runs": {}}
    for name, run in section.get("runs", {}).items():
        kept = {k: v for k, v in run.items() if k != "samples"}
        if name == "halved" and "samples" in run:
            kept["samples"] = {"t": run["samples"]["t"], "limit": run["samples"]["limit"]}
        copy["runs"][name] = kept
    return copy


# -- goals and tables -------------------------------------------------------------------------


def goals(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's goals against the section's runs (``report.goals_table`` renders them)."""
    runs = section.get("runs", {})
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: float, met: bool, detail: str) -> None:
        rows.append({"goal": goal, "measured": measured, "met": bool(met), "detail": detail})

    adaptive, fixed = runs.get("adaptive"), runs.get("fixed")
    if adaptive:
        a = adaptive["target"]
        add(
            f"adaptive, {PROCESSES} processes: goodput >= 0.9 of the target's maximum",
            a["goodput_fraction"],
            a["goodput_fraction"] >= 0.9,
            f"{a['goodput']:.0f} of {MAX_GOODPUT:.0f} effects/s from the release "
            f"(steady {_f(a['steady_goodput'])}, the start ramp left out)"
            + (f"; fixed 32: {fixed['target']['goodput']:.0f}" if fixed else ""),
        )
        add(
            "adaptive: < 1% of calls refused by the target",
            a["refused_share"],
            a["refused_share"] < 0.01,
            f"{a['refused']} of {a['calls']} calls"
            + (f"; fixed 32: {fixed['target']['refused_share']:.1%}" if fixed else ""),
        )
        add(
            "adaptive: p99 at the target <= 2x unloaded",
            a["p99_over_unloaded"],
            a["p99_over_unloaded"] <= 2.0,
            f"p99 {a['p99_ms']:.0f} ms vs {a['unloaded_ms']:.0f} ms unloaded"
            + (f"; fixed 32: {fixed['target']['p99_ms']:.0f} ms" if fixed else ""),
        )
    halved = runs.get("halved")
    if halved:
        follow = halved["follow"]
        add(
            f"capacity halved ({K} -> {K // 2}): the summed limit falls 40% within 5 s",
            follow["limit_drop_s"],
            follow["limit_drop_s"] <= 5.0,
            f"summed limit {follow['limit_before']:.0f} -> {follow['limit_after']:.0f}; target "
            f"p99 {_settled(follow['latency_settle_s'])}",
        )
    retry = runs.get("retry_after")
    if retry:
        pause = retry["pause"]
        wanted = retry["model"]["retry_after_seconds"]
        resumed = pause.get("resumed_after_first_429_s")
        add(
            f"429 with Retry-After: {wanted:.0f}: calls resume {wanted:.0f} s after the first "
            "429, not sooner; nothing lost",
            resumed,
            resumed is not None and resumed >= 0.98 * wanted and retry["lost"] == 0,
            f"no call for {_f(pause['longest_gap_s'], 2)} s: the {pause['refusals']} 429s "
            f"spread over {_f(pause.get('refusals_spread_s'), 2)} s (a process calls until its "
            f"own first 429); lost {_f(retry['lost'])}, duplicate effects "
            f"{retry['duplicate_effects']}",
        )
    cap = runs.get("fleet_cap")
    if cap:
        peak = cap["peak_concurrent"]
        add(
            f"fleet cap {K}, 3 processes (one joining): the target never sees more than {K}",
            peak,
            peak <= K,
            f"peak {peak} open at once (the stub's count: {cap['stub_peak_concurrent']}); "
            f"{_f(cap['goodput_calling'])} effects/s once calls began",
        )
    return rows


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def table(section: Mapping[str, Any]) -> str:
    """The markdown of the section: the runs side by side, then the other three findings."""
    runs = section.get("runs", {})
    model = section["model"]
    lines = [
        f"**Legacy target with a capacity** ({PROCESSES} courier processes, one target: "
        f"{model['capacity']} calls served at once at {model['latency_ms']:.0f} ms, "
        f"max {model['max_goodput']:.0f} effects/s; {model['queue']} more queued; beyond that "
        f"{model['overload_status']} with Retry-After: {model['retry_after_seconds']:.0f})",
        "",
        "| limit | messages | drained in s | goodput /s (of max) | p50 / p99 ms at target "
        "| refused calls | messages retried | circuit opens | dead-lettered | CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("adaptive", "adaptive (ceiling 32)"), ("fixed", "fixed 32")):
        run = runs.get(name)
        if not run:
            continue
        t, c = run["target"], run["courier"]
        drained = _f(t["drain_s"], 1) if run["drained"] else "not drained"
        lines.append(
            f"| {label} | {run['messages']:,} | {drained} | {_f(t['goodput'])} "
            f"({_f(t['goodput_fraction'] * 100)}%) | {_f(t['p50_ms'])} / {_f(t['p99_ms'])} | "
            f"{t['refused']:,} ({_f(t['refused_share'] * 100, 1)}%) | "
            f"{_f(c['messages_retried'])} | {_f(c['circuit_opens'])} | "
            f"{run['dead_lettered']:,} | {_f(run['cpu_ms_per_message'], 2)} |"
        )
    skipped = [f"- {name}: not run ({why})." for name, why in section.get("skipped", {}).items()]
    lines += ["", *_findings(runs), *skipped, "", "**Goals (issue 16)**", ""]
    lines += [
        report.goals_table(section.get("goals", [])),
        "",
        "Plots: `bench/plots/capacity-adaptive-vs-fixed.png` (goodput and latency over time), "
        "`bench/plots/capacity-halved.png` (limits per process and summed, target latency). "
        "Latency at the target is end - arrival of the calls it served, queue wait included; "
        "goodput is its 2xx answers per second from the resume to the last one. "
        "Reproduce: `python -m bench --only capacity` (`--quick`: ~1 min).",
    ]
    return "\n".join(lines)


def _settled(seconds: float) -> str:
    if seconds != seconds:
        return "not back under 2x unloaded for good by the end of the run"
    return f"back under 2x unloaded for good after {seconds:.1f} s"


def _findings(runs: Mapping[str, Any]) -> list[str]:
    lines = []
    halved = runs.get("halved")
    if halved:
        f, t = halved["follow"], halved["target"]
        lines.append(
            f"- Capacity halved ({K} -> {K // 2}) {f['halved_at_s']:.1f} s into the drain: the "
            f"summed limit went {_f(f['limit_before'])} -> {_f(f['limit_after'])} and had "
            f"fallen 40% after {_f(f['limit_drop_s'], 1)} s; target p99 "
            f"{_settled(f['latency_settle_s'])}. Whole run: "
            f"{_f(t['goodput'])} effects/s, {t['refused']} refused, p99 {_f(t['p99_ms'])} ms."
        )
    retry = runs.get("retry_after")
    if retry:
        p = retry["pause"]
        lines.append(
            f"- 429 with Retry-After: {retry['model']['retry_after_seconds']:.0f}: "
            f"{p['refusals']} calls answered 429 (the target overloaded on purpose until every "
            f"process had paused; the 429s spread over {_f(p.get('refusals_spread_s'), 2)} s); "
            f"the longest gap in calls after the first was {_f(p['longest_gap_s'], 2)} s, and "
            f"calls resumed {_f(p.get('resumed_after_first_429_s'), 2)} s after the first 429; "
            f"{retry['messages']:,} messages, "
            f"{_f(retry['lost'])} lost, {retry['duplicate_effects']} duplicate effects, "
            f"{retry['dead_lettered']} dead-lettered."
        )
    cap = runs.get("fleet_cap")
    if cap:
        lines.append(
            f"- Fleet cap {K} with 3 processes (the third started "
            f"{cap['joined_at_s']:.1f} s into the drain): at most {cap['peak_concurrent']} "
            f"calls open at the target at once (after the join: "
            f"{cap['peak_after_join']}); the first call came {_f(cap['first_call_s'], 1)} s "
            f"after the backlog was released (a process takes a share only after the fleet's "
            f"join wait, {_f(cap['join_wait_s'])} s); then {_f(cap['goodput_calling'])} "
            f"effects/s until drained. The shares summed to at most "
            f"{_f(cap.get('summed_share_max'))}, and to {_f(cap.get('summed_share_while_joining'))} "
            f"while the third process waited out its join wait."
        )
    return lines


# -- running ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The courier processes of one run, and their /metrics sampled over time."""

    processes: dict[str, CourierProcess] = field(default_factory=dict)
    cpu_base: dict[str, float] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=lambda: {"t": [], **{k: {} for k in GAUGES}})

    def add(self, name: str, process: CourierProcess) -> None:
        """A started process; its CPU counts from now (its start-up is not the drain's)."""
        self.processes[name] = process
        self.cpu_base[name] = process.cpu_seconds()

    def signal(self, signum: int) -> None:
        """``signum`` to every process (SIGSTOP/SIGCONT around the load, SIGTERM at the end)."""
        for process in self.processes.values():
            process.signal(signum)

    def cpu_seconds(self) -> float:
        """User + system CPU of the processes since each was added."""
        return sum(p.cpu_seconds() - self.cpu_base[n] for n, p in self.processes.items())

    async def metrics(self) -> list[dict[Any, float]]:
        """Every process's /metrics (``CourierProcess.metrics``); {} for one that failed."""
        found = await asyncio.gather(
            *(p.metrics() for p in self.processes.values()), return_exceptions=True
        )
        return [f if isinstance(f, dict) else {} for f in found]

    async def sample(self, t0: float, every: float) -> None:
        """Append a sample of every process's target gauges every ``every`` seconds.

        A process that has not started yet has None in its series, as does a gauge its
        courier does not expose.
        """
        while True:
            started = time.monotonic()
            names = list(self.processes)
            found = await self.metrics()
            index = len(self.samples["t"])
            self.samples["t"].append(round(started - t0, 3))
            for name, values in zip(names, found, strict=True):
                for key, metric_name in GAUGES.items():
                    series = self.samples[key].setdefault(name, [])
                    series.extend([None] * (index - len(series)))
                    present = any(s == metric_name for s, _ in values)
                    series.append(metric(values, metric_name, target=TARGET) if present else None)
            await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))


@dataclass
class Rig:
    """What every run of the section shares."""

    stack: AwsStack
    stubs: StubProcess
    base: Settings
    mode: CapacityMode
    log: Log
    retiring: list[asyncio.Task[None]] = field(default_factory=list)  # runs' processes stopping


def worker_settings(rig: Rig, queue: Any, **target: Any) -> Settings:
    """courier's defaults, role worker, the one target with ``target``'s settings."""
    settings: Settings = rig.stack.resources.apply_to(rig.base.replace(aws=rig.stack.settings))
    url = f"{rig.stubs.urls[TARGET]}/{TARGET}"
    return settings.replace(
        role="worker",
        queue=queue,
        targets=(TargetSettings(name=TARGET, url=url, format="json", **target),),
        http=dataclasses.replace(settings.http, port=0, health_port=0),
    )


async def timeline(stubs: StubProcess) -> list[TimelineEntry]:
    """Every call the target recorded (``GET /_stub/timeline``), in arrival order."""
    return sorted(await stubs.timeline(TARGET))


async def _delivered(stubs: StubProcess) -> int:
    return int((await stubs.stats(TARGET))["keys"])


async def _queue_empty(stack: AwsStack, url: str) -> bool:
    return await workload.depth(stack.direct, stack.queue_url(url, direct=True)) == (0, 0)


async def _until_delivered(rig: Rig, queue: Any, wanted: int, deadline: float) -> bool:
    """True once ``wanted`` effects are at the target; False at ``deadline``, or as soon as
    the queue stayed empty for a second with effects missing (the rest went to the DLQ)."""
    empty_since: float | None = None
    while time.monotonic() < deadline:
        if await _delivered(rig.stubs) >= wanted:
            return True
        await asyncio.sleep(0.2)
        if not await _queue_empty(rig.stack, queue.url):
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since >= 1.0 and await _delivered(rig.stubs) < wanted:
            return False
    return False


async def drain(
    rig: Rig,
    label: str,
    events: Sequence[Event],
    behaviour: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    window: float,
    start_processes: int = PROCESSES,
    during: Side | None = None,
) -> dict[str, Any]:
    """One run: fresh queue, stub ``behaviour``, processes started and paused, backlog loaded,
    resumed at t0, ``during(t0, fleet, start)`` beside the drain, until every message's
    effect is at the target or ``window`` closes. Returns the run's numbers and raw parts.

    A drained run's processes stop in the background (``Rig.retiring``) while the next run
    starts: they have nothing left to deliver, and a stop takes seconds."""
    stack, stubs = rig.stack, rig.stubs
    queue = await stack.queue_pair(f"cap{next(_runs)}-{label}")
    await stubs.reset([TARGET])
    await stubs.set_behaviour(TARGET, **behaviour)
    settings = worker_settings(rig, queue, **target)
    fleet = Fleet()
    exits = contextlib.AsyncExitStack()
    began = time.monotonic()
    try:

        async def start(name: str) -> CourierProcess:
            process = await exits.enter_async_context(courier_process(settings, name=name))
            fleet.add(name, process)
            return process

        await asyncio.gather(*(start(f"cap-{label}-{i}") for i in range(start_processes)))
        started = time.monotonic()
        measured = await _measure(rig, fleet, queue, events, window, during, start)
        collected = await _collect(rig, queue, measured["t0"])
    except BaseException:
        await _retire(stack, exits, queue)
        raise
    fleet.signal(signal.SIGTERM)  # all at once: the exit stack then waits for each in turn
    retiring = _retire(stack, exits, queue)
    if measured["drained"]:
        rig.retiring.append(asyncio.create_task(retiring))
    else:  # what they still have in flight must not reach the next run's timeline
        await retiring
    calls, stats, t0 = collected["calls"], collected["stats"], measured["t0"]
    run = {
        "messages": len(events),
        "drained": measured["drained"],
        "window_s": window,
        "elapsed_s": round(measured["ended"] - t0, 2),
        "processes": len(fleet.processes),
        "target": drain_summary(calls, t0, behaviour.get("latency_seconds", 0) * 1000),
        "courier": counter_deltas(measured["before"], measured["after"]),
        "cpu_ms_per_message": measured["cpu"] * 1000 / max(1, stats["keys"]),
        "delivered": stats["keys"],
        "lost": len(events) - stats["keys"] if measured["drained"] else None,
        "duplicate_effects": stats.get("duplicate_effects", 0),
        "stub_peak_concurrent": stats.get("peak_concurrent"),
        "stub_refused": stats.get("refused"),
        "left_in_queue": collected["left"],
        "dead_lettered": collected["dead_lettered"],
        "overhead_s": {
            "start": round(started - began, 2),
            "load": round(t0 - started, 2),
            "collect": round(collected["at"] - measured["ended"], 2),
        },
        "series": bins(calls, t0),
        "samples": fleet.samples,
    }
    return {"run": run, "calls": calls, "t0": t0, "side": measured["side"]}


async def _measure(
    rig: Rig,
    fleet: Fleet,
    queue: Any,
    events: Sequence[Event],
    window: float,
    during: Side | None,
    start: Callable[[str], Awaitable[CourierProcess]],
) -> dict[str, Any]:
    """Pause the fleet, load the backlog, resume at t0 and wait for every event's effect."""
    await asyncio.sleep(SETTLE_SECONDS)
    before = await fleet.metrics()  # nothing changes them while the processes are stopped
    fleet.signal(signal.SIGSTOP)
    await workload.load(rig.stack.direct, rig.stack.queue_url(queue.url, direct=True), events)
    cpu_before = fleet.cpu_seconds()
    t0 = time.monotonic()
    fleet.signal(signal.SIGCONT)
    sampler = asyncio.create_task(fleet.sample(t0, rig.mode.sample_seconds))
    side = asyncio.create_task(during(t0, fleet, start)) if during else None
    try:
        drained = await _until_delivered(rig, queue, len(events), t0 + window)
        ended = time.monotonic()
        # A side action that failed (a knob the stub lacks) fails the run.
        side_result = side.result() if side and side.done() else None
    finally:
        sampler.cancel()
        if side and not side.done():
            side.cancel()
        await asyncio.gather(sampler, *([side] if side else []), return_exceptions=True)
    cpu = fleet.cpu_seconds() - cpu_before
    return {
        "t0": t0,
        "ended": ended,
        "drained": drained,
        "side": side_result,
        "cpu": cpu,
        "before": before,
        "after": await fleet.metrics(),
    }


async def _collect(rig: Rig, queue: Any, t0: float) -> dict[str, Any]:
    """The target's timeline and stats, and what is left on the queue and its DLQ."""
    await asyncio.sleep(0.2)  # the last answers are recorded before the timeline is read
    calls = since(await timeline(rig.stubs), t0 - 1.0)
    stats = await rig.stubs.stats(TARGET)
    depths = []
    async with plain_client("sqs", rig.stack.direct) as sqs:
        for url in (queue.url, queue.dlq_url):
            answer = await sqs.get_queue_attributes(
                QueueUrl=rig.stack.queue_url(url, direct=True),
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
            depths.append(sum(int(v) for v in answer["Attributes"].values()))
    return {
        "calls": calls,
        "stats": stats,
        "left": depths[0],
        "dead_lettered": depths[1],
        "at": time.monotonic(),
    }


async def _retire(stack: AwsStack, exits: contextlib.AsyncExitStack, queue: Any) -> None:
    """Stop a run's processes, then delete its queues."""
    try:
        await exits.aclose()
    finally:
        await stack.delete_queues(
            stack.queue_url(queue.url, direct=True), stack.queue_url(queue.dlq_url, direct=True)
        )


def log_run(log: Log, label: str, run: Mapping[str, Any]) -> None:
    """One line per run: what a reader of the bench's output wants to see go by."""
    t, c = run["target"], run["courier"]
    log(
        f"capacity {label:<11}: {run['messages']} msgs "
        f"{'drained' if run['drained'] else 'NOT drained'} in {t['drain_s']:.1f} s, "
        f"goodput {t['goodput']:.0f}/s ({t['goodput_fraction']:.0%}), p50/p99 "
        f"{t['p50_ms']:.0f}/{t['p99_ms']:.0f} ms, refused {t['refused']} ({t['refused_share']:.1%}), "
        f"peak {t['peak_concurrent']}, retried {c['messages_retried']:.0f}, circuit opens "
        f"{c['circuit_opens']:.0f}, CPU {run['cpu_ms_per_message']:.2f} ms/msg"
    )


def model(retry_after: float = 1.0, overload: int = 503) -> dict[str, Any]:
    """The stub's knobs for the target with a capacity."""
    return {
        "latency_seconds": LATENCY_SECONDS,
        "capacity": K,
        "queue": Q,
        "overload_status": overload,
        "retry_after_seconds": retry_after,
    }


def describe(behaviour: Mapping[str, Any]) -> dict[str, Any]:
    """``behaviour`` as the report shows the model."""
    return {
        "capacity": behaviour["capacity"],
        "queue": behaviour["queue"],
        "latency_ms": behaviour["latency_seconds"] * 1000,
        "overload_status": behaviour["overload_status"],
        "retry_after_seconds": behaviour["retry_after_seconds"],
        "max_goodput": behaviour["capacity"] / behaviour["latency_seconds"],
    }


async def run_adaptive_vs_fixed(rig: Rig, events: Mapping[str, Sequence[Event]]) -> dict[str, Any]:
    """The same backlog drained with adaptive limits and with a fixed 32 per process."""
    found: dict[str, Any] = {}
    for label, target, window in (
        ("adaptive", {"limit": "adaptive", "concurrency": CEILING}, rig.mode.window_seconds),
        ("fixed", {"limit": "fixed", "concurrency": CEILING}, rig.mode.fixed_window_seconds),
    ):
        done = await drain(rig, label, events[label], model(), target, window=window)
        log_run(rig.log, label, done["run"])
        found[label] = done["run"]
    return found


async def run_halved(rig: Rig, events: Sequence[Event]) -> dict[str, Any]:
    """Adaptive; K drops to K/2 ``halve_after_seconds`` into the drain."""
    after = rig.mode.halve_after_seconds

    async def halve(t0: float, *_: Any) -> float:
        await asyncio.sleep(max(0.0, t0 + after - time.monotonic()))
        at = time.monotonic() - t0
        await rig.stubs.set_behaviour(TARGET, capacity=K // 2)
        return at

    target = {"limit": "adaptive", "concurrency": CEILING}
    done = await drain(rig, "halved", events, model(), target, window=rig.mode.window_seconds, during=halve)  # fmt: skip
    run: dict[str, Any] = done["run"]
    halved_at = done["side"] if done["side"] is not None else after
    run["follow"] = follow(run, halved_at)
    log_run(rig.log, "halved", run)
    f = run["follow"]
    rig.log(
        f"capacity halved at {halved_at:.1f} s: summed limit {f['limit_before']:.1f} -> "
        f"{f['limit_after']:.1f}, -40% after {f['limit_drop_s']:.1f} s, p99 settled after "
        f"{f['latency_settle_s']:.1f} s"
    )
    return run


def follow(run: Mapping[str, Any], halved_at: float) -> dict[str, float]:
    """How the summed limit and the target's latency followed a halving at ``halved_at``."""
    samples = run["samples"]
    ts, total = samples["t"], summed(samples)
    end = ts[-1] if ts else 0.0
    # The limits ramp up from the floor first: the second half before the halving, at most 3 s.
    before = window_median(ts, total, max(halved_at / 2, halved_at - 3.0), halved_at)
    return {
        "halved_at_s": halved_at,
        "limit_before": before,
        "limit_after": window_median(ts, total, max(halved_at, end - 3.0), end),
        "limit_drop_s": first_at_or_below(ts, total, halved_at, 0.6 * before),
        "latency_settle_s": settle_seconds(
            run["series"], halved_at, 2 * run["target"]["unloaded_ms"]
        ),
    }


async def run_retry_after(rig: Rig, events: Sequence[Event]) -> dict[str, Any]:
    """Adaptive; 429 + Retry-After: 5 beyond K+Q; a brief overload forces the first 429s."""
    behaviour = model(retry_after=RETRY_AFTER_SECONDS, overload=429)

    async def overload(t0: float, fleet: Fleet, *_: Any) -> float:
        """Overload the target until every process has paused (at most DIP_MAX_SECONDS)."""
        await asyncio.sleep(max(0.0, t0 + rig.mode.dip_after_seconds - time.monotonic()))
        await rig.stubs.set_behaviour(TARGET, capacity=2, queue=0)
        deadline = time.monotonic() + DIP_MAX_SECONDS
        try:
            while time.monotonic() < deadline:
                found = await fleet.metrics()
                if all(metric(m, "courier_target_paused", target=TARGET) for m in found):
                    break
                await asyncio.sleep(0.02)
        finally:
            await rig.stubs.set_behaviour(TARGET, capacity=K, queue=Q)
        return time.monotonic() - t0

    target = {"limit": "adaptive", "concurrency": CEILING}
    done = await drain(rig, "retry_after", events, behaviour, target, window=rig.mode.window_seconds, during=overload)  # fmt: skip
    run: dict[str, Any] = done["run"]
    calls: list[TimelineEntry] = done["calls"]
    first = first_with_status(calls, 429)
    gap, began = longest_gap(calls, first.arrival) if first else (float("nan"), float("nan"))
    ts = run["samples"]["t"]
    paused = [round(held_seconds(ts, series), 2) for series in run["samples"]["paused"].values()]
    run["model"] = describe(behaviour)
    refusals = [c.arrival for c in calls if c.status == 429]
    run["pause"] = {
        "refusals": len(refusals),
        "refusals_spread_s": max(refusals) - min(refusals) if refusals else None,
        "overload_ended_s": done["side"],
        "first_429_at_s": first.arrival - done["t0"] if first else None,
        "longest_gap_s": gap,
        "gap_began_after_first_429_s": began - first.arrival if first else None,
        # The process paused first resumes first: the first call after the gap is its.
        "resumed_after_first_429_s": began + gap - first.arrival if first else None,
        "paused_seconds_per_process": paused,
    }
    log_run(rig.log, "retry_after", run)
    rig.log(
        f"capacity 429 + Retry-After {RETRY_AFTER_SECONDS:.0f}: {run['pause']['refusals']} x 429, "
        f"longest gap after the first {gap:.2f} s, calls resumed "
        f"{run['pause']['resumed_after_first_429_s']:.2f} s after it, lost {run['lost']}, paused per process "
        f"{[round(p, 1) for p in paused]} s"
    )
    return run


def join_wait_seconds(timeout_seconds: float) -> float:
    """How long a process joining the fleet takes no share (``service.worker.fleet``)."""
    try:
        from service.worker import fleet
    except ImportError:  # before issue 16: no fleet cap at all
        return 0.0
    timing = fleet.Timing.for_timeout(fleet.HEARTBEAT_SECONDS, timeout_seconds)
    return float(timing.join_wait)


async def run_fleet_cap(rig: Rig, events: Sequence[Event]) -> dict[str, Any]:
    """fleet_max_concurrency = K on an unlimited target; the third process joins under load.

    Every process waits the fleet's join wait before it takes a share: the first two call
    from about then, the third starts ``join_after_seconds`` later, and the window allows its
    own wait on top of the drain.
    """
    behaviour = {**model(), "capacity": 0, "queue": 0}
    wait = join_wait_seconds(TargetSettings().timeout_seconds)

    async def join(t0: float, _: Fleet, start: Callable[[str], Awaitable[Any]]) -> float:
        join_at = t0 + wait + rig.mode.join_after_seconds
        await asyncio.sleep(max(0.0, join_at - time.monotonic()))
        await start("cap-fleet_cap-joined")
        return time.monotonic() - t0

    target = {"limit": "adaptive", "concurrency": CEILING, "fleet_max_concurrency": K}
    window = rig.mode.window_seconds + 2 * wait
    done = await drain(rig, "fleet_cap", events, behaviour, target, window=window, start_processes=PROCESSES - 1, during=join)  # fmt: skip
    run: dict[str, Any] = done["run"]
    calls: list[TimelineEntry] = done["calls"]
    t0: float = done["t0"]
    joined = done["side"] if done["side"] is not None else float("nan")
    run["join_wait_s"] = wait
    run["joined_at_s"] = joined
    run["first_call_s"] = calls[0].arrival - t0 if calls else float("nan")
    run["goodput_calling"] = goodput(calls, calls[0].arrival)[0] if calls else 0.0
    run["peak_concurrent"] = run["target"]["peak_concurrent"]
    late = [c for c in calls if c.end >= t0 + joined] if joined == joined else []
    run["peak_after_join"] = peak(late, include_refused=True)
    shares = summed(run["samples"], "share")
    run["summed_share_max"] = max(shares, default=float("nan"))
    # While the joiner counts in the others' views but waits out its own join wait.
    run["summed_share_while_joining"] = window_median(
        run["samples"]["t"], shares, joined + 6.0, joined + wait - 1.0
    )
    log_run(rig.log, "fleet_cap", run)
    rig.log(
        f"capacity fleet cap {K}: peak {run['peak_concurrent']} (stub {run['stub_peak_concurrent']}), "
        f"after the join at {joined:.1f} s: {run['peak_after_join']}; first call "
        f"{run['first_call_s']:.1f} s after the resume (join wait {wait:.0f} s)"
    )
    return run


async def run_section(
    stack: AwsStack, base: Settings, mode: CapacityMode, log: Log
) -> dict[str, Any]:
    """Every run of the section against a stub process of its own; the report's ``capacity``."""
    started = time.monotonic()
    n = round(MAX_GOODPUT * mode.backlog_seconds)
    sizes = {
        "fleet_cap": mode.fleet_messages,
        "adaptive": n,
        "fixed": n,
        "halved": round(MAX_GOODPUT * (mode.halve_after_seconds + mode.halved_tail_seconds / 2)),
        "retry_after": mode.retry_after_messages,
    }
    events = {
        name: await workload.seal_events(stack.direct, stack.resources.data_key_arn, size, f"c{name}")
        for name, size in sizes.items() if size
    }  # fmt: skip
    log(f"capacity: {sum(sizes.values())} events sealed in {time.monotonic() - started:.1f} s")
    runs: dict[str, Any] = {}
    async with stub_process({TARGET: LATENCY_SECONDS}, name="capacity-stubs") as stubs:
        rig = Rig(stack, stubs, base, mode, log)
        try:
            # First: the fleet cap counts live processes, and no earlier run's are around yet.
            if mode.fleet_messages:
                runs["fleet_cap"] = await run_fleet_cap(rig, events["fleet_cap"])
            runs.update(await run_adaptive_vs_fixed(rig, events))
            runs["halved"] = await run_halved(rig, events["halved"])
            runs["retry_after"] = await run_retry_after(rig, events["retry_after"])
        finally:
            await asyncio.gather(*rig.retiring, return_exceptions=True)
    section: dict[str, Any] = {
        "mode": dataclasses.asdict(mode),
        "model": describe(model()),
        "processes": PROCESSES,
        "targets_note": "courier is configured with this one target only",
        "duration_s": round(time.monotonic() - started),
        "runs": runs,
        "skipped": {}
        if mode.fleet_messages
        else {"fleet_cap": "quick mode: the fleet's join wait is longer than quick allows"},
    }
    section["goals"] = goals(section)
    return section
