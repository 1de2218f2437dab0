"""Dead-letter moves: a poison message goes to the DLQ at once, with why, and leaves the queue.

The DLQ copy keeps the body and original attributes and adds ``dlq_*`` attributes (reason,
failing target, receive count, original message id, source queue, time). Plaintext never
appears in them: the detail is a short description, not the payload.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import metrics
from .consumer import DeadLetter, Message
from .queue import is_fifo, string_attributes

log = logging.getLogger("courier.dlq")

DLQ_ATTRIBUTES = (
    "dlq_reason",
    "dlq_target",
    "dlq_detail",
    "dlq_receive_count",
    "dlq_source_message_id",
    "dlq_source_queue",
    "dlq_failed_at",
)


class DeadLetterQueue:
    """Sends poison messages to the DLQ (the consumer deletes them from the source after)."""

    def __init__(self, sqs: Any, dlq_url: str, source_queue_url: str) -> None:
        self._sqs = sqs
        self.url = dlq_url
        self._source = source_queue_url

    async def move(self, message: Message, verdict: DeadLetter) -> None:
        """Put ``message`` on the DLQ with ``verdict``'s reason; raises if SQS did not take it."""
        attributes = {
            **{k: v for k, v in message.attributes.items() if not k.startswith("dlq_")},
            "dlq_reason": verdict.reason,
            "dlq_target": verdict.target,
            "dlq_detail": verdict.detail[:256],
            "dlq_receive_count": str(message.receive_count),
            "dlq_source_message_id": message.message_id,
            "dlq_source_queue": self._source,
            "dlq_failed_at": str(int(time.time())),
        }
        extra: dict[str, str] = {}
        if is_fifo(self.url):
            extra = {
                "MessageGroupId": message.group_id or "default",
                "MessageDeduplicationId": message.message_id,
            }
        await self._sqs.send_message(
            QueueUrl=self.url,
            MessageBody=message.body,
            MessageAttributes=string_attributes(attributes),
            **extra,
        )
        metrics.dlq_moves.labels(verdict.reason).inc()
        log.warning(
            "message moved to the DLQ: %s",
            verdict.reason,
            extra={
                "fields": {
                    "event": "dlq_move",
                    "reason": verdict.reason,
                    "target": verdict.target,
                    "detail": verdict.detail[:256],
                    "message_id": message.message_id,
                    "receive_count": message.receive_count,
                }
            },
        )
