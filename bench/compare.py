"""``python -m bench.compare BEFORE.json AFTER.json``: what changed between two bench reports.

Prints a markdown table of CPU per unit of work (courier's own process, and the peer's for
scale) and throughput, and writes ``bench/plots/before-after.png`` (``--plot`` elsewhere).
The committed ``bench/results-before-issue15.json`` is the full run issue 15 started from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (label, where in the report, unit); CPU rows first: they are the headline.
ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("worker CPU, courier 1 process, 20 ms targets", ("workers", "summary", "20", "courier", "cpu_s_per_1000"), "ms/msg"),
    ("worker CPU, courier 1 process, 100 ms targets", ("workers", "summary", "100", "courier", "cpu_s_per_1000"), "ms/msg"),
    ("worker CPU, bbc/sqs-consumer, 20 ms targets", ("workers", "summary", "20", "sqs-consumer", "cpu_s_per_1000"), "ms/msg"),
    ("API CPU, courier full path", ("api", "saturation", "summary", "courier", "server_cpu_s_per_1000"), "ms/req"),
    ("API CPU, batch sends off", ("api", "saturation", "summary", "courier-nobatch", "server_cpu_s_per_1000"), "ms/req"),
    ("worker msg/s, courier 1 process, 20 ms", ("workers", "summary", "20", "courier", "msgs_per_s"), "msg/s"),
    ("worker msg/s, bbc/sqs-consumer, 20 ms", ("workers", "summary", "20", "sqs-consumer", "msgs_per_s"), "msg/s"),
    ("API saturation, courier", ("api", "saturation", "summary", "courier", "rps"), "req/s"),
    ("API p50 at saturation", ("api", "saturation", "summary", "courier", "p50_ms"), "ms"),
)  # fmt: skip


def median(report: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    """The median at ``path`` (a stat with ``median``), or None when the report lacks it."""
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    value = node.get("median") if isinstance(node, Mapping) else node
    return float(value) if isinstance(value, int | float) else None


def table(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Markdown: one row per measure, before / after / ratio."""
    lines = [
        f"| measure (median) | before ({_when(before)}) | after ({_when(after)}) | after / before |",
        "|---|---:|---:|---:|",
    ]
    for label, path, unit in ROWS:
        old, new = median(before, path), median(after, path)
        if old is None or new is None:
            continue
        ratio = f"{new / old:.2f}x" if old else ""
        lines.append(f"| {label} ({unit}) | {old:,.2f} | {new:,.2f} | {ratio} |")
    return "\n".join(lines)


def _when(report: Mapping[str, Any]) -> str:
    commit = report.get("versions", {}).get("commit", "?")
    return f"{str(report.get('started_at', '?'))[:10]}, {commit}"


def plot(before: Mapping[str, Any], after: Mapping[str, Any], out: Path) -> Path:
    """Grouped bars of the CPU rows, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, median(before, path), median(after, path)) for label, path, unit in ROWS
            if unit in ("ms/msg", "ms/req")]  # fmt: skip
    rows = [(label, old, new) for label, old, new in rows if old is not None and new is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.55 * len(rows)))
    positions = range(len(rows))
    ax.barh(
        [p - 0.2 for p in positions],
        [old for _, old, _ in rows],
        0.4,
        label="before",
        color="#bbbbbb",
    )
    ax.barh([p + 0.2 for p in positions], [new for _, _, new in rows], 0.4, label="after", color="#0072b2")  # fmt: skip
    ax.set_yticks(list(positions), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms of CPU per message / request (the process's own)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--plot", type=Path, default=HERE / "plots" / "before-after.png")
    args = parser.parse_args(argv)
    before, after = (json.loads(path.read_text()) for path in (args.before, args.after))
    print(table(before, after))
    print(f"plot: {plot(before, after, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
