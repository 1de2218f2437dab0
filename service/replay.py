"""``courier replay``: move messages from the DLQ back to the work queue, selectively and slowly.

Safety: a message leaves the DLQ only after the work queue accepted its copy. Messages that
do not match the filters (and, in a dry run, every message) are made visible again at the
end, untouched. The copy keeps the original attributes minus ``dlq_*`` and gains
``replayed=1`` so the worker consults the request's status before delivering again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .consumer import Message
from .queue import is_fifo, string_attributes

LIST_VISIBILITY_SECONDS = 60


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which DLQ messages to move; empty fields match everything."""

    reason: str = ""
    target: str = ""
    op: str = ""
    min_age_seconds: float = 0.0
    max_age_seconds: float = 0.0

    def matches(self, message: Message, now: float) -> bool:
        """Whether ``message`` passes every filter."""
        attributes = message.attributes
        if self.reason and attributes.get("dlq_reason") != self.reason:
            return False
        if self.target and attributes.get("dlq_target") != self.target:
            return False
        if self.op and attributes.get("op") != self.op:
            return False
        failed_at = float(attributes.get("dlq_failed_at") or message.sent_at or now)
        age = now - failed_at
        if self.min_age_seconds and age < self.min_age_seconds:
            return False
        return not (self.max_age_seconds and age > self.max_age_seconds)


@dataclass
class ReplayReport:
    """What a replay did (or, in a dry run, would do)."""

    examined: int = 0
    matched: int = 0
    moved: int = 0
    failed: int = 0
    listed: list[dict[str, str]] = field(default_factory=list)


class _RateLimiter:
    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = time.monotonic()

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
    on_message: Callable[[Message, bool], None] | None = None,
) -> ReplayReport:
    """Examine the DLQ once through; move (or list) the matching messages."""
    report = ReplayReport()
    seen: set[str] = set()
    skipped: list[Message] = []
    limiter = _RateLimiter(rate_per_second)
    while not limit or report.matched < limit:
        batch = await _receive(sqs, dlq_url)
        fresh = [m for m in batch if m.message_id not in seen]
        if not fresh:
            skipped += [m for m in batch if m.message_id in seen]
            break
        for message in fresh:
            seen.add(message.message_id)
            report.examined += 1
            chosen = selection.matches(message, time.time()) and (
                not limit or report.matched < limit
            )
            if on_message is not None:
                on_message(message, chosen)
            if not chosen or dry_run:
                report.matched += int(chosen)
                skipped.append(message)
                continue
            report.matched += 1
            await limiter.wait()
            await _move(sqs, message, dlq_url, queue_url, report)
    await _release(sqs, dlq_url, skipped)
    return report


async def _receive(sqs: Any, dlq_url: str) -> list[Message]:
    response = await sqs.receive_message(
        QueueUrl=dlq_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=1,
        VisibilityTimeout=LIST_VISIBILITY_SECONDS,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"],
    )
    return [Message.from_sqs(raw) for raw in response.get("Messages", [])]


async def _move(
    sqs: Any, message: Message, dlq_url: str, queue_url: str, report: ReplayReport
) -> None:
    attributes = {k: v for k, v in message.attributes.items() if not k.startswith("dlq_")}
    attributes["replayed"] = "1"
    extra: dict[str, str] = {}
    if is_fifo(queue_url):
        extra = {
            "MessageGroupId": message.group_id or "default",
            "MessageDeduplicationId": f"replay-{message.message_id}",
        }
    try:
        await sqs.send_message(
            QueueUrl=queue_url,
            MessageBody=message.body,
            MessageAttributes=string_attributes(attributes),
            **extra,
        )
    except Exception:
        report.failed += 1  # the DLQ copy stays; it becomes visible again after the listing timeout
        return
    await sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message.receipt_handle)
    report.moved += 1


async def _release(sqs: Any, dlq_url: str, messages: list[Message]) -> None:
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        entries = [
            {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": 0}
            for i, m in enumerate(chunk)
        ]
        await sqs.change_message_visibility_batch(QueueUrl=dlq_url, Entries=entries)
