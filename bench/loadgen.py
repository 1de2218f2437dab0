"""Open-loop HTTP load: POST /v1/mailboxes at a fixed offered rate, whatever the answers do.

wrk is closed-loop (a connection sends its next request only after the answer), so under a
slow server it offers less load and hides queueing. Here request ``i`` is due at
``t0 + i / rate`` and starts then, on a connection of its own if needed; its latency is
counted from when it was due, not from when it went out, so a generator that falls behind
(it shares the machine's CPUs) shows up as latency rather than vanishing ("coordinated
omission"). ``start_lag`` reports how late requests actually started.

``python -m bench.loadgen --url URL --rate R --duration S --token T --run TAG`` prints one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import aiohttp


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    total = max(1, round(args.rate * args.duration))
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int, due: float) -> None:
            lags.append(time.monotonic() - due)
            name = f"o{args.run}{index:x}"
            body = json.dumps(
                {
                    "username": name,
                    "display_name": "Bench User",
                    "plan": "standard",
                    "contact_email": f"{name}@example.com",
                }
            )
            try:
                async with session.post(args.url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
                    if response.status < 300:
                        latencies.append(time.monotonic() - due)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                statuses[type(exc).__name__] += 1

        tasks = []
        start = time.monotonic() + 0.05
        for index in range(total):
            due = start + index / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, due)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return {
        "offered_rps": args.rate,
        "sent": total,
        "ok": len(latencies),
        "achieved_rps": len(latencies) / elapsed,
        "statuses": dict(statuses),
        "p50_ms": _quantile(latencies, 0.5) * 1000,
        "p90_ms": _quantile(latencies, 0.9) * 1000,
        "p99_ms": _quantile(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "start_lag_p99_ms": _quantile(lags, 0.99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--run", default="r")
    parser.add_argument("--timeout", type=float, default=10.0)
    import uvloop

    print(json.dumps(uvloop.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
