"""Acknowledging: applying a message's outcome to the queue, in batched SQS calls.

``Ack`` deletes; ``DeadLetter`` moves a copy to the DLQ, records the final state
(``after_move``), then deletes; ``Retry`` hides the message for its backoff; ``Release`` makes
it visible at once. Deletes and visibility changes wait ``worker.ack_linger_seconds`` to share
a DeleteMessageBatch / ChangeMessageVisibilityBatch request with others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from .. import metrics
from ..batching import BatchEntryError, Batcher
from .outcomes import Ack, DeadLetter, DeadLetterSink, Message, Outcome, Retry

# The poller and its parts (receive, dispatch, acknowledge) log as one: "courier.poller".
log = logging.getLogger("courier.poller")

MAX_VISIBILITY_SECONDS = 43_200
_processed = metrics.LabelCache(metrics.messages_processed)


class Acknowledger:
    """Applies outcomes to one queue; ``dead_letter`` moves a message to the DLQ."""

    def __init__(
        self, sqs: Any, queue_url: str, dead_letter: DeadLetterSink, linger_seconds: float
    ) -> None:
        self.dead_letter = dead_letter
        self._sqs = sqs
        self._queue_url = queue_url
        self._deletes = Batcher("delete", self._delete_batch, linger_seconds)
        self._visibility = Batcher("visibility", self._visibility_batch, linger_seconds)

    async def apply(self, message: Message, outcome: Outcome) -> None:
        """Apply ``outcome``; a failure is logged and counted, and the message comes back."""
        try:
            await self._apply(message, outcome)
        except Exception as exc:
            _apply_failed(message, outcome, exc)

    async def extend(self, message: Message, seconds: int) -> None:
        """Keep ``message`` invisible for ``seconds`` more (raises if SQS refuses)."""
        await self._visibility.submit(
            {"ReceiptHandle": message.receipt_handle, "VisibilityTimeout": seconds}
        )

    async def drain(self) -> None:
        """Send every delete and visibility change still waiting for its batch."""
        await self._deletes.drain()
        await self._visibility.drain()

    async def _apply(self, message: Message, outcome: Outcome) -> None:
        handle = {"ReceiptHandle": message.receipt_handle}
        if isinstance(outcome, Ack):
            await self._deletes.submit(handle)
            _processed(outcome.outcome).inc()
        elif isinstance(outcome, DeadLetter):
            # A failed move raises: the message stays and comes back, nothing recorded.
            await self.dead_letter(message, outcome)
            await _after_move(message, outcome)
            await self._deletes.submit(handle)
            _processed("dead_lettered").inc()
        elif isinstance(outcome, Retry):
            # Rounded up: SQS counts whole seconds, and rounding 0.4 s down would retry at once.
            delay = min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(outcome.delay_seconds)))
            await self._visibility.submit({**handle, "VisibilityTimeout": delay})
            _processed("retried").inc()
        else:
            await self._visibility.submit({**handle, "VisibilityTimeout": 0})
            _processed("released").inc()

    async def _delete_batch(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = await self._sqs.delete_message_batch(
            QueueUrl=self._queue_url, Entries=entries
        )
        return response

    async def _visibility_batch(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = await self._sqs.change_message_visibility_batch(
            QueueUrl=self._queue_url, Entries=entries
        )
        return response


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


def _apply_failed(message: Message, outcome: Outcome, exc: Exception) -> None:
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
