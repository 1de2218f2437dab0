"""``python -m bench [--quick]``: run every comparison, write the JSON report and the plots.

Quick mode (``make bench-quick``, about 5 minutes): one run of each consumer with targets at
20 ms, short windows, 30 s idle. Full mode (``make bench``, about 25 minutes): three
interleaved repetitions at 20 ms and at 100 ms, 10 minutes idle.
After the measured runs a profiling pass (``bench.profiling``; ``--no-profile`` skips it)
records courier's worker and API with py-spy on fresh processes: flame graphs and a 'where the
CPU goes' table scaled to the measured CPU per message and per request.
Reports go to ``bench/results/<timestamp>-<mode>.json`` (git-ignored); ``--publish`` (the
default in full mode) also writes ``bench/results-latest.json``, ``bench/plots/*.png``,
``bench/plots/flame-*.svg`` (with their collapsed stacks) and ``bench/README-section.md``.
After the API phase come two sections:

- console (``bench.console``, issue 17): courier with the operator console off and on, nobody
  looking, idle side by side and then under load in ABBA order; about 2 minutes quick,
  4 full; ``--no-console`` skips it;
- capacity (``bench.capacity``, issue 16): 3 processes against a target with a real capacity;
  about 1 minute quick, 5 full; ``--no-capacity`` skips it, ``--only capacity`` runs only it
  (and with ``--publish`` merges it into ``results-latest.json`` and ``README-section.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    api,
    capacity,
    console,
    consumers,
    cost,
    plots,
    profiling,
    report,
    workers,
    workload,
)
from courier_testkit.aws import aws_stack, demo_secrets, node_binary
from courier_testkit.processes import REPO
from courier_testkit.sampling import machine
from courier_testkit.stubs import stub_process
from service import __version__
from service.settings import load_settings

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mode:
    """How much to measure."""

    name: str
    repetitions: int
    target_latencies: tuple[float, ...]
    drain_messages: int
    window_seconds: float
    paced_seconds: float
    api_seconds: float
    api_warmup_seconds: float
    api_repetitions: int
    fractions: tuple[float, ...]
    cold_starts: int
    idle_seconds: float
    ttl_seconds: float
    profile_seconds: float  # each py-spy recording of the profiling pass; 0: no profiling
    console_idle_seconds: float = 30.0  # bench.console: idle workers, console off, on, off


QUICK = Mode("quick", 1, (0.02,), 3000, 6, 3, 4, 1, 1, (0.5,), 2, 30, 8, 6)
FULL = Mode(
    "full", 3, (0.02, 0.1), 10000, 12, 6, 10, 2, 3, (0.25, 0.5, 0.75), 5, 600, 20, 15,
    console_idle_seconds=60,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def versions() -> dict[str, str]:
    def npm(name: str) -> str:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((REPO / "node_modules" / name / "package.json").read_text())[
                "version"
            ]
        return "missing"

    import aiobotocore
    import aiohttp

    node = subprocess.run(
        [str(node_binary()), "--version"], capture_output=True, text=True, check=False
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "courier": __version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "service_dirty": bool(git("diff", "--name-only", "HEAD", "--", "service")),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "aiobotocore": aiobotocore.__version__,
        "node": node.stdout.strip(),
        "fauxqs": npm("fauxqs"),
        "dynalite": npm("dynalite"),
        "sqs-consumer": npm("sqs-consumer"),
        "@aws-sdk/client-sqs": npm("@aws-sdk/client-sqs"),
        "wrk": (wrk.stdout or wrk.stderr).split("\n")[0].strip(),
    }


def _stat(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if v == v]
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
    }


async def worker_phase(bench: workers.WorkerBench, mode: Mode) -> dict[str, Any]:
    """Every consumer, every latency, ``repetitions`` times, in rotating order."""
    runs: list[dict[str, Any]] = []
    kinds = list(consumers.KINDS)
    for rep in range(mode.repetitions):
        for latency in mode.target_latencies:
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            for kind in order:
                started = time.monotonic()
                result = await workers.run_once(bench, kind, latency)
                result["repetition"] = rep
                runs.append(result)
                log(
                    f"worker {kind:<13} {latency * 1000:>3.0f} ms rep {rep}: {result['msgs_per_s']:8.1f} msg/s, "
                    f"p50/p99 {result['paced']['p50_ms']:.1f}/{result['paced']['p99_ms']:.1f} ms, "
                    f"SQS/msg {result['sqs_requests_per_message']:.3f}, CPU {result['cpu_s_per_1000']:.2f} s/1k "
                    f"({time.monotonic() - started:.0f} s)"
                )
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[str(run["target_latency_ms"])][run["kind"]].append(run)
    summary = {
        lat: {kind: workers.summarise(rs) for kind, rs in by_kind.items()}
        for lat, by_kind in grouped.items()
    }
    return {"runs": runs, "summary": summary}


async def api_phase(bench: api.ApiBench, mode: Mode) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for rep in range(mode.api_repetitions):
        shift = rep % len(api.VARIANTS)
        order = list(api.VARIANTS[shift:] + api.VARIANTS[:shift])
        for variant in order:
            result = await api.saturation(bench, variant)
            result["repetition"] = rep
            runs.append(result)
            if result.get("hung"):
                log(
                    f"api {variant:<16} rep {rep}: HUNG at {result['connections']} connections:\n{result['where']}"
                )
                continue
            log(
                f"api {variant:<16} rep {rep}: {result['rps']:9.1f} req/s, p50/p99 {result['p50_ms']:.1f}/"
                f"{result['p99_ms']:.1f} ms, CPU {result['server_cpu_s_per_1000']:.2f} s/1k, "
                f"SQS/req {result['sqs_requests_per_request']:.3f}, KMS/1k {result['kms_calls_per_1000']:.1f}"
            )
    # A function instance serves one request at a time: stateless mode also at 1 connection.
    single = await api.saturation(bench, "stateless", connections=1)
    single["variant"] = "stateless-1"
    runs.append(single)
    if not single.get("hung"):
        log(
            f"api stateless, 1 connection: {single['rps']:.1f} req/s, p50 {single['p50_ms']:.1f} ms, KMS/1k {single['kms_calls_per_1000']:.0f}"
        )
    summary: dict[str, dict[str, Any]] = {}
    for variant in (*api.VARIANTS, "stateless-1"):
        chosen = [r for r in runs if r["variant"] == variant and not r.get("hung")]
        hung = [r for r in runs if r["variant"] == variant and r.get("hung")]
        if not chosen:
            summary[variant] = {"hung": len(hung), "where": hung[0]["where"] if hung else ""}
            continue
        keys = ("rps", "p50_ms", "p99_ms", "server_cpu_s_per_1000", "sqs_requests_per_request",
                "kms_calls_per_1000", "peak_rss_mb", "secret_fetches")  # fmt: skip
        summary[variant] = {key: _stat([float(r[key]) for r in chosen]) for key in keys}
        summary[variant]["wrk_timeouts"] = _stat([float(r["errors"]["timeouts"]) for r in chosen])
        summary[variant]["hung"] = len(hung)
    saturation = summary["courier"]["rps"]["median"]
    fixed = await api.fixed_rates(bench, "courier", saturation, mode.fractions)
    for result in fixed:
        log(
            f"api open loop {result['offered_rps']:.0f} req/s ({result['fraction']:.0%}): achieved "
            f"{result['achieved_rps']:.0f}, p50/p99 {result['p50_ms']:.1f}/{result['p99_ms']:.1f} ms"
        )
    reads = await api.secret_reads(bench, max(5.0, 0.3 * saturation), mode.ttl_seconds)
    log(
        f"secret reads: {reads['store_reads']:.0f} in {reads['seconds']} s = {reads['reads_per_secret_per_ttl']:.2f} per secret per TTL"
    )
    colds = [await api.cold_start(bench) for _ in range(mode.cold_starts)]
    cold = {
        "runs": colds,
        "median": {key: statistics.median(c[key] for c in colds) for key in colds[0]},
        "baseline": await api.interpreter_baseline(),
        "serverless_reference": api.SERVERLESS_COLD_START,
    }
    log(
        f"cold start: READY {cold['median']['start_to_ready_s']:.2f} s, first 202 {cold['median']['start_to_first_202_s']:.2f} s"
    )
    return {
        "saturation": {"runs": runs, "summary": summary},
        "fixed_rates": fixed,
        "secret_reads": reads,
        "cold_start": cold,
    }


async def profile_phase(
    bench: workers.WorkerBench, api_bench: api.ApiBench, mode: Mode, out_dir: Path
) -> dict[str, Any]:
    """py-spy on fresh courier processes, after every measured run (``bench.profiling``)."""
    if mode.profile_seconds <= 0:
        return {"skipped": "--no-profile"}
    if not profiling.py_spy().exists():
        return {"skipped": f"py-spy is not installed at {profiling.py_spy()}"}
    raw_dir = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-profile"
    raw_dir.mkdir(parents=True, exist_ok=True)
    found = {
        "worker": await profiling.worker(bench, mode.profile_seconds, raw_dir),
        "api": await profiling.api_server(api_bench, mode.profile_seconds, raw_dir),
    }
    for name, p in found.items():
        log(
            f"profile {name}: {p['samples']} samples in {p['seconds']:.0f} s, CPU share "
            f"{p['cpu_share']:.2f} (py-spy saw {p['sampled_cpu_share']:.2f}), "
            f"{p['cpu_ms_per_unit_profiled']:.2f} ms per {p['unit']} while profiled"
        )
    return found


def _scale_profile(result: dict[str, Any]) -> None:
    """Split the main run's measured CPU per message / request by the profiles' samples."""
    profile = result.get("profile", {})
    courier = result["workers"]["summary"].get("20", {}).get("courier", {})
    sat = result["api"]["saturation"]["summary"].get("courier", {})
    sources = {
        "worker": (courier.get("cpu_s_per_1000"), "worker run 'courier, 1 process', 3 targets at 20 ms"),
        "api": (sat.get("server_cpu_s_per_1000"), "API saturation run 'courier', 64 connections"),
    }  # fmt: skip
    for name, (stat, source) in sources.items():
        if name in profile and stat:
            profiling.scale(profile[name], float(stat["median"]), f"median of the {source}")


def capacity_mode(mode: Mode) -> capacity.CapacityMode:
    """The capacity section's lengths for ``mode``."""
    return capacity.QUICK if mode.name == "quick" else capacity.FULL


async def run(
    mode: Mode, out_dir: Path, *, with_capacity: bool = True, with_console: bool = True
) -> dict[str, Any]:
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    base = load_settings(environ={})
    async with aws_stack() as stack:
        secrets_ = demo_secrets()
        resources = await stack.bootstrap("bench", secrets_)
        legacy = {name: mode.target_latencies[0] for name, _ in consumers.TARGETS}
        async with stub_process(
            legacy, idm_api_key=secrets_["courier.idm.api_key"], idm_latency_seconds=0.02
        ) as stubs:
            log(
                f"servers up in {time.monotonic() - started:.1f} s: {', '.join(stack.servers())}, stubs"
            )
            api_bench = api.ApiBench(stack, stubs, base, mode.api_seconds, mode.api_warmup_seconds)
            idle = api.IdleProbe(api_bench, mode.idle_seconds)
            await idle.start()
            log(f"idle probe warmed (steady p50 {idle.warm_p50_ms:.1f} ms); idle from now")
            drain = await workload.seal_events(
                stack.direct, resources.data_key_arn, mode.drain_messages, "d"
            )
            paced = await workload.seal_events(stack.direct, resources.data_key_arn, 8000, "p")
            bench = workers.WorkerBench(
                stack, stubs, base, drain, paced, mode.window_seconds, mode.paced_seconds
            )
            worker_results = await worker_phase(bench, mode)
            api_results = await api_phase(api_bench, mode)
            console_results = (
                await console.run_section(
                    bench,
                    api_bench,
                    mode.target_latencies[0],
                    mode.console_idle_seconds,
                    log,
                )
                if with_console
                else None
            )
            capacity_results = (
                await capacity.run_section(stack, base, capacity_mode(mode), log)
                if with_capacity
                else None
            )
            profile = await profile_phase(bench, api_bench, mode, out_dir)
            log(f"waiting for the idle probe ({mode.idle_seconds:.0f} s idle)")
            api_results["idle"] = await idle.finish()
            log(
                f"idle: first request {api_results['idle']['first_after_idle_ms']:.1f} ms vs steady p50 {api_results['idle']['steady_p50_ms']:.1f} ms"
            )
    result: dict[str, Any] = {
        "schema": 1,
        "mode": mode.name,
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started),
        "machine": machine(),
        "versions": versions(),
        "config": asdict(mode),
        "method": {
            "sqs": "fauxqs behind a counting proxy (courier_testkit.proxy); SQS and KMS requests are counted there",
            "kms": "moto server in its own process, behind the same proxy",
            "dynamodb": "dynalite 4.0.0 (status table and CredStash table)",
            "stubs": "service.stubs in one aiohttp process (courier_testkit.stubs); arrival time per Idempotency-Key",
            "throughput": "pre-loaded queue, consumer paused (SIGSTOP) while loading; msg/s = completed / (last completion - resume)",
            "latency": "open-loop paced send at 50% of the drain rate; send -> call to the last target",
            "api_saturation": "wrk -t1 -c64 (closed loop) after a warm-up run",
            "api_fixed_rate": "bench.loadgen, open loop, latency from the scheduled time",
            "machine_note": "everything shares this machine's cores: servers, stubs, load generators",
        },
        "workers": worker_results,
        "api": api_results,
        "profile": profile,
    }
    if capacity_results is not None:
        result["capacity"] = capacity_results
    if console_results is not None:
        result["console"] = console_results
    _scale_profile(result)
    result["goals"] = report.goals(result)
    result["cost"] = cost.compare(cost.from_report_data(result, cost.Workload()), cost.Prices())
    return result


def write_outputs(result: dict[str, Any], out_dir: Path, publish: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stamp}-{result['mode']}.json"
    plot_dir = HERE / "plots" if publish else out_dir / f"{stamp}-plots"
    made = [*profiling.publish(result, plot_dir), *plots.render_all(result, plot_dir)]
    path.write_text(json.dumps(result, indent=1, default=str))
    if publish:
        (HERE / "results-latest.json").write_text(
            json.dumps(_summary_only(result), indent=1, default=str)
        )
        (HERE / "README-section.md").write_text(readme_section(result))
    log(f"report {path}; plots {', '.join(str(p) for p in made)}")
    return path


def _summary_only(result: dict[str, Any]) -> dict[str, Any]:
    """The committed copy: everything but the per-run records of the worker phase (and the
    capacity section's sampled gauges, ``capacity.slim``)."""
    slim = json.loads(json.dumps(result, default=str))
    slim["workers"].pop("runs", None)
    if "capacity" in slim:
        slim["capacity"] = capacity.slim(slim["capacity"])
    return slim


def readme_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    return "\n".join(
        [
            "## Benchmarks",
            "",
            f"Measured {result['started_at'][:10]} on {m['cores']} vCPUs ({m['cpu_model']}), "
            f"{m['memory_gib']} GiB, mode `{result['mode']}`, {result['duration_s'] // 60} min. "
            "Everything runs on this one machine over loopback: SQS is fauxqs behind a counting "
            "proxy, KMS is moto in its own process, DynamoDB is dynalite, and the legacy targets "
            "and IdM are aiohttp stubs in one process. These servers share the cores with what "
            "is measured, so absolute numbers are low-end; the comparison is the point.",
            "",
            report.worker_table(result),
            report.api_table(result),
            "",
            report.cpu_table(result),
            "",
            "**Goals**",
            "",
            report.goals_table(result["goals"]),
            "",
            *([console.table(result["console"]), ""] if "console" in result else []),
            *([capacity.table(result["capacity"]), ""] if "capacity" in result else []),
            "**Cost** (`python -m bench.cost --report bench/results-latest.json --daily-messages N`): "
            + cost.render(result["cost"]).replace("\n", "; "),
            "",
            "Reproduce: `make bench` (full, ~25 min) or `make bench-quick` (~5 min; "
            "`python -m bench --quick --no-profile` skips the profiling pass). Plots and flame "
            "graphs (with their collapsed stacks): `bench/plots/`; the numbers: "
            "`bench/results-latest.json`.",
            "",
        ]
    )


async def capacity_only(mode: capacity.CapacityMode) -> dict[str, Any]:
    """``--only capacity``: the AWS stand-ins and the capacity section, nothing else."""
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    async with aws_stack() as stack:
        await stack.bootstrap("bench", demo_secrets())
        log(f"servers up in {time.monotonic() - started:.1f} s: {', '.join(stack.servers())}")
        section = await capacity.run_section(stack, load_settings(environ={}), mode, log)
    try:
        found = versions()
    except OSError:  # no wrk: this section does not need it
        found = {"courier": __version__}
    return {
        "schema": 1,
        "mode": mode.name,
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started),
        "machine": machine(),
        "versions": found,
        "capacity": section,
    }


def write_capacity_outputs(result: dict[str, Any], out_dir: Path, publish: bool) -> Path:
    """The ``--only capacity`` report; with ``publish`` its plots go to ``bench/plots/`` and
    the section is merged into ``results-latest.json`` and ``README-section.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stamp}-{result['mode']}-capacity.json"
    plot_dir = HERE / "plots" if publish else out_dir / f"{stamp}-plots"
    made = plots.render_capacity(result, plot_dir)
    path.write_text(json.dumps(result, indent=1, default=str))
    latest_path = HERE / "results-latest.json"
    if publish and latest_path.exists():
        latest = json.loads(latest_path.read_text())
        latest["capacity"] = capacity.slim(result["capacity"])
        latest_path.write_text(json.dumps(latest, indent=1, default=str))
        (HERE / "README-section.md").write_text(readme_section(latest))
        log(f"merged the capacity section into {latest_path} and README-section.md")
    elif publish:
        log(f"no {latest_path} to merge the capacity section into (run the full bench first)")
    log(f"report {path}; plots {', '.join(str(p) for p in made)}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the ~5-minute run")
    parser.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                        help="write results-latest.json, plots/ and README-section.md (default: full mode only)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="the py-spy profiling pass after the measured runs (flame graphs, "
                        "'where the CPU goes'); --no-profile skips it")  # fmt: skip
    parser.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=True,
                        help="the capacity section (issue 16; bench.capacity); --no-capacity skips it")  # fmt: skip
    parser.add_argument("--console", action=argparse.BooleanOptionalAction, default=True,
                        help="the console-off/on section (issue 17; bench.console); --no-console skips it")  # fmt: skip
    parser.add_argument("--only", choices=("capacity",),
                        help="run only this section (needs no wrk); see bench.capacity")  # fmt: skip
    parser.add_argument(
        "--render", type=Path, help="only re-render plots and the README section from a report"
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        write_outputs(result, args.out, publish=True)
        return
    if args.only == "capacity":
        run_capacity_only(args)
        return
    api.require_wrk()
    mode = QUICK if args.quick else FULL
    if not args.profile:
        mode = dataclasses.replace(mode, profile_seconds=0)
    publish = (not args.quick) if args.publish is None else args.publish
    log(f"bench {mode.name}: {machine()}")

    result = _run_until_signalled(
        lambda: run(mode, args.out, with_capacity=args.capacity, with_console=args.console)
    )
    write_outputs(result, args.out, publish)
    print()
    print(report.worker_table(result))
    print(report.api_table(result))
    print()
    print(report.cpu_table(result))
    print()
    print(report.goals_table(result["goals"]))
    if "console" in result:
        print()
        print(console.table(result["console"]))
    print()
    print(cost.render(result["cost"]))
    if "capacity" in result:
        print()
        print(capacity.table(result["capacity"]))


def _run_until_signalled(work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``work()`` in a new event loop; SIGTERM or SIGINT cancels it, which unwinds every
    launcher's cleanup (no emulator or courier process is left behind)."""

    async def main_task() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        return await work()

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(main_task())


def run_capacity_only(args: argparse.Namespace) -> None:
    """``python -m bench --only capacity [--quick] [--publish]``."""
    mode = capacity.QUICK if args.quick else capacity.FULL
    publish = (not args.quick) if args.publish is None else args.publish
    log(f"bench capacity {mode.name}: {machine()}")

    result = _run_until_signalled(lambda: capacity_only(mode))
    write_capacity_outputs(result, args.out, publish)
    print()
    print(capacity.table(result["capacity"]))


if __name__ == "__main__":
    sys.exit(main())
