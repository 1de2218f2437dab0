"""``courier replay``: move messages from the DLQ back to the work queue, selectively and slowly.

A replay takes what the DLQ held when it began. A copy dead-lettered after that, most often
one this run moved and a target still refuses, is skipped and left for a later run: moving it
again would loop for as long as the target refuses. Such a copy is recognised by its failure
time (the ``dlq`` attribute's ``failed_at``, after the start) or, whatever the clocks say, by
coming from a copy this run sent.

Safety: a message leaves the DLQ only after the work queue accepted its copy. Messages not
moved (not matching, skipped, beyond the limit, and in a dry run every message) are made
visible again at the end, untouched; one whose move failed stays in the DLQ and becomes
visible again when its listing visibility (LIST_VISIBILITY_SECONDS) runs out. The copy keeps
the original attributes minus ``dlq`` and gains ``replayed=1`` so the worker consults the
request's status before delivering again.

A slow pass receives only when its next move may start, and no more at a time than it moves
in half the listing visibility, so a receipt handle is still current when its message is
deleted. Cancelling a pass (Ctrl-C, the console's Stop, shutdown), once or repeatedly, lets the
receive or move under way finish (a copy sent whose original stayed would be replayed twice)
and releases everything the pass held at once.

``discard`` is the same pass deleting the chosen messages instead of moving them. The
operator console (``service/console/``) acts through these two functions, as the CLI does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..queue import is_fifo, string_attributes
from .dlq import DeadLetterInfo, carried_attributes
from .outcomes import Message

LIST_VISIBILITY_SECONDS = 60
OnMessage = Callable[[Message, bool], None]
# What a pass does to a chosen message: the id of what it left behind (the work queue's copy,
# or the discarded message's own), or None when it failed and the message stays in the DLQ.
Action = Callable[[Message], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which DLQ messages to move; empty fields match everything."""

    reason: str = ""
    target: str = ""
    op: str = ""
    min_age_seconds: float = 0.0
    max_age_seconds: float = 0.0
    # Only these DLQ messages (by their DLQ message id): the console's selection.
    message_ids: frozenset[str] = field(default_factory=frozenset)

    def matches(self, message: Message, now: float) -> bool:
        """Whether ``message`` passes every filter."""
        if self.message_ids and message.message_id not in self.message_ids:
            return False
        info = DeadLetterInfo.of(message.attributes)
        if self.reason and (info is None or info.reason != self.reason):
            return False
        if self.target and (info is None or info.target != self.target):
            return False
        if self.op and message.attributes.get("op") != self.op:
            return False
        failed_at = (info.failed_at if info else 0.0) or message.sent_at or now
        age = now - failed_at
        if self.min_age_seconds and age < self.min_age_seconds:
            return False
        return not (self.max_age_seconds and age > self.max_age_seconds)


@dataclass
class ReplayReport:
    """What a replay did (or, in a dry run, would do)."""

    examined: int = 0
    # Passed the filters, among the messages the DLQ held when the replay began.
    matched: int = 0
    # Matched and within the limit: moved or tried (listed, in a dry run; released untouched
    # when the pass was stopped before its turn).
    chosen: int = 0
    moved: int = 0  # for a discard: deleted
    # Chosen, but the work queue did not take the copy: still in the DLQ.
    failed: int = 0
    # Dead-lettered after the replay began: left in the DLQ for a later run.
    skipped: int = 0

    @property
    def left(self) -> int:
        """Matched messages still in the DLQ: failed to move, or beyond the limit."""
        return self.matched - self.moved


class _RateLimiter:
    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = time.monotonic()

    @property
    def batch_size(self) -> int:
        """Messages to take at once: what this rate moves in half the listing visibility."""
        if not self._interval:
            return 10
        return max(1, min(10, int(LIST_VISIBILITY_SECONDS / 2 / self._interval)))

    async def ready(self) -> None:
        """Until the next move may start (without taking its turn): a pass receives only then,
        so a batch's first move follows its receipt at once."""
        delay = self._next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


async def replay(
    sqs: Any,
    dlq_url: str,
    queue_url: str,
    selection: ReplayFilter,
    *,
    rate_per_second: float = 10.0,
    dry_run: bool = False,
    limit: int = 0,
    on_message: OnMessage | None = None,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """Examine what the DLQ holds once through; move (or list) the matching messages.

    The counts go into ``report`` (a new one when None) as the pass goes, so a caller can
    show them while it runs; the same report is returned.
    """
    move = partial(_move, sqs, dlq_url=dlq_url, queue_url=queue_url)
    run = _Replay(sqs, dlq_url, move, selection, limit=limit, on_message=on_message, report=report)
    return await run.run(rate_per_second, dry_run)


async def discard(
    sqs: Any,
    dlq_url: str,
    selection: ReplayFilter,
    *,
    rate_per_second: float = 0.0,
    dry_run: bool = False,
    limit: int = 0,
    on_message: OnMessage | None = None,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """The pass of ``replay``, deleting the matching messages from the DLQ instead (for good)."""
    delete = partial(_delete, sqs, dlq_url=dlq_url)
    run = _Replay(
        sqs, dlq_url, delete, selection, limit=limit, on_message=on_message, report=report
    )
    return await run.run(rate_per_second, dry_run)


class _Replay:
    """One pass over the DLQ: what was seen, sent and held back."""

    def __init__(
        self,
        sqs: Any,
        dlq_url: str,
        action: Action,
        selection: ReplayFilter,
        *,
        limit: int,
        on_message: OnMessage | None,
        report: ReplayReport | None,
    ) -> None:
        self._sqs = sqs
        self._dlq_url = dlq_url
        self._action = action
        self._selection = selection
        self._limit = limit
        self._on_message = on_message
        self._started = time.time()
        self._seen: set[str] = set()
        self._sent: set[str] = set()  # message ids of the copies this run put on the work queue
        self.held: list[Message] = []  # received and not moved: released at the end
        # The caller's report when given, so it can show the counts while the pass runs.
        self.report = report if report is not None else ReplayReport()

    async def run(self, rate_per_second: float, dry_run: bool) -> ReplayReport:
        """The whole pass: examine, then release what was held back (even on an error)."""
        try:
            await self.examine(_RateLimiter(rate_per_second), dry_run)
        finally:
            # Released even when stopped meanwhile: the pass ends right after either way.
            releasing = asyncio.ensure_future(_release(self._sqs, self._dlq_url, self.held))
            await _unstoppable(releasing)
            releasing.result()
        return self.report

    async def examine(self, limiter: _RateLimiter, dry_run: bool) -> None:
        """Receive until nothing new comes back (or the limit is reached); move the chosen."""
        while not (self._limit and self.report.chosen >= self._limit):
            await limiter.ready()
            receiving = asyncio.ensure_future(
                _receive(self._sqs, self._dlq_url, limiter.batch_size)
            )
            stopped = await _unstoppable(receiving)
            batch = receiving.result()
            if stopped:  # SQS hid these from everyone else: release them, not in 60 s
                self.held += batch
                raise asyncio.CancelledError
            fresh = [m for m in batch if m.message_id not in self._seen]
            # Seen before: its listing visibility ran out. Released with its new handle.
            self.held += [m for m in batch if m.message_id in self._seen]
            if not fresh:
                return
            for index, message in enumerate(fresh):
                try:
                    await self._consider(message, limiter, dry_run)
                except BaseException:
                    # Stopped or failed: the rest of the batch is released with the held.
                    self.held += fresh[index + 1 :]
                    raise

    async def _consider(self, message: Message, limiter: _RateLimiter, dry_run: bool) -> None:
        self._seen.add(message.message_id)
        chosen = self._choose(message)
        if self._on_message is not None:
            self._on_message(message, chosen)
        if not chosen or dry_run:
            self.held.append(message)
            return
        try:
            await limiter.wait()
        except asyncio.CancelledError:
            self.held.append(message)  # stopped before its turn: released untouched
            raise
        await self._move(message)

    def _choose(self, message: Message) -> bool:
        report = self.report
        report.examined += 1
        if self._dead_lettered_since_start(message):
            report.skipped += 1
            return False
        if not self._selection.matches(message, time.time()):
            return False
        report.matched += 1
        if self._limit and report.chosen >= self._limit:
            return False
        report.chosen += 1
        return True

    def _dead_lettered_since_start(self, message: Message) -> bool:
        info = DeadLetterInfo.of(message.attributes)
        if info is None:  # moved by SQS's redrive, which keeps the message id
            return message.message_id in self._sent
        return info.source_message_id in self._sent or info.failed_at > self._started

    async def _move(self, message: Message) -> None:
        # Finished even when stopped meanwhile (send, then delete): cut between the two, the
        # work queue would have the copy and the DLQ the original, replayed again later.
        acting = asyncio.ensure_future(self._action(message))
        stopped = await _unstoppable(acting)
        if acting.exception() is None:
            self._count(acting.result())
        elif stopped:  # a failed delete while stopping: counted, and the stop goes on
            self.report.failed += 1
        else:
            acting.result()  # a failed delete ends the pass
        if stopped:
            raise asyncio.CancelledError

    def _count(self, copy_id: str | None) -> None:
        if copy_id is None:
            # The DLQ copy stays; it becomes visible again after the listing timeout.
            self.report.failed += 1
            return
        self._sent.add(copy_id)
        self.report.moved += 1


async def _unstoppable(work: asyncio.Future[Any]) -> bool:
    """Wait for ``work`` to end, however often the caller is cancelled meanwhile; whether it
    was. The caller honours the cancellation once it has used what ``work`` did."""
    stopped = False
    while not work.done():
        try:
            await asyncio.wait({work})  # unlike awaiting it, never cancels ``work``
        except asyncio.CancelledError:
            stopped = True
    return stopped


async def _receive(sqs: Any, dlq_url: str, count: int) -> list[Message]:
    response = await sqs.receive_message(
        QueueUrl=dlq_url,
        MaxNumberOfMessages=count,
        WaitTimeSeconds=1,
        VisibilityTimeout=LIST_VISIBILITY_SECONDS,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"],
    )
    return [Message.from_sqs(raw) for raw in response.get("Messages", [])]


async def _move(sqs: Any, message: Message, *, dlq_url: str, queue_url: str) -> str | None:
    """Copy ``message`` to the work queue, then delete it from the DLQ.

    Returns the copy's message id, or None when the work queue did not take it (nothing
    deleted then).
    """
    attributes = carried_attributes(message.attributes, {"replayed": "1"})
    extra: dict[str, str] = {}
    if is_fifo(queue_url):
        extra = {
            "MessageGroupId": message.group_id or "default",
            "MessageDeduplicationId": f"replay-{message.message_id}",
        }
    try:
        response = await sqs.send_message(
            QueueUrl=queue_url,
            MessageBody=message.body,
            MessageAttributes=string_attributes(attributes),
            **extra,
        )
    except Exception:
        return None
    await sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message.receipt_handle)
    return str(response["MessageId"])


async def _delete(sqs: Any, message: Message, *, dlq_url: str) -> str | None:
    """Delete ``message`` from the DLQ; its id, or None when SQS did not take the delete."""
    try:
        await sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message.receipt_handle)
    except Exception:
        return None
    return message.message_id


async def _release(sqs: Any, dlq_url: str, messages: list[Message]) -> None:
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        entries = [
            {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": 0}
            for i, m in enumerate(chunk)
        ]
        await sqs.change_message_visibility_batch(QueueUrl=dlq_url, Entries=entries)
