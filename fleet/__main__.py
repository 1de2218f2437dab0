"""``python -m fleet``: a rolling replacement under load; tables on stdout, a JSON report.

Exit status 0 when no attempt failed, nothing was lost and every round held its invariants.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from chaos.rig import rig
from courier_testkit.sampling import machine
from fleet import report, rolling


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fleet", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the sizes tests/test_fleet.py uses")
    parser.add_argument("--rounds", type=int, help="instances to replace, one at a time")
    parser.add_argument("--rate", type=float, help="create requests per second")
    parser.add_argument(
        "--report", type=Path, default=Path("build/fleet-report.json"), help="JSON report path"
    )
    return parser


async def _run(scale: rolling.Scale, path: Path) -> bool:
    started = time.monotonic()
    print(f"-- rolling replacement ({scale.name}: {scale})", file=sys.stderr, flush=True)
    async with rig() as running:
        outcome = await rolling.run(running, scale)
    print(report.text(outcome), flush=True)
    extra = {
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report.write(outcome, path, extra)
    print(f"\nreport: {path}")
    return outcome.ok


def main() -> int:
    args = _parser().parse_args()
    scale = rolling.QUICK if args.quick else rolling.FULL
    changes = {"rounds": args.rounds, "rate": args.rate}
    scale = dataclasses.replace(scale, **{k: v for k, v in changes.items() if v is not None})
    import uvloop

    return 0 if uvloop.run(_run(scale, args.report)) else 1


if __name__ == "__main__":
    sys.exit(main())
