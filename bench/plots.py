"""PNG plots of a benchmark report (matplotlib, Agg backend): small files, one idea each."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.api import LABELS as API_LABELS
from bench.consumers import KINDS, LABELS

DPI = 80
COLOURS = {
    "naive": "#9e9e9e",
    "sqs-consumer": "#e69f00",
    "courier": "#0072b2",
    "courier-2p": "#56b4e9",
    "ceiling": "#cccccc",
}


def _bars(ax: Any, names: list[str], stats: list[Mapping[str, float]], colours: list[str]) -> None:
    medians = [s["median"] for s in stats]
    low = [max(0.0, s["median"] - s["min"]) for s in stats]
    high = [max(0.0, s["max"] - s["median"]) for s in stats]
    ax.barh(names, medians, xerr=[low, high], color=colours, capsize=3)
    for y, value in enumerate(medians):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()


def worker_throughput(report: Mapping[str, Any], out: Path) -> Path:
    summary = report["workers"]["summary"]
    latencies = sorted(summary, key=float)
    fig, axes = plt.subplots(1, len(latencies), figsize=(5.2 * len(latencies), 2.8), squeeze=False)
    for ax, latency in zip(axes[0], latencies, strict=True):
        kinds = [k for k in KINDS if k in summary[latency]]
        _bars(
            ax,
            [LABELS[k] for k in kinds],
            [summary[latency][k]["msgs_per_s"] for k in kinds],
            [COLOURS[k] for k in kinds],
        )
        ax.set_xscale("log")
        ax.set_xlabel("messages/s (log; median, bars = min-max)")
        ax.set_title(f"3 targets at {latency} ms", fontsize=10)
    fig.tight_layout()
    path = out / "worker-throughput.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def worker_costs(report: Mapping[str, Any], out: Path) -> Path:
    summary = report["workers"]["summary"]["20"]
    kinds = [k for k in KINDS if k in summary]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    metrics = (
        ("sqs_requests_per_message", "SQS requests per message"),
        ("cpu_s_per_1000", "consumer CPU ms per message"),
        ("peak_rss_mb", "peak RSS per process, MB"),
    )
    for ax, (key, title) in zip(axes, metrics, strict=True):
        names = [LABELS[k] if ax is axes[0] else "" for k in kinds]
        stats = [summary[k][key] for k in kinds]
        medians = [s["median"] for s in stats]
        ax.barh(range(len(kinds)), medians, color=[COLOURS[k] for k in kinds])
        ax.set_yticks(range(len(kinds)), names)
        for y, value in enumerate(medians):
            ax.text(
                value,
                y,
                f" {value:.2f}" if value < 10 else f" {value:.0f}",
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle("at load, 3 targets at 20 ms", fontsize=10)
    fig.tight_layout()
    path = out / "worker-costs.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def worker_latency(report: Mapping[str, Any], out: Path) -> Path:
    summary = report["workers"]["summary"]
    latencies = sorted(summary, key=float)
    fig, axes = plt.subplots(1, len(latencies), figsize=(5.2 * len(latencies), 2.8), squeeze=False)
    for ax, latency in zip(axes[0], latencies, strict=True):
        kinds = [k for k in KINDS if k in summary[latency] and k != "ceiling"]
        y = range(len(kinds))
        p50 = [summary[latency][k]["p50_ms"]["median"] for k in kinds]
        p99 = [summary[latency][k]["p99_ms"]["median"] for k in kinds]
        ax.barh([i + 0.2 for i in y], p99, height=0.4, color="#d55e00", label="p99")
        ax.barh([i - 0.2 for i in y], p50, height=0.4, color="#009e73", label="p50")
        ax.set_yticks(list(y), [LABELS[k] for k in kinds])
        ax.invert_yaxis()
        ax.set_xlabel("send -> last target call, ms (at 50% of each one's drain rate)")
        ax.set_title(f"3 targets at {latency} ms", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "worker-latency.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def api(report: Mapping[str, Any], out: Path) -> Path:
    saturation = report["api"]["saturation"]["summary"]
    variants = [
        v
        for v in ("bare", "courier", "courier-nobatch", "stateless", "stateless-1")
        if "rps" in saturation.get(v, {})
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
    _bars(
        axes[0],
        [API_LABELS[v] for v in variants],
        [saturation[v]["rps"] for v in variants],
        ["#cccccc", "#0072b2", "#56b4e9", "#e69f00", "#f0e442"][: len(variants)],
    )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("requests/s at saturation (wrk, log)")
    rates = report["api"].get("fixed_rates", [])
    if rates:
        offered = [r["offered_rps"] for r in rates]
        axes[1].plot(offered, [r["p50_ms"] for r in rates], "o-", label="p50", color="#009e73")
        axes[1].plot(offered, [r["p99_ms"] for r in rates], "o-", label="p99", color="#d55e00")
        axes[1].set_xlabel("offered requests/s (open loop)")
        axes[1].set_ylabel("ms (log)")
        axes[1].set_yscale("log")
        axes[1].set_title("courier API latency at fixed offered rates", fontsize=10)
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "api.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def console_cost(report: Mapping[str, Any], out: Path) -> Path:
    """CPU per unit of every console-off and console-on run, in the order they ran."""
    section = report["console"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    parts = (("worker", "worker: CPU ms per message"), ("api", "API: CPU ms per request"))
    for ax, (part, title) in zip(axes, parts, strict=True):
        runs = section[part]["runs"]
        for setting, colour, label in (
            (False, "#999999", "console off"),
            (True, "#0072b2", "console on"),
        ):
            chosen = [(i, r["value"]) for i, r in enumerate(runs) if r["console"] == setting]
            if not chosen:
                continue
            ax.plot(*zip(*chosen, strict=True), "o", color=colour, label=label)
            ax.axhline(
                statistics.median(v for _, v in chosen), color=colour, linewidth=1, alpha=0.6
            )
        ax.set_ylim(bottom=0)
        ax.set_xticks(range(len(runs)), [f"run {i + 1}" for i in range(len(runs))], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "console-cost.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _time_axes(axes: Any) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds since the backlog was released")


def capacity_adaptive_vs_fixed(report: Mapping[str, Any], out: Path) -> Path:
    """Goodput, target latency and refusals over time: adaptive limits vs a fixed 32."""
    section = report["capacity"]
    runs, max_goodput = section["runs"], section["model"]["max_goodput"]
    unloaded = section["model"]["latency_ms"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.4), sharex=True)
    styles = {"adaptive": ("#0072b2", "adaptive (ceiling 32)"), "fixed": ("#d55e00", "fixed 32")}
    for name, (colour, label) in styles.items():
        series = runs[name]["series"]
        axes[0].plot(series["t"], series["goodput"], color=colour, label=label)
        axes[1].plot(series["t"], series["p99_ms"], color=colour, label=f"{label}, p99")
        axes[1].plot(series["t"], series["p50_ms"], color=colour, ls=":", label=f"{label}, p50")
        axes[2].plot(series["t"], series["refused_per_s"], color=colour, label=label)
    axes[0].axhline(max_goodput, color="#999999", ls="--", lw=1, label="target's maximum")
    axes[0].set_ylabel("effects/s")
    axes[1].axhline(2 * unloaded, color="#999999", ls="--", lw=1, label="2x unloaded")
    axes[1].set_ylabel("latency at target, ms")
    axes[2].set_ylabel("refused calls/s")
    _time_axes(axes)
    procs = section.get("processes", 3)
    fig.suptitle(
        f"{procs} courier processes, one target: {section['model']['capacity']} at once, "
        f"{unloaded:.0f} ms, queue {section['model']['queue']}, then "
        f"{section['model']['overload_status']} (0.5 s bins)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "capacity-adaptive-vs-fixed.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def capacity_halved(report: Mapping[str, Any], out: Path) -> Path:
    """Each process's limit, their sum and the target's latency while its capacity halves."""
    section = report["capacity"]
    run = section["runs"]["halved"]
    samples, series = run["samples"], run["series"]
    halved_at = run["follow"]["halved_at_s"]
    capacity = section["model"]["capacity"]
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    total = [0.0] * len(samples["t"])
    for name, values in sorted(samples["limit"].items()):
        points = [(t, v) for t, v in zip(samples["t"], values, strict=False) if v is not None]
        axes[0].plot(
            [t for t, _ in points], [v for _, v in points], lw=1, label=f"process {name[-1]}"
        )
        for i, value in enumerate(values):
            total[i] += value or 0
    axes[0].plot(samples["t"], total, color="black", lw=2, label="summed")
    end = max(samples["t"], default=halved_at)
    axes[0].plot([0, halved_at, halved_at, end], [capacity, capacity, capacity // 2, capacity // 2],
                 color="#999999", ls="--", lw=1, label="calls the target serves at once")  # fmt: skip
    axes[0].set_ylabel("concurrency limit")
    axes[1].plot(series["t"], series["p99_ms"], color="#d55e00", label="p99")
    axes[1].plot(series["t"], series["p50_ms"], color="#009e73", label="p50")
    axes[1].axhline(2 * section["model"]["latency_ms"], color="#999999", ls="--", lw=1,
                    label="2x unloaded")  # fmt: skip
    axes[1].set_ylabel("latency at target, ms")
    for ax in axes:
        ax.axvline(halved_at, color="#cc79a7", lw=1)
    _time_axes(axes)
    fig.suptitle(
        f"capacity {capacity} -> {capacity // 2} at {halved_at:.1f} s: limits per process "
        f"(sampled every {section['mode']['sample_seconds']} s) and target latency",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "capacity-halved.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


CAPACITY_PLOTS = (capacity_adaptive_vs_fixed, capacity_halved)


def render_capacity(report: Mapping[str, Any], out: Path) -> list[Path]:
    """The capacity section's plots of ``report`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for plot in CAPACITY_PLOTS:
        try:
            made.append(plot(report, out))
        except (KeyError, ValueError) as exc:
            print(f"plot {plot.__name__} skipped: {exc!r}")
    return made


def render_all(report: Mapping[str, Any], out: Path) -> list[Path]:
    """Every plot of ``report`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = render_capacity(report, out) if "capacity" in report else []
    plots = [worker_throughput, worker_latency, worker_costs, api]
    if "console" in report:
        plots.append(console_cost)
    for plot in plots:
        try:
            made.append(plot(report, out))
        except (KeyError, ValueError) as exc:  # a partial report still gets the plots it can
            print(f"plot {plot.__name__} skipped: {exc!r}")
    return made
