"""``python -m chaos``: run the scenarios, print a table per scenario, write a JSON report.

Exit status 0 when every invariant held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chaos import report
from chaos.rig import rig
from chaos.scenarios import FULL, SCENARIOS, SMALL, Scale
from courier_testkit.sampling import machine


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only these (repeatable; default: all)",
    )
    parser.add_argument("--small", action="store_true", help="the sizes make test uses")
    parser.add_argument("--soak-seconds", type=float, default=None, help="override the soak length")
    parser.add_argument(
        "--report", type=Path, default=Path("build/chaos-report.json"), help="JSON report path"
    )
    return parser


async def _run(names: list[str], scale: Scale, path: Path) -> bool:
    rows: list[report.Row] = []
    started = time.monotonic()
    for name in names:
        print(f"-- {name} ({scale.name})", file=sys.stderr, flush=True)
        try:
            # A fresh rig per scenario: the emulators slow down as they accumulate data, and a
            # scenario must not pay for the ones before it (the soak, especially).
            async with rig() as running:
                produced = await SCENARIOS[name](running, scale)
        except Exception as exc:  # a scenario that blew up is a failed row, not a lost run
            failed = report.Row(name)
            failed.check(False, f"scenario raised {type(exc).__name__}: {exc}")
            produced = [failed]
        rows += produced
        print(report.table(produced) + "\n", flush=True)
    print("== all scenarios ==")
    print(report.table(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write(
        rows,
        path,
        {
            "scale": scale.name,
            "machine": machine(),
            "seconds": round(time.monotonic() - started, 1),
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    print(f"\nreport: {path}")
    return all(row.ok for row in rows)


def main() -> int:
    args = _parser().parse_args()
    scale = SMALL if args.small else FULL
    if args.soak_seconds is not None:
        from dataclasses import replace

        scale = replace(scale, soak_seconds=args.soak_seconds)
    names = args.scenario or list(SCENARIOS)
    import uvloop

    ok = uvloop.run(_run(names, scale, args.report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
