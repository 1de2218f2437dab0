"""6. soak: sustained load on one role=all process; RSS, open fds and event-loop lag sampled
every 5 s (full run only: ``SMALL.soak_seconds`` is 0).

RSS must not keep growing in the second half, and once the process has been idle long enough
for pooled connections to close, it may hold only a few more fds than at the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import aiohttp

from chaos import verify
from chaos.load import Load
from chaos.report import Row
from chaos.rig import Rig
from chaos.scenarios.common import Scale, Scenario, fleet, metric, run_id, summarize
from courier_testkit.courier import CourierProcess

SAMPLE_SECONDS = 5.0
IDLE_SECONDS = 30.0
FD_SLACK = 16  # pooled connections to AWS that stay open between polls


class Soak(Scenario):
    """``soak_rate`` requests a second for ``soak_seconds`` through one process."""

    process: CourierProcess
    http: aiohttp.ClientSession
    requests: Load
    samples: list[dict[str, float]]
    peak_sockets: dict[str, int]
    idle_fds: int  # after IDLE_SECONDS without load
    idle_rss_mb: float
    idle_sockets: dict[str, int]

    async def setup(self) -> None:
        rig, scale = self.rig, self.scale
        self.row = Row(f"6 soak {scale.soak_seconds:g}s")
        self.resources = await rig.fresh("soak")
        await rig.stubs.reset()
        settings = rig.settings(self.resources, "all", worker={"wait_seconds": 2})
        run = run_id()
        count = int(scale.soak_rate * scale.soak_seconds)
        processes = await self.stack.enter_async_context(fleet(rig, settings, "soak"))
        self.http = await self.stack.enter_async_context(aiohttp.ClientSession())
        (self.process,) = processes.alive()
        self.requests = Load(
            [self.process.url], rig.token(), run=run, rate=scale.soak_rate, count=count
        )

    async def load(self) -> None:
        """The load, sampled every ``SAMPLE_SECONDS`` until it is all sent."""
        self.sending = asyncio.create_task(self.requests.run_all())
        self.samples = []
        while not self.sending.done():
            self.samples.append(await self._sample())
            await asyncio.sleep(SAMPLE_SECONDS)
        self.peak_sockets = _sockets_by_peer(self.process.pid, _peer_names(self.rig, self.process))

    async def fault(self) -> None:
        """None: sustained load is the whole test."""

    async def recover(self) -> None:
        """Nothing to undo: wait for every delivery, then idle so pooled connections close."""
        await self.wait_delivered(self.scale.drain_timeout)
        # Pooled connections close once idle (aiohttp: 15 s): what stays open after is kept.
        await asyncio.sleep(IDLE_SECONDS)
        pid = self.process.pid
        self.idle_fds = _fds(pid)
        self.idle_rss_mb = self.process.memory()["rss"] / 2**20
        self.idle_sockets = _sockets_by_peer(pid, _peer_names(self.rig, self.process))

    async def check(self) -> list[Row]:
        row, samples, result = self.row, self.samples, self.result
        summarize(row, result, self.drained, dlq=self.dlq)
        row.base_invariants()
        idle_fds = self.idle_fds
        row.notes.update(
            fds_after_idle=idle_fds,
            rss_mb_after_idle=round(self.idle_rss_mb, 1),
            sockets_at_last_sample=self.peak_sockets,
            sockets_after_idle=self.idle_sockets,
            in_flight_max=max((s["in_flight"] for s in samples), default=0),
        )
        second_half = samples[len(samples) // 2 :]
        rss_slope = _slope([(s["t"], s["rss_mb"]) for s in second_half]) * 60
        fd_slope = _slope([(s["t"], s["fds"]) for s in second_half]) * 60
        lags = [s["healthz_ms"] for s in samples]
        row.notes.update(
            samples=len(samples),
            rss_mb_first_last=[round(samples[0]["rss_mb"], 1), round(samples[-1]["rss_mb"], 1)]
            if samples
            else [],
            rss_slope_mb_per_min_2nd_half=round(rss_slope, 2),
            fds_first_last=[samples[0]["fds"], samples[-1]["fds"]] if samples else [],
            fd_slope_per_min_2nd_half=round(fd_slope, 2),
            healthz_ms_p50_p99=[
                round(verify.percentile(lags, 50), 1),
                round(verify.percentile(lags, 99), 1),
            ],
            achieved_rate=round(
                len(result.accepted) / max(1e-6, result.finished - result.started), 1
            ),
        )
        row.check(rss_slope < 2.0, f"RSS grows {rss_slope:.1f} MB/min in the second half")
        baseline_fds = samples[0]["fds"] if samples else 0
        row.check(
            idle_fds <= baseline_fds + FD_SLACK,
            f"{idle_fds} fds open after {IDLE_SECONDS:g}s idle, {baseline_fds} at the start",
        )
        row.seconds = time.monotonic() - self.started
        return [row]

    async def _sample(self) -> dict[str, float]:
        """RSS, fds, /healthz latency (the event loop's lag) and messages in flight, now."""
        process = self.process
        t0 = time.monotonic()
        async with self.http.get(process.url + "/healthz") as response:
            await response.read()
        lag = time.monotonic() - t0
        memory = process.memory()
        return {
            "t": t0 - self.started,
            "rss_mb": memory["rss"] / 2**20,
            "fds": _fds(process.pid),
            "healthz_ms": 1000 * lag,
            "in_flight": await metric(process, "courier_messages_in_flight"),
        }


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _peer_names(rig: Rig, process: CourierProcess) -> dict[int, str]:
    ports = {int(url.rsplit(":", 1)[1]): name for name, url in rig.stubs.urls.items()}
    ports.update({int(p.url.rsplit(":", 1)[1]): f"aws-{n}" for n, p in rig.proxies.items()})
    ports[int(process.url.rsplit(":", 1)[1])] = "api-clients"
    return ports


def _sockets_by_peer(pid: int, names: dict[int, str]) -> dict[str, int]:
    """Open TCP sockets of ``pid`` by the service at the other end (Linux /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
                found[names.get(remote) or names.get(local) or "other"] += 1
    return dict(found)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


async def run(rig: Rig, scale: Scale) -> list[Row]:
    """The soak's one row; none when ``scale`` has no soak."""
    if not scale.soak_seconds:
        return []
    return await Soak(rig, scale).steps()
