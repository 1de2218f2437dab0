"""The console's cost when nobody has it open: courier with it off and on, CPU per unit of work.

Issue 17: the operator console must add no measurable CPU to the hot path while nobody looks.
With ``console.enabled`` a sampler reads four metric families every
``console.sample_seconds`` (5 s) and a listener waits on its own port; nothing else of it runs
until a page is opened. This section runs the same worker drain (``bench.workers.run_once``,
3 targets at the mode's first latency) and the same API saturation (``bench.api.saturation``)
with the console off and on, in ABBA order (off, on, on, off, ...) so a drift of the shared
machine falls on both settings alike. It reports CPU of courier's own process per 1,000
messages and per 1,000 requests for each setting, the difference, and the noise it is judged
against: how far apart two runs with the same setting landed.

Under load that noise is several percent, far above what the console can cost, so the section
also measures the console's standing cost directly: two idle workers side by side, one with
the console off and one with it on, their CPU over the same ``idle_seconds`` (to the
nanosecond: ``courier_testkit.sampling.scheduled_cpu_seconds``). The difference
per second, divided by the loaded worker's rate, is what the console can add per message.

"Not measurable" means the difference is within that noise, or within ``NOISE_FLOOR`` of the
console-off median when the runs happened to agree more closely than this machine usually does.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench import api, consumers, workers
from courier_testkit.sampling import scheduled_cpu_seconds

# A difference this small (a fraction of the console-off median) is below what two runs with
# the same setting differ by on these shared cores, even when one pair happens to agree.
NOISE_FLOOR = 0.03
WORKER_OFF, WORKER_ON = "courier", "courier-console"
API_OFF, API_ON = "courier", "courier-console"


def abba(rounds: int) -> list[bool]:
    """Console on (True) or off, in ABBA order: off, on, on, off per round."""
    return [False, True, True, False] * rounds


async def run_section(
    worker_bench: workers.WorkerBench,
    api_bench: api.ApiBench,
    latency: float,
    rounds: int,
    idle_seconds: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Idle workers, then worker drains and API saturations, console off and on."""
    idle = await idle_cost(worker_bench, idle_seconds)
    log(
        f"console idle: off {idle['off_ms_per_minute']:.1f}, on {idle['on_ms_per_minute']:.1f} "
        f"ms CPU per minute ({idle['difference_ms_per_minute']:+.1f}) over {idle_seconds:.0f} s"
    )
    order = abba(rounds)
    worker_runs = []
    for on in order:
        run = await workers.run_once(worker_bench, WORKER_ON if on else WORKER_OFF, latency)
        worker_runs.append(
            {"console": on, "value": run["cpu_s_per_1000"], "rate": run["msgs_per_s"]}
        )
        log(
            f"console {'on ' if on else 'off'} worker: {run['cpu_s_per_1000']:.3f} ms CPU/msg, "
            f"{run['msgs_per_s']:.0f} msg/s"
        )
    api_runs = []
    for on in order:
        run = await api.saturation(api_bench, API_ON if on else API_OFF)
        if run.get("hung"):
            log(f"console {'on ' if on else 'off'} API: HUNG\n{run['where']}")
            continue
        api_runs.append({"console": on, "value": run["server_cpu_s_per_1000"], "rate": run["rps"]})
        log(
            f"console {'on ' if on else 'off'} API: {run['server_cpu_s_per_1000']:.3f} ms CPU/req, "
            f"{run['rps']:.0f} req/s"
        )
    worker = compare(worker_runs, unit="message")
    if worker.get("measured"):
        rate = statistics.median(float(r["rate"]) for r in worker_runs if r["console"])
        # ms of CPU per minute, spread over a minute's messages at the loaded rate.
        idle["per_message_at_load_ms"] = idle["difference_ms_per_minute"] / (60 * rate)
    return {
        "order": ["on" if on else "off" for on in order],
        "idle": idle,
        "worker": worker,
        "api": compare(api_runs, unit="request"),
    }


async def idle_cost(bench: workers.WorkerBench, seconds: float) -> dict[str, Any]:
    """CPU of two idle workers, console off and on, over the same ``seconds``."""
    queues = [await bench.stack.queue_pair(f"idle-{kind}") for kind in (WORKER_OFF, WORKER_ON)]
    try:
        async with contextlib.AsyncExitStack() as running:
            started = [
                await running.enter_async_context(
                    consumers.start(
                        kind,
                        stack=bench.stack,
                        stub_urls=bench.stubs.urls,
                        queue=queue,
                        base=bench.base,
                    )
                )
                for kind, queue in zip((WORKER_OFF, WORKER_ON), queues, strict=True)
            ]
            pids = [consumer.processes[0].pid for consumer in started]
            before = [scheduled_cpu_seconds(pid) for pid in pids]
            await asyncio.sleep(seconds)
            after = [scheduled_cpu_seconds(pid) for pid in pids]
    finally:
        for queue in queues:
            await bench.stack.delete_queues(
                bench.stack.queue_url(queue.url, direct=True),
                bench.stack.queue_url(queue.dlq_url, direct=True),
            )
    off, on = ((a - b) * 1000 * 60 / seconds for a, b in zip(after, before, strict=True))
    return {
        "seconds": seconds,
        "off_ms_per_minute": off,
        "on_ms_per_minute": on,
        "difference_ms_per_minute": on - off,
        "share_of_a_core": (on - off) / 60_000,
    }


def compare(runs: Sequence[Mapping[str, Any]], unit: str) -> dict[str, Any]:
    """Median CPU ms per ``unit`` off and on, their difference, and the same-setting noise."""
    off = [float(r["value"]) for r in runs if not r["console"]]
    on = [float(r["value"]) for r in runs if r["console"]]
    if not off or not on:
        return {"unit": unit, "runs": list(runs), "measured": False}
    off_median, on_median = statistics.median(off), statistics.median(on)
    difference = on_median - off_median
    noise = max(max(off) - min(off), max(on) - min(on))
    allowed = max(noise, NOISE_FLOOR * off_median)
    return {
        "unit": unit,
        "runs": list(runs),
        "measured": True,
        "off_ms": off_median,
        "on_ms": on_median,
        "difference_ms": difference,
        "difference_share": difference / off_median,
        "noise_ms": noise,
        "allowed_ms": allowed,
        "within_noise": abs(difference) <= allowed,
    }


def goal_rows(section: Mapping[str, Any]) -> list[tuple[str, float, bool, str]]:
    """(goal, measured, met, detail) for the report's goals table."""
    rows = []
    for part, label in (("worker", "worker"), ("api", "API")):
        c = section[part]
        if not c.get("measured"):
            goal = f"console on, nobody looking: {label} CPU per {c['unit']} within noise"
            rows.append((goal, float("nan"), False, "not measured (a run hung or is missing)"))
            continue
        rows.append(
            (
                f"console on, nobody looking: {label} CPU per {c['unit']} within noise",
                c["difference_share"],
                bool(c["within_noise"]),
                f"off {c['off_ms']:.3f} ms, on {c['on_ms']:.3f} ms: {c['difference_ms']:+.3f} ms "
                f"({c['difference_share']:+.1%}); same-setting runs differ by up to "
                f"{c['noise_ms']:.3f} ms, allowed {c['allowed_ms']:.3f} ms",
            )
        )
    return rows


def table(section: Mapping[str, Any]) -> str:
    """The README's lines for this section."""
    lines = [
        "**Console on, nobody looking** (issue 17; runs in the order "
        f"{', '.join(section['order'])}: CPU of courier's own process)",
        "",
        "| path | console off | console on | difference | same-setting noise |",
        "|---|---:|---:|---:|---:|",
    ]
    for part, label in (("worker", "worker, ms CPU/msg"), ("api", "API, ms CPU/req")):
        c = section[part]
        if not c.get("measured"):
            lines.append(f"| {label} | n/a | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {c['off_ms']:.3f} | {c['on_ms']:.3f} | "
            f"{c['difference_ms']:+.3f} ({c['difference_share']:+.1%}) | {c['noise_ms']:.3f} |"
        )
    idle = section.get("idle")
    if idle:
        at_load = idle.get("per_message_at_load_ms")
        lines.append(
            f"| idle worker, ms CPU/minute | {idle['off_ms_per_minute']:.1f} | "
            f"{idle['on_ms_per_minute']:.1f} | {idle['difference_ms_per_minute']:+.1f} "
            f"({idle['share_of_a_core']:.3%} of a core"
            + (f"; {at_load:.4f} ms/msg at load" if at_load is not None else "")
            + ") | |"
        )
    note = (
        "Same-setting noise: the largest gap between two runs with the same setting. A "
        f"difference within it (or within {NOISE_FLOOR:.0%} of the console-off median) is not "
        "measurable on this machine."
    )
    if idle:
        note += (
            " The idle row is the console's standing cost measured directly (two idle workers "
            f"side by side for {idle['seconds']:.0f} s), and what it comes to per message at the "
            "loaded rate."
        )
    return "\n".join([*lines, "", note])
