"""The profiling pass: py-spy on courier's own process under the main runs' workloads.

Run after the measured runs, on fresh processes, so py-spy's sampling never touches the CPU
figures of the comparison. Two recordings (``py-spy record --nonblocking --rate 250 --format
raw``, collapsed stacks):

- **worker**: one courier worker drains the pre-loaded queue (the drain and paced sets, so it
  does not run dry), three targets answering after 20 ms, as in the ``courier`` worker run;
- **api**: courier's API (default settings) under wrk at the main run's 64 connections, as in
  the ``courier`` saturation run.

Each gives the collapsed stacks, a flame graph (``bench.flame``), its CPU per unit of work
while profiled (py-spy attached; a sanity check, not the headline) and the samples per
component (``bench.attribution``). ``scale`` turns those samples into milliseconds of the
CPU per message and per request that the main run measured.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import api, attribution, consumers, flame, workers, workload

RATE_HZ = 250
REPO = Path(__file__).resolve().parents[1]
WARMUP_SECONDS = 1.0
_runs = itertools.count()


def py_spy() -> Path:
    """The py-spy installed beside this interpreter (the bench extra installs it)."""
    return Path(sys.executable).parent / "py-spy"


async def record(pid: int, seconds: float, out: Path) -> str:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``out`` (collapsed stacks); its output.

    ``--nonblocking`` reads the process's memory without pausing it, so the profiled process
    keeps its pace (at the price of an occasional torn stack, which lands in "other").
    """
    process = await asyncio.create_subprocess_exec(
        str(py_spy()), "record", "--nonblocking", "--rate", str(RATE_HZ),
        "--duration", str(max(1, round(seconds))), "--format", "raw", "-o", str(out),
        "--pid", str(pid),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    text, _ = await asyncio.wait_for(process.communicate(), timeout=seconds + 60)
    return text.decode(errors="replace").strip()


async def _completed(bench: workers.WorkerBench) -> int:
    """Messages that reached all three targets so far (the stubs count keys per target)."""
    counts = [(await bench.stubs.stats(name))["keys"] for name, _ in consumers.TARGETS]
    return min(counts)


async def worker(bench: workers.WorkerBench, seconds: float, out_dir: Path) -> dict[str, Any]:
    """Profile one courier worker draining the pre-loaded queue (targets at 20 ms)."""
    stack = bench.stack
    queue = await stack.queue_pair(f"prof{next(_runs)}-worker")
    direct_url = stack.queue_url(queue.url, direct=True)
    raw = out_dir / "flame-worker.collapsed.txt"
    names = [name for name, _ in consumers.TARGETS]
    await bench.stubs.reset()
    await bench.stubs.set_all(names, latency_seconds=0.02)
    try:
        async with consumers.start(
            "courier", stack=stack, stub_urls=bench.stubs.urls, queue=queue, base=bench.base
        ) as consumer:
            consumer.pause()
            await workload.load(stack.direct, direct_url, [*bench.drain, *bench.paced])
            consumer.resume()
            await asyncio.sleep(WARMUP_SECONDS)
            at, cpu, done = time.monotonic(), consumer.cpu_seconds(), await _completed(bench)
            said = await record(consumer.processes[0].pid, seconds, raw)
            cpu = consumer.cpu_seconds() - cpu
            at, done = time.monotonic() - at, await _completed(bench) - done
            await workload.purge(stack.direct, direct_url)
            await workers.settle(bench, direct_url, workers.SETTLE_TIMEOUT_SECONDS)
    finally:
        await bench.stubs.reset()
        await stack.delete_queues(direct_url, stack.queue_url(queue.dlq_url, direct=True))
    return _summary(raw, said, seconds, at, cpu, done, "message")


async def api_server(bench: api.ApiBench, seconds: float, out_dir: Path) -> dict[str, Any]:
    """Profile courier's API (default settings) under wrk at ``bench.connections``."""
    token = bench.token()
    raw = out_dir / "flame-api.collapsed.txt"
    async with api.server(bench, "courier") as (url, handle):
        await api.wrk(url, bench.warmup_seconds, bench.connections, token)
        load = asyncio.create_task(
            api.wrk(url, seconds + 2 * WARMUP_SECONDS, bench.connections, token)
        )
        await asyncio.sleep(WARMUP_SECONDS)
        at, cpu, (done, _) = time.monotonic(), handle.cpu_seconds(), await api.served(url, handle)
        said = await record(handle.pid, seconds, raw)
        cpu = handle.cpu_seconds() - cpu
        at, done = time.monotonic() - at, (await api.served(url, handle))[0] - done
        await load
    await bench.stubs.reset(["idm"])
    return _summary(raw, said, seconds, at, cpu, int(done), "request")


def _summary(
    raw: Path, said: str, seconds: float, elapsed: float, cpu: float, units: int, unit: str
) -> dict[str, Any]:
    stacks = attribution.parse_collapsed(raw.read_text()) if raw.exists() else []
    samples = attribution.breakdown(stacks)
    return {
        "unit": unit,
        "seconds": seconds,
        "rate_hz": RATE_HZ,
        "collapsed": str(raw),
        "samples": sum(samples.values()),
        "samples_by_component": dict(samples),
        "courier_samples_by_module": dict(attribution.courier_modules(stacks).most_common(12)),
        # What py-spy saw running, as a share of one core: near the CPU share below when
        # the sampler kept up.
        "sampled_cpu_share": sum(samples.values()) / max(1.0, RATE_HZ * seconds),
        "cpu_share": cpu / max(1e-6, elapsed),
        f"{unit}s": units,
        "cpu_ms_per_unit_profiled": cpu * 1000 / units if units else float("nan"),
        "py_spy": said.splitlines()[-1] if said else "",
    }


def scale(profile: dict[str, Any], measured_ms: float, source: str) -> None:
    """Add ``breakdown``: the samples split over ``measured_ms`` (the main run's CPU per unit)."""
    profile["measured_ms_per_unit"] = measured_ms
    profile["measured_in"] = source
    profile["breakdown"] = attribution.scaled(profile["samples_by_component"], measured_ms)


def publish(result: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Copy the collapsed stacks into ``plot_dir`` and draw the flame graphs beside them.

    Updates the report's paths to where the files now are.
    """
    made = []
    for name, profile in result.get("profile", {}).items():
        if not isinstance(profile, dict) or "collapsed" not in profile:
            continue
        source = Path(profile["collapsed"])
        if not source.is_absolute():
            source = REPO / source
        if not source.exists():
            continue
        plot_dir.mkdir(parents=True, exist_ok=True)
        collapsed = plot_dir / f"flame-{name}.collapsed.txt"
        if source.resolve() != collapsed.resolve():
            shutil.copyfile(source, collapsed)
        svg = plot_dir / f"flame-{name}.svg"
        what = (
            "courier worker, 3 targets at 20 ms"
            if name == "worker"
            else "courier API at saturation"
        )
        stacks = attribution.parse_collapsed(collapsed.read_text())
        svg.write_text(flame.render(stacks, f"{what}: py-spy, {profile['rate_hz']} Hz"))
        profile["collapsed"], profile["svg"] = _relative(collapsed), _relative(svg)
        made += [svg, collapsed]
    return made


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
