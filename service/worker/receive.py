"""Receiving: concurrent long-polls, as many as the queue keeps busy, within the in-flight bound.

Poller 0 always polls; the others poll only while receives come back full (an idle process
costs three ReceiveMessage calls a minute). Every receive first reserves room for what it
asks for, so the messages in flight never exceed ``worker.max_in_flight``. A receive that
stopping cuts short still returns what SQS already handed it, so it can be released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import metrics
from ..errors import classify
from ..settings import WorkerSettings
from .outcomes import Message

# The poller and its parts (receive, dispatch, acknowledge) log as one: "courier.poller".
log = logging.getLogger("courier.poller")

POLL_ERROR_BACKOFF_SECONDS = (1.0, 30.0)
# A receive that already has messages answers at once; one still waiting has none to return.
INTERRUPTED_RECEIVE_WAIT_SECONDS = 1.0
# The most messages one ReceiveMessage call may return.
RECEIVE_BATCH = 10


class Capacity:
    """Counts messages in flight against the bound; pollers wait here for room."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._room = asyncio.Event()

    async def reserve(self, wanted: int) -> int:
        """Wait until ``wanted`` slots are free (or all, if the bound is smaller); take them.

        Waiting for a whole batch of room, not one slot, keeps receives full: asking SQS for
        one message whenever one finishes would multiply the requests per message under load.
        """
        needed = min(wanted, self._limit)
        while self._limit - self._used < needed:
            self._room.clear()
            await self._room.wait()
        granted = min(wanted, self._limit - self._used)
        self._used += granted
        metrics.in_flight.set(self._used)
        return granted

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots (a message finished, or a receive returned fewer)."""
        self._used -= count
        metrics.in_flight.set(self._used)
        self._room.set()


class Receiver:
    """Runs the long-poll loops and hands every received batch to ``on_batch``."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        settings: WorkerSettings,
        capacity: Capacity,
        on_batch: Callable[[list[Message]], None],
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._settings = settings
        self._capacity = capacity
        self._on_batch = on_batch
        self._loops: list[asyncio.Task[None]] = []
        self._busy = asyncio.Event()
        self._stopping = False
        self._interrupted: set[asyncio.Future[list[Message]]] = set()

    def start(self) -> None:
        """Start ``worker.pollers`` loops."""
        self._loops = [
            asyncio.create_task(self._poll(index), name=f"poller-{index}")
            for index in range(self._settings.pollers)
        ]

    def stop(self) -> None:
        """Receive nothing more; the loops end at once."""
        self._stopping = True
        for task in self._loops:
            task.cancel()

    async def join(self) -> None:
        """Wait for the stopped loops to end."""
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def take_interrupted(self) -> list[Message]:
        """What receives cut short by ``stop`` had already taken off the queue (to release)."""
        if not self._interrupted:
            return []
        done, pending = await asyncio.wait(
            self._interrupted, timeout=INTERRUPTED_RECEIVE_WAIT_SECONDS
        )
        for task in pending:  # still long-polling an empty queue: nothing to give back
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._interrupted.clear()
        return [
            m
            for task in done
            if not task.cancelled() and task.exception() is None
            for m in task.result()
        ]

    async def _poll(self, index: int) -> None:
        errors = 0
        while not self._stopping:
            if index > 0:
                await self._busy.wait()  # extra pollers only while the queue has work
            room = await self._capacity.reserve(RECEIVE_BATCH)
            try:
                batch = await self._counted_receive(room)
            except Exception as exc:
                self._capacity.release(room)
                errors += 1
                await self._poll_failed(exc, errors)
                continue
            errors = 0
            self._capacity.release(room - len(batch))
            self._adapt(index, len(batch), room)
            self._on_batch(batch)

    async def _counted_receive(self, room: int) -> list[Message]:
        metrics.pollers_active.inc()
        try:
            return await self._receive_unless_stopped(room)
        finally:
            metrics.pollers_active.dec()

    async def _receive_unless_stopped(self, room: int) -> list[Message]:
        # Shielded: stopping cancels the poller, not the request, so messages SQS already
        # handed to this receive are not stranded invisible; take_interrupted returns them.
        receive = asyncio.ensure_future(self._receive(room))
        try:
            return await asyncio.shield(receive)
        except asyncio.CancelledError:
            self._interrupted.add(receive)
            raise

    async def _receive(self, room: int) -> list[Message]:
        response = await self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=room,
            WaitTimeSeconds=self._settings.wait_seconds,
            VisibilityTimeout=self._settings.visibility_timeout_seconds,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=[
                "ApproximateReceiveCount",
                "SentTimestamp",
                "MessageGroupId",
            ],
        )
        batch = [Message.from_sqs(raw) for raw in response.get("Messages", [])]
        now = time.time()
        for message in batch:
            metrics.messages_received.inc()
            if message.sent_at:
                metrics.queue_lag.observe(max(0.0, now - message.sent_at))
        return batch

    def _adapt(self, index: int, received: int, asked: int) -> None:
        if received and received == asked:
            self._busy.set()
        elif received == 0 and index == 0:
            self._busy.clear()

    async def _poll_failed(self, exc: Exception, errors: int) -> None:
        low, high = POLL_ERROR_BACKOFF_SECONDS
        # A failure retrying cannot fix (a refused request) waits the longest step at once.
        delay = min(high, low * 2 ** (errors - 1)) if classify(exc, "sqs").retryable else high
        log.warning(
            "receive failed; backing off %.0fs",
            delay,
            extra={
                "fields": {
                    "event": "receive_failed",
                    "backoff_seconds": delay,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            },
        )
        await asyncio.sleep(delay)
