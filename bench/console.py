"""The console's cost when nobody has it open: courier with it off and on, CPU per unit of work.

Issue 17: the operator console must add no measurable CPU to the hot path while nobody looks.
With ``console.enabled`` a sampler reads four metric families every
``console.sample_seconds`` (5 s) and a listener waits on its own port; nothing of it sits in
the API's or the worker's path (no middleware, no hook: the sampler only reads the counters
they keep anyway). So its cost is a standing cost, and that is measured directly:

1. **Standing cost (the goal).** Three workers side by side, console off, on, off, each first
   given ``IDLE_WARMUP_MESSAGES`` (so every metric child the sampler reads exists, as under
   load), then left idle: their CPU over the same ``idle_seconds`` to the nanosecond
   (``courier_testkit.sampling``). The two "off" workers give the idle noise. The difference,
   spread over a minute's messages at the loaded rate, must stay under
   ``STANDING_COST_LIMIT`` of the worker's CPU per message.
2. **Under load (reported, not judged).** The same worker drain (``bench.workers.run_once``,
   3 targets) and API saturation (``bench.api.saturation``) with the console off and on, in
   ABBA order (off, on, on, off) so a drift of the shared machine falls on both settings
   alike. On these shared cores runs with one setting differ by 10-20 %, so two runs each
   cannot resolve a cost of a few percent either way; the table shows the difference beside
   that noise, as a check that nothing large was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench import api, consumers, workers, workload
from courier_testkit.processes import HarnessError
from courier_testkit.sampling import cpu_seconds_between, thread_cpu_ns

# The console's standing cost may be at most this share of a loaded worker's CPU per message.
STANDING_COST_LIMIT = 0.01
# Idle workers first deliver this many messages (within IDLE_SETTLE_SECONDS), and are measured
# from IDLE_WARMUP_SECONDS after: past the console's first sample.
IDLE_WARMUP_MESSAGES = 100
IDLE_SETTLE_SECONDS = 30.0
IDLE_WARMUP_SECONDS = 6.0
# Loaded runs are reported, not judged: one ABBA round shows whether anything large was missed.
LOADED_ROUNDS = 1
WORKER_OFF, WORKER_ON = "courier", "courier-console"
API_OFF, API_ON = "courier", "courier-console"
_queues = itertools.count()


def abba(rounds: int) -> list[bool]:
    """Console on (True) or off, in ABBA order: off, on, on, off per round."""
    return [False, True, True, False] * rounds


def _setting(on: bool) -> str:
    return "on " if on else "off"


async def run_section(
    worker_bench: workers.WorkerBench,
    api_bench: api.ApiBench,
    latency: float,
    idle_seconds: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Idle workers, then worker drains and API saturations, console off and on."""
    idle: dict[str, Any]
    try:
        idle = await idle_cost(worker_bench, latency, idle_seconds)
    except HarnessError as exc:  # the loaded comparison is still worth having
        idle = {"seconds": idle_seconds, "error": str(exc)}
        log(f"console idle: not measured: {exc}")
    else:
        log(
            f"console idle: off {idle['off_ms_per_minute']:.1f} (noise "
            f"{idle['noise_ms_per_minute']:.1f}), on {idle['on_ms_per_minute']:.1f} ms CPU per "
            f"minute over {idle_seconds:.0f} s"
        )
    order = abba(LOADED_ROUNDS)
    worker_runs = []
    for on in order:
        run = await workers.run_once(worker_bench, WORKER_ON if on else WORKER_OFF, latency)
        log(
            f"console {_setting(on)} worker: {run['cpu_s_per_1000']:.3f} ms CPU/msg, "
            f"{run['msgs_per_s']:.0f} msg/s"
        )
        worker_runs.append(
            {"console": on, "value": run["cpu_s_per_1000"], "rate": run["msgs_per_s"]}
        )
    api_runs = []
    for on in order:
        run = await api.saturation(api_bench, API_ON if on else API_OFF)
        if run.get("hung"):
            log(f"console {_setting(on)} API: HUNG\n{run['where']}")
            continue
        log(
            f"console {_setting(on)} API: {run['server_cpu_s_per_1000']:.3f} ms CPU/req, "
            f"{run['rps']:.0f} req/s"
        )
        api_runs.append({"console": on, "value": run["server_cpu_s_per_1000"], "rate": run["rps"]})
    worker = compare(worker_runs, unit="message")
    if worker["measured"] and "error" not in idle:
        idle.update(standing_cost(idle, worker_runs, worker["off_ms"]))
    return {
        "order": ["on" if on else "off" for on in order],
        "idle": idle,
        "worker": worker,
        "api": compare(api_runs, unit="request"),
    }


async def idle_cost(bench: workers.WorkerBench, latency: float, seconds: float) -> dict[str, Any]:
    """CPU of three workers (console off, on, off), idle after a warm-up, over ``seconds``."""
    kinds = (WORKER_OFF, WORKER_ON, WORKER_OFF)
    stack = bench.stack
    await bench.stubs.reset()
    await bench.stubs.set_all([name for name, _ in consumers.TARGETS], latency_seconds=latency)
    queues: list[Any] = []
    try:
        async with contextlib.AsyncExitStack() as running:
            pids = []
            for kind in kinds:
                queues.append(await stack.queue_pair(f"idle{next(_queues)}-{kind}"))
                consumer = await running.enter_async_context(
                    consumers.start(
                        kind,
                        stack=stack,
                        stub_urls=bench.stubs.urls,
                        queue=queues[-1],
                        base=bench.base,
                    )
                )
                pids.append(consumer.processes[0].pid)
                warmup = bench.drain[:IDLE_WARMUP_MESSAGES]
                await workload.load(
                    stack.direct, stack.queue_url(queues[-1].url, direct=True), warmup
                )
            for queue in queues:
                direct_url = stack.queue_url(queue.url, direct=True)
                if not await workers.settle(bench, direct_url, IDLE_SETTLE_SECONDS):
                    raise HarnessError(f"the warm-up messages were not all delivered: {queue.url}")
            await asyncio.sleep(IDLE_WARMUP_SECONDS)
            before = [thread_cpu_ns(pid) for pid in pids]
            await asyncio.sleep(seconds)
            after = [thread_cpu_ns(pid) for pid in pids]
    finally:
        await bench.stubs.reset()
        urls = [url for queue in queues for url in (queue.url, queue.dlq_url)]
        await stack.delete_queues(*(stack.queue_url(url, direct=True) for url in urls))
    if not all(before) or not all(after):
        raise HarnessError(f"an idle worker ended (or has no schedstat) within {seconds:.0f} s")
    off_a, on, off_b = (
        cpu_seconds_between(b, a) * 1000 * 60 / seconds for b, a in zip(before, after, strict=True)
    )
    off = (off_a + off_b) / 2
    return {
        "seconds": seconds,
        "off_ms_per_minute": off,
        "on_ms_per_minute": on,
        "noise_ms_per_minute": abs(off_a - off_b),
        "difference_ms_per_minute": on - off,
        "share_of_a_core": (on - off) / 60_000,
    }


def standing_cost(
    idle: Mapping[str, Any], worker_runs: Sequence[Mapping[str, Any]], off_ms: float
) -> dict[str, float]:
    """The idle difference spread over a minute's messages at the console-on loaded rate
    (of the runs that completed something, as ``compare`` counts them)."""
    rate = statistics.median(float(r["rate"]) for r in _usable(worker_runs) if r["console"])
    per_message = max(0.0, idle["difference_ms_per_minute"]) / (60 * rate)
    return {
        "loaded_msgs_per_s": rate,
        "per_message_at_load_ms": per_message,
        "share_of_message_cpu": per_message / off_ms,
    }


def _usable(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs that completed something: a finite CPU per unit and a positive rate."""
    return [r for r in runs if math.isfinite(float(r["value"])) and float(r["rate"]) > 0]


def compare(runs: Sequence[Mapping[str, Any]], unit: str) -> dict[str, Any]:
    """Median CPU ms per ``unit`` off and on, their difference, and the same-setting noise:
    the larger gap between two runs with one setting. A run that completed nothing is left out.
    """
    usable = _usable(runs)
    off = [float(r["value"]) for r in usable if not r["console"]]
    on = [float(r["value"]) for r in usable if r["console"]]
    if not off or not on:
        return {"unit": unit, "runs": list(runs), "measured": False}
    off_median, on_median = statistics.median(off), statistics.median(on)
    difference = on_median - off_median
    return {
        "unit": unit,
        "runs": list(runs),
        "measured": True,
        "off_ms": off_median,
        "on_ms": on_median,
        "difference_ms": difference,
        "difference_share": difference / off_median,
        "noise_ms": max(max(off) - min(off), max(on) - min(on)),
    }


def goal_row(section: Mapping[str, Any]) -> tuple[str, float, bool, str]:
    """(goal, measured, met, detail) of the standing cost, for the report's goals table."""
    idle = section.get("idle", {})
    goal = (
        f"console's standing cost <= {STANDING_COST_LIMIT:.0%} of a worker's CPU per message "
        "(idle workers, console off, on, off)"
    )
    if "share_of_message_cpu" not in idle:
        why = idle.get("error") or "no loaded worker run to spread it over"
        return goal, float("nan"), False, f"not measured: {why}"
    share = idle["share_of_message_cpu"]
    return (
        goal,
        share,
        share <= STANDING_COST_LIMIT,
        f"{idle['difference_ms_per_minute']:+.1f} ms CPU per minute (idle noise "
        f"{idle['noise_ms_per_minute']:.1f}) = {idle['per_message_at_load_ms']:.5f} ms per "
        f"message at {idle['loaded_msgs_per_s']:.0f} msg/s ({share:.3%} of "
        f"{section['worker']['off_ms']:.3f} ms)",
    )


def table(section: Mapping[str, Any]) -> str:
    """The README's lines for this section."""
    lines = [
        "**Console on, nobody looking** (issue 17; CPU of courier's own process; loaded runs "
        f"in the order {', '.join(section['order'])})",
        "",
        "| path | console off | console on | difference | same-setting noise |",
        "|---|---:|---:|---:|---:|",
    ]
    for part, label in (("worker", "worker, ms CPU/msg"), ("api", "API, ms CPU/req")):
        c = section[part]
        if not c["measured"]:
            lines.append(f"| {label} | n/a | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {c['off_ms']:.3f} | {c['on_ms']:.3f} | "
            f"{c['difference_ms']:+.3f} ({c['difference_share']:+.1%}) | {c['noise_ms']:.3f} |"
        )
    idle = section.get("idle")
    if idle and "error" in idle:
        lines.append(f"| idle worker, ms CPU/minute | n/a | n/a | {idle['error']} | |")
    elif idle:
        lines.append(
            f"| idle worker, ms CPU/minute | {idle['off_ms_per_minute']:.1f} | "
            f"{idle['on_ms_per_minute']:.1f} | {idle['difference_ms_per_minute']:+.1f} "
            f"({idle['share_of_a_core']:.3%} of a core) | {idle['noise_ms_per_minute']:.1f} |"
        )
    note = (
        "Loaded rows are reported, not judged: the same-setting noise (the larger gap between "
        "two runs with one setting) is far more than the console's standing cost, so they can "
        "only show that nothing larger than that noise was missed."
    )
    if idle and "error" not in idle:
        note += (
            f" Idle row: three workers side by side, idle for {idle['seconds']:.0f} s after "
            f"{IDLE_WARMUP_MESSAGES} messages each (off, on, off; noise is the gap between the "
            "two off), the console's standing cost measured directly"
        )
        if "per_message_at_load_ms" in idle:
            note += (
                f": {idle['per_message_at_load_ms']:.5f} ms per message at "
                f"{idle['loaded_msgs_per_s']:.0f} msg/s, {idle['share_of_message_cpu']:.3%} of "
                "the worker's CPU per message"
            )
        note += "."
    return "\n".join([*lines, "", note])
