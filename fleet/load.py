"""Steady open-loop load until told to stop: ``chaos.load.Load`` batches, back to back.

``chaos.load.Load`` sends a fixed number of requests; a rolling replacement lasts as long as
the health checks take, so the load here runs until ``stop`` is set: one ``Load`` of
``batch_seconds`` worth of requests starts every ``batch_seconds``, each on the schedule of
the one before (the offered rate stays constant across batches), each with a run id of its own
(usernames and Idempotency-Keys stay unique). Every attempt's answer is kept, as ``Load``
keeps it: retries (same key, after ``Retry-After``) do not hide a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from chaos.load import Load, LoadResult

BATCH_SECONDS = 2.0


@dataclass(frozen=True)
class SteadyLoad:
    """Create-mailbox requests to ``url`` at ``rate`` per second until stopped."""

    url: str
    token: str
    run: str  # a prefix of every username and Idempotency-Key
    rate: float
    batch_seconds: float = BATCH_SECONDS

    def _batch(self, number: int) -> Load:
        count = max(1, round(self.rate * self.batch_seconds))
        return Load(
            [self.url], self.token, run=f"{self.run}{number:03d}", rate=self.rate, count=count
        )

    async def run_until(self, stop: asyncio.Event) -> LoadResult:
        """Send until ``stop`` is set (the batch under way finishes); every request's outcome."""
        started = time.monotonic()
        batches: list[asyncio.Task[LoadResult]] = []
        while not stop.is_set():
            batches.append(asyncio.create_task(self._batch(len(batches)).run_all()))
            next_batch = started + len(batches) * self.batch_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_batch - time.monotonic()))
        results = await asyncio.gather(*batches)
        requests = [request for result in results for request in result.requests]
        return LoadResult(requests, started, max(result.finished for result in results))
