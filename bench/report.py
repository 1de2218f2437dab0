"""The goals, checked against a report, and the README's results table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bench import console
from bench.api import LABELS as API_LABELS
from bench.attribution import COMPONENTS
from bench.consumers import KINDS, LABELS

# Issue 15's starting point, measured by `make bench` on this machine before its changes.
API_START_RPS = 371.0


def _m(stat: Mapping[str, float] | None) -> float:
    return float(stat["median"]) if stat else float("nan")


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _spread(stat: Mapping[str, float], digits: int = 0) -> str:
    if stat["n"] > 1:
        return f"{_fmt(stat['median'], digits)} ({_fmt(stat['min'], digits)}-{_fmt(stat['max'], digits)})"
    return _fmt(stat["median"], digits)


def goals(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each goal (issues 7, 15 and 17) with the measured value, met or not, and the measured reason."""
    w20 = report["workers"]["summary"].get("20", {})
    api = report["api"]
    sat = api["saturation"]["summary"]
    courier = w20.get("courier", {})
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: float, ok: bool, detail: str) -> None:
        rows.append({"goal": goal, "measured": measured, "met": bool(ok), "detail": detail})

    c, sc = _m(courier.get("msgs_per_s")), _m(w20.get("sqs-consumer", {}).get("msgs_per_s"))
    n, ceiling = (
        _m(w20.get("naive", {}).get("msgs_per_s")),
        _m(w20.get("ceiling", {}).get("msgs_per_s")),
    )
    c2 = _m(w20.get("courier-2p", {}).get("msgs_per_s"))
    add(
        "courier >= 2.5x sqs-consumer msg/s (3 targets at 20 ms, 1 process each)",
        c / sc,
        c / sc >= 2.5,
        f"{c:.0f} vs {sc:.0f} msg/s; 2 processes: {c2:.0f} ({c2 / sc:.1f}x)",
    )
    cpu_msg = _m(courier.get("cpu_s_per_1000"))
    cpu_sc = _m(w20.get("sqs-consumer", {}).get("cpu_s_per_1000"))
    add(
        "worker <= 1.0 ms CPU per message (courier's own process)",
        cpu_msg,
        cpu_msg <= 1.0,
        f"{cpu_msg:.2f} ms; bbc/sqs-consumer {cpu_sc:.2f} ms; issue 15 started at 2.43 ms",
    )
    add("courier >= 20x naive msg/s", c / n, c / n >= 20, f"{c:.0f} vs {n:.1f} msg/s")
    cpu_c, cpu_ceiling = (
        _m(courier.get("cpu_s_per_1000")),
        _m(w20.get("ceiling", {}).get("cpu_s_per_1000")),
    )
    add(
        "courier >= 0.8 of the receive+delete ceiling",
        c / ceiling,
        c / ceiling >= 0.8,
        f"{c:.0f} vs {ceiling:.0f} msg/s; CPU {cpu_c:.2f} vs {cpu_ceiling:.2f} s per 1,000 messages",
    )
    sqs = _m(courier.get("sqs_requests_per_message"))
    add(
        "<= 0.25 SQS requests per message at load (worker)",
        sqs,
        sqs <= 0.25,
        "drain of the pre-loaded queue, counted by the proxy in front of fauxqs",
    )
    kms_worker = _m(courier.get("kms_calls_per_1000"))
    kms_api = _m(sat.get("courier", {}).get("kms_calls_per_1000"))
    add(
        "<= 1 KMS call per 1,000 messages",
        max(kms_worker, kms_api),
        max(kms_worker, kms_api) <= 1,
        f"worker {kms_worker:.2f}, API {kms_api:.2f} per 1,000 (stateless mode, 1 connection: "
        f"{_m(sat.get('stateless-1', {}).get('kms_calls_per_1000')):.0f})",
    )
    reads = api.get("secret_reads", {})
    per_ttl = reads.get("reads_per_secret_per_ttl", float("nan"))
    add(
        "<= 1 secret-store read per TTL",
        per_ttl,
        per_ttl <= 1.0,
        f"TTL {reads.get('ttl_seconds')} s, refresh-ahead {reads.get('refresh_ahead_seconds')} s, "
        f"{reads.get('store_reads')} reads of 2 secrets in {reads.get('seconds')} s under load",
    )
    full, bare = _m(sat.get("courier", {}).get("rps")), _m(sat.get("bare", {}).get("rps"))
    add(
        "API full path >= 0.3 of the bare aiohttp ceiling",
        full / bare,
        full / bare >= 0.3,
        f"{full:.0f} vs {bare:.0f} requests/s; CPU "
        f"{_m(sat.get('courier', {}).get('server_cpu_s_per_1000')):.2f} vs "
        f"{_m(sat.get('bare', {}).get('server_cpu_s_per_1000')):.3f} s per 1,000 requests",
    )
    cpu_req = _m(sat.get("courier", {}).get("server_cpu_s_per_1000"))
    add(
        "API <= 0.8 ms CPU per request (courier's own process)",
        cpu_req,
        cpu_req <= 0.8,
        f"{cpu_req:.2f} ms at saturation; issue 15 started at 2.04 ms",
    )
    add(
        f"API saturation >= 2.5x issue 15's start ({API_START_RPS:.0f} req/s, same machine)",
        full / API_START_RPS,
        full >= 2.5 * API_START_RPS,
        f"{full:.0f} req/s at 64 connections",
    )
    stateless = sat.get("stateless", {})
    s_rps, s_hung = _m(stateless.get("rps")), stateless.get("hung", 0)
    s_timeouts = _m(stateless.get("wrk_timeouts"))
    add(
        "stateless mode runs at 64 connections (no hang, no timeouts) and is reported",
        s_rps,
        not s_hung and s_rps == s_rps and not s_timeouts > 0,  # NaN timeouts: not recorded
        f"{s_rps:.1f} req/s, p50 {_m(stateless.get('p50_ms')):.0f} ms, p99 "
        f"{_m(stateless.get('p99_ms')):.0f} ms, {s_hung} hung runs, {s_timeouts:.0f} wrk timeouts",
    )
    half = [r for r in api.get("fixed_rates", []) if abs(r["fraction"] - 0.5) < 1e-6]
    if half:
        p50 = sorted(r["p50_ms"] for r in half)[len(half) // 2]
        p99 = sorted(r["p99_ms"] for r in half)[len(half) // 2]
        add(
            "API p99 at 50% of saturation <= 3x p50",
            p99 / p50,
            p99 <= 3 * p50,
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms at {half[0]['offered_rps']:.0f} requests/s offered",
        )
    cold = api.get("cold_start", {}).get("median", {})
    ready = cold.get("start_to_ready_s", float("nan"))
    add(
        "start to READY <= 1 s",
        ready,
        ready <= 1.0,
        f"first 202 after {cold.get('start_to_first_202_s', float('nan')):.2f} s",
    )
    idle = api.get("idle", {})
    ratio = idle.get("ratio", float("nan"))
    add(
        "first request after idle within 1.2x steady p50",
        ratio,
        ratio <= 1.2,
        f"{idle.get('first_after_idle_ms', float('nan')):.1f} ms after {idle.get('idle_seconds', 0):.0f} s idle "
        f"vs steady p50 {idle.get('steady_p50_ms', float('nan')):.1f} ms",
    )
    if "console" in report:
        add(*console.goal_row(report["console"]))
    return rows


def worker_table(report: Mapping[str, Any]) -> str:
    lines = []
    for latency, summary in sorted(
        report["workers"]["summary"].items(), key=lambda kv: float(kv[0])
    ):
        lines += [
            f"**Worker, 3 targets at {latency} ms** (median of {max(s['msgs_per_s']['n'] for s in summary.values())} "
            "runs, min-max in brackets)",
            "",
            "| consumer | CPU ms/msg | msg/s | p50 / p99 ms (at 50% load) | SQS req/msg | KMS /1k msg | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in KINDS:
            if kind not in summary:
                continue
            s = summary[kind]
            lines.append(
                f"| {LABELS[kind]} | {_spread(s['cpu_s_per_1000'], 2)} | {_spread(s['msgs_per_s'])} | "
                f"{_fmt(_m(s['p50_ms']), 1)} / {_fmt(_m(s['p99_ms']), 1)} | "
                f"{_fmt(_m(s['sqs_requests_per_message']), 3)} | "
                f"{_fmt(_m(s['kms_calls_per_1000']), 2)} | {_fmt(_m(s['peak_rss_mb']))} |"
            )
        lines += [
            "",
            "CPU ms/msg, the headline: user + system CPU of the consumer's own process(es) "
            "during the drain / messages completed in it, the same formula for every consumer "
            "(the emulators and stubs share the cores, so wall-clock msg/s is beside it).",
        ]
        lines.append("")
    return "\n".join(lines)


def api_table(report: Mapping[str, Any]) -> str:
    summary = report["api"]["saturation"]["summary"]
    lines = [
        "**API, POST /v1/mailboxes at saturation** (wrk, 1 thread, 64 connections; IdM stub 20 ms)",
        "",
        "| server | CPU ms/req | requests/s | p50 / p99 ms | SQS req/req | KMS /1k req | wrk timeouts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in ("bare", "courier", "courier-nobatch", "stateless", "stateless-1"):
        if variant not in summary:
            continue
        s = summary[variant]
        if "rps" not in s:
            lines.append(
                f"| {API_LABELS[variant]} | hung (no answer to /healthz; see the report's py-spy dump) | | | | | |"
            )
            continue
        lines.append(
            f"| {API_LABELS[variant]} | {_spread(s['server_cpu_s_per_1000'], 2)} | {_spread(s['rps'])} | "
            f"{_fmt(_m(s['p50_ms']), 1)} / {_fmt(_m(s['p99_ms']), 1)} | "
            f"{_fmt(_m(s['sqs_requests_per_request']), 3)} | {_fmt(_m(s['kms_calls_per_1000']), 1)} | "
            f"{_fmt(_m(s.get('wrk_timeouts')))} |"
        )
    lines += [
        "",
        "CPU ms/req: CPU of the server process between two quiet points (nothing in flight) / "
        "requests it answered 2xx in between, counted by the server (courier's "
        "`courier_http_requests_total`, the bare peer's `/_served`): the same formula for every "
        "variant, and requests wrk abandons in flight at its end are counted with their CPU.",
    ]
    rates = report["api"].get("fixed_rates", [])
    if rates:
        lines += [
            "",
            "| offered req/s (open loop) | achieved | p50 ms | p99 ms |",
            "|---:|---:|---:|---:|",
        ]
        for r in rates:
            lines.append(
                f"| {r['offered_rps']:.0f} ({r['fraction']:.0%} of saturation) | {r['achieved_rps']:.0f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            )
    cold, idle = report["api"].get("cold_start", {}), report["api"].get("idle", {})
    if cold:
        median, base = cold["median"], cold["baseline"]
        lines += [
            "",
            f"Cold start (median of {len(cold['runs'])}): start → READY {median['start_to_ready_s']:.2f} s, "
            f"→ first 202 {median['start_to_first_202_s']:.2f} s (Python start alone {base['python_start_s']:.2f} s, "
            f"with courier's imports {base['python_start_and_imports_s']:.2f} s). Published serverless figures, "
            "as inputs: Python Lambda cold start a few hundred ms; ~10 s in a VPC before Sept 2019.",
        ]
    if idle:
        lines.append(
            f"After {idle['idle_seconds']:.0f} s idle the first request took {idle['first_after_idle_ms']:.1f} ms "
            f"(steady p50 {idle['steady_p50_ms']:.1f} ms, x{idle['ratio']:.2f})."
        )
    return "\n".join(lines)


def goals_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| goal | measured | met | detail |", "|---|---:|:---:|---|"]
    for row in rows:
        lines.append(
            f"| {row['goal']} | {_fmt(row['measured'], 2)} | {'yes' if row['met'] else '**no**'} | {row['detail']} |"
        )
    return "\n".join(lines)


def cpu_table(report: Mapping[str, Any]) -> str:
    """'Where the CPU goes': the profiles' shares of the measured CPU per message and request."""
    profile = report.get("profile") or {}
    worker, api = profile.get("worker", {}), profile.get("api", {})
    if not worker.get("breakdown") and not api.get("breakdown"):
        why = profile.get("skipped") or worker.get("py_spy") or "no profile in this report"
        return f"'Where the CPU goes': not profiled ({why})."
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, part in (("worker", worker), ("api", api)):
        for row in part.get("breakdown", []):
            rows.setdefault(row["component"], {})[name] = row

    def cell(row: Mapping[str, Any] | None) -> str:
        return f"{row['ms']:.3f} ({row['share']:.0%})" if row else ""

    lines = [
        "**Where the CPU goes** (py-spy, "
        f"{worker.get('rate_hz', api.get('rate_hz', ''))} Hz, on fresh processes after the measured runs; "
        "shares of the measured CPU; flame graphs: `bench/plots/flame-worker.svg`, `flame-api.svg`)",
        "",
        "| component | worker ms/msg | API ms/req |",
        "|---|---:|---:|",
    ]
    for component in COMPONENTS:
        by = rows.get(component)
        if not by:
            continue
        lines.append(f"| {component} | {cell(by.get('worker'))} | {cell(by.get('api'))} |")
    total_w, total_a = worker.get("measured_ms_per_unit"), api.get("measured_ms_per_unit")
    lines += [
        f"| **total (measured)** | **{_fmt(total_w, 3)}** | **{_fmt(total_a, 3)}** |",
        "",
        f"Samples: worker {worker.get('samples', 0)}, API {api.get('samples', 0)}. A sample belongs "
        "to the component courier called into (botocore under the status store is DynamoDB; "
        "botocore's own JSON, hashing and HTTP stay with the AWS call); native code (AES-GCM, "
        "hashlib, uvloop) counts to the Python frame that called it. Rule: `bench/attribution.py`.",
    ]
    return "\n".join(lines)
