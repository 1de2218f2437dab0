"""The SQS poller: concurrent long-polls feeding a bounded number of messages in flight.

Unlike a batch-at-a-time consumer, a slow message never holds back the rest: each message
is its own task, and pollers receive more as soon as there is room. When the in-flight
bound is reached, polling pauses; when the queue is idle, only one poller stays (an idle
process costs three ReceiveMessage calls a minute). Outcomes are applied through batched
DeleteMessageBatch / ChangeMessageVisibilityBatch, and long-running messages are kept
invisible by a heartbeat.

FIFO queues: messages of one MessageGroupId in a batch run one after another; when one is
not acknowledged, the rest of its group is released so order holds. Other groups run in
parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..batching import BatchEntryError, Batcher
from ..errors import is_retryable
from ..logs import log_context
from ..queue import is_fifo
from ..settings import WorkerSettings
from .outcomes import (
    Ack,
    DeadLetter,
    DeadLetterSink,
    Handler,
    Message,
    Outcome,
    Release,
    Retry,
    backoff_seconds,
)

log = logging.getLogger("courier.poller")

MAX_VISIBILITY_SECONDS = 43_200
POLL_ERROR_BACKOFF_SECONDS = (1.0, 30.0)
# A receive that already has messages answers at once; one still waiting has none to return.
INTERRUPTED_RECEIVE_WAIT_SECONDS = 1.0


async def _after_move(message: Message, verdict: DeadLetter) -> None:
    if verdict.after_move is None:
        return
    try:
        await verdict.after_move()
    except Exception as exc:
        log.warning(
            "message dead-lettered, but its final state was not recorded",
            extra={
                "fields": {
                    "event": "dead_letter_record_failed",
                    "message_id": message.message_id,
                    "reason": verdict.reason,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            },
        )


@dataclass
class _Tracked:
    message: Message
    visible_until: float
    task: asyncio.Task[None] | None = None


class _Capacity:
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
        self._used -= count
        metrics.in_flight.set(self._used)
        self._room.set()


@dataclass
class Poller:
    """Polls one queue and runs ``handler`` on every message; ``run`` until ``stop``."""

    sqs: Any
    queue_url: str
    handler: Handler
    settings: WorkerSettings
    dead_letter: DeadLetterSink
    _pollers: list[asyncio.Task[None]] = field(default_factory=list)
    _tracked: dict[str, _Tracked] = field(default_factory=dict)
    _busy: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def __post_init__(self) -> None:
        self.fifo = is_fifo(self.queue_url)
        self._capacity = _Capacity(self.settings.max_in_flight)
        linger = self.settings.ack_linger_seconds
        self._deletes = Batcher("delete", self._delete_batch, linger)
        self._visibility = Batcher("visibility", self._visibility_batch, linger)
        self._heartbeat: asyncio.Task[None] | None = None
        self._interrupted: set[asyncio.Future[list[Message]]] = set()

    def start(self) -> None:
        """Start the pollers and the heartbeat."""
        self._pollers = [
            asyncio.create_task(self._poll(index), name=f"poller-{index}")
            for index in range(self.settings.pollers)
        ]
        self._heartbeat = asyncio.create_task(self._keep_invisible(), name="heartbeat")

    def stop_polling(self) -> None:
        """Receive nothing more (in-flight work goes on)."""
        self._stopping = True
        for task in self._pollers:
            task.cancel()

    async def stop(self, drain_seconds: float) -> None:
        """Stop polling, finish in-flight work within ``drain_seconds``, release the rest, flush."""
        self.stop_polling()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        await self._release_interrupted()
        tasks = {t.task for t in self._tracked.values() if t.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # The heartbeat stops first: an extension racing a release would hide the message again.
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        # Untracked as they are released, so a second stop cannot release them again later,
        # with receipt handles that another consumer may since have been given a newer one of.
        unfinished = list(self._tracked.values())
        self._tracked.clear()
        await asyncio.gather(
            *(self._apply(t.message, Release()) for t in unfinished), return_exceptions=True
        )
        await self._deletes.drain()
        await self._visibility.drain()
        log.info(
            "consumer stopped",
            extra={"fields": {"event": "consumer_stopped", "released": len(unfinished)}},
        )

    @property
    def in_flight(self) -> int:
        """Messages being processed now."""
        return len(self._tracked)

    # -- polling -------------------------------------------------------------------------

    async def _poll(self, index: int) -> None:
        errors = 0
        while not self._stopping:
            if index > 0:
                await self._busy.wait()  # extra pollers only while the queue has work
            room = await self._capacity.reserve(10)
            try:
                metrics.pollers_active.inc()
                try:
                    batch = await self._receive_unless_stopped(room)
                finally:
                    metrics.pollers_active.dec()
            except Exception as exc:
                self._capacity.release(room)
                errors += 1
                await self._poll_failed(exc, errors)
                continue
            errors = 0
            self._capacity.release(room - len(batch))
            self._adapt(index, len(batch), room)
            self._dispatch(batch)

    async def _receive_unless_stopped(self, room: int) -> list[Message]:
        # Shielded: stopping cancels the poller, not the request, so messages SQS already
        # handed to this receive are not stranded invisible; stop() releases them.
        receive = asyncio.ensure_future(self._receive(room))
        try:
            return await asyncio.shield(receive)
        except asyncio.CancelledError:
            self._interrupted.add(receive)
            raise

    async def _release_interrupted(self) -> None:
        """Give back what receives cut short by stop() had already taken off the queue."""
        if not self._interrupted:
            return
        done, pending = await asyncio.wait(
            self._interrupted, timeout=INTERRUPTED_RECEIVE_WAIT_SECONDS
        )
        for task in pending:  # still long-polling an empty queue: nothing to give back
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        messages = [
            m
            for task in done
            if not task.cancelled() and task.exception() is None
            for m in task.result()
        ]
        self._interrupted.clear()
        await asyncio.gather(*(self._apply(m, Release()) for m in messages), return_exceptions=True)

    async def _receive(self, room: int) -> list[Message]:
        response = await self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=room,
            WaitTimeSeconds=self.settings.wait_seconds,
            VisibilityTimeout=self.settings.visibility_timeout_seconds,
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
        delay = min(high, low * 2 ** (errors - 1))
        log.warning(
            "receive failed; backing off %.0fs",
            delay,
            extra={
                "fields": {"event": "receive_failed", "error": f"{type(exc).__name__}: {exc}"[:300]}
            },
        )
        await asyncio.sleep(delay if is_retryable(exc) else high)

    def _dispatch(self, batch: list[Message]) -> None:
        groups: dict[str | None, list[Message]] = defaultdict(list)
        for message in batch:
            groups[message.group_id if self.fifo else message.message_id].append(message)
        deadline = time.monotonic() + self.settings.visibility_timeout_seconds
        for messages in groups.values():
            tracked = [self._track(message, deadline) for message in messages]
            task = asyncio.create_task(
                self._run_group(messages), name=f"message-{messages[0].message_id}"
            )
            for entry in tracked:
                entry.task = task

    def _track(self, message: Message, deadline: float) -> _Tracked:
        entry = _Tracked(message, deadline)
        self._tracked[message.receipt_handle] = entry
        return entry

    # -- processing ----------------------------------------------------------------------

    async def _run_group(self, messages: list[Message]) -> None:
        for position, message in enumerate(messages):
            outcome = await self._process(message)
            if not isinstance(outcome, Ack | DeadLetter):
                # FIFO: a later message must not overtake one that will be retried.
                for rest in messages[position + 1 :]:
                    await self._finish(rest, Release())
                return

    async def _process(self, message: Message) -> Outcome:
        started = time.perf_counter()
        with log_context(
            message_id=message.message_id, request_id=message.attributes.get("request_id", "")
        ):
            try:
                outcome = await self.handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception(
                    "message handler failed", extra={"fields": {"event": "handler_error"}}
                )
                delay = backoff_seconds(
                    message.receive_count,
                    self.settings.backoff_base_seconds,
                    self.settings.backoff_max_seconds,
                )
                outcome = Retry(delay, f"error: {type(exc).__name__}")
            metrics.processing_latency.observe(time.perf_counter() - started)
            await self._finish(message, outcome)
        return outcome

    async def _finish(self, message: Message, outcome: Outcome) -> None:
        # Untracked before the outcome is applied, so the heartbeat cannot extend the message
        # after (and so undo) a Retry's delay or a Release.
        # The slot is free as soon as the outcome is known: waiting for the batched ack would
        # hold it for the linger and throttle the pollers for nothing.
        if self._tracked.pop(message.receipt_handle, None) is not None:
            self._capacity.release()
        await self._apply(message, outcome)

    async def _apply(self, message: Message, outcome: Outcome) -> None:
        handle = {"ReceiptHandle": message.receipt_handle}
        try:
            if isinstance(outcome, Ack):
                await self._deletes.submit(handle)
                metrics.messages_processed.labels(outcome.outcome).inc()
            elif isinstance(outcome, DeadLetter):
                # A failed move raises: the message stays and comes back, nothing recorded.
                await self.dead_letter(message, outcome)
                await _after_move(message, outcome)
                await self._deletes.submit(handle)
                metrics.messages_processed.labels("dead_lettered").inc()
            elif isinstance(outcome, Retry):
                # Rounded up: SQS counts whole seconds, and rounding 0.4 s down would retry at once.
                delay = min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(outcome.delay_seconds)))
                await self._visibility.submit({**handle, "VisibilityTimeout": delay})
                metrics.messages_processed.labels("retried").inc()
            else:
                await self._visibility.submit({**handle, "VisibilityTimeout": 0})
                metrics.messages_processed.labels("released").inc()
        except Exception as exc:
            # The message stays in the queue and comes back after its visibility timeout.
            operation = type(outcome).__name__.lower()
            code = exc.code if isinstance(exc, BatchEntryError) else type(exc).__name__
            metrics.sqs_entry_failures.labels(operation, code).inc()
            log.warning(
                "could not apply %s to message",
                operation,
                extra={
                    "fields": {
                        "event": "ack_failed",
                        "message_id": message.message_id,
                        "error": str(exc)[:300],
                    }
                },
            )

    # -- heartbeat -----------------------------------------------------------------------

    async def _keep_invisible(self) -> None:
        timeout = self.settings.visibility_timeout_seconds
        while True:
            await asyncio.sleep(max(1.0, timeout / 6))
            now = time.monotonic()
            due = [t for t in self._tracked.values() if t.visible_until - now < timeout / 2]
            for entry in due:
                entry.visible_until = now + timeout
            await asyncio.gather(*(self._extend(entry.message, timeout) for entry in due))

    async def _extend(self, message: Message, seconds: int) -> None:
        with contextlib.suppress(Exception):  # a lost extension only risks a duplicate delivery
            await self._visibility.submit(
                {"ReceiptHandle": message.receipt_handle, "VisibilityTimeout": seconds}
            )
            metrics.visibility_extensions.inc()

    # -- SQS batch calls -----------------------------------------------------------------

    async def _delete_batch(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = await self.sqs.delete_message_batch(
            QueueUrl=self.queue_url, Entries=entries
        )
        return response

    async def _visibility_batch(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = await self.sqs.change_message_visibility_batch(
            QueueUrl=self.queue_url, Entries=entries
        )
        return response
