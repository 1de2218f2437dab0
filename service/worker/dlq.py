"""Dead-letter moves: a poison message goes to the DLQ at once, with why, and leaves the queue.

The DLQ copy keeps the body and the original attributes and adds one attribute, ``dlq``: compact
JSON saying why and where the message failed (``DeadLetterInfo``). One attribute rather than
one per field because SQS refuses a message with more than 10 attributes, and a replayed
message that fails again must still fit. Plaintext never appears in it: the detail is a short
description, not the payload.

Every reader of a DLQ copy (``courier replay``, the chaos suite, the tests) goes through
``DeadLetterInfo.of`` / ``of_sqs``, the one place that knows the format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .. import metrics
from ..queue import is_fifo, string_attributes
from .outcomes import DeadLetter, Message

log = logging.getLogger("courier.dlq")

DLQ_ATTRIBUTE = "dlq"
# SQS refuses a message with more message attributes than this.
MAX_ATTRIBUTES = 10
# courier's own attributes: kept first when a message arrives with more than can be carried.
_OWN_ATTRIBUTES = ("op", "request_id", "traceparent", "attempt", "replayed")
# Copies written before the fold into ``dlq`` carry one attribute per field; a DLQ keeps
# messages for days, so they are still read (and never carried over).
_LEGACY_PREFIX = "dlq_"


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Why and where a DLQ copy failed: the ``dlq`` attribute, parsed."""

    reason: str
    target: str = ""
    detail: str = ""
    receive_count: int = 0
    source_message_id: str = ""
    source_queue: str = ""
    failed_at: float = 0.0  # Unix time of the move, by the worker's clock

    def to_attribute(self) -> str:
        """The compact JSON stored as the ``dlq`` attribute."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def of(cls, attributes: Mapping[str, str]) -> DeadLetterInfo | None:
        """Parse a DLQ copy's (string) attributes; None when courier did not put it there.

        SQS's own redrive (after maxReceiveCount) moves a message without any of this. courier
        dead-letters a message still failing on its last receive itself
        (``service/worker/redrive.py``), so this is left for a last receive whose move or
        delete failed, that was released (stopping, a FIFO group behind it), or that a stopped
        or crashed worker held, and for a limit courier could not read.
        """
        raw = attributes.get(DLQ_ATTRIBUTE)
        if raw:
            return cls._from_json(raw)
        if attributes.get(f"{_LEGACY_PREFIX}reason"):
            return cls._from_legacy(attributes)
        return None

    @classmethod
    def of_sqs(cls, raw: Mapping[str, Any]) -> DeadLetterInfo | None:
        """Parse an entry of ReceiveMessage's ``Messages`` (see ``of``)."""
        attributes = {
            name: str(value.get("StringValue", ""))
            for name, value in raw.get("MessageAttributes", {}).items()
        }
        return cls.of(attributes)

    @classmethod
    def _from_json(cls, raw: str) -> DeadLetterInfo:
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            return cls(reason="(unreadable)", detail=raw[:256])
        return cls(
            reason=str(document.get("reason", "")),
            target=str(document.get("target", "")),
            detail=str(document.get("detail", "")),
            receive_count=_int(document.get("receive_count")),
            source_message_id=str(document.get("source_message_id", "")),
            source_queue=str(document.get("source_queue", "")),
            failed_at=_float(document.get("failed_at")),
        )

    @classmethod
    def _from_legacy(cls, attributes: Mapping[str, str]) -> DeadLetterInfo:
        def field(name: str) -> str:
            return attributes.get(f"{_LEGACY_PREFIX}{name}", "")

        return cls(
            reason=field("reason"),
            target=field("target"),
            detail=field("detail"),
            receive_count=_int(field("receive_count")),
            source_message_id=field("source_message_id"),
            source_queue=field("source_queue"),
            failed_at=_float(field("failed_at")),
        )


def _int(value: Any) -> int:
    with contextlib.suppress(TypeError, ValueError):
        return int(value)
    return 0


def _float(value: Any) -> float:
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    return 0.0


def carried_attributes(attributes: Mapping[str, str], added: Mapping[str, str]) -> dict[str, str]:
    """``attributes`` without dead-letter info, plus ``added``, within SQS's 10 attributes.

    Used for every copy courier makes of a message (to the DLQ, and back by a replay). If the
    message came with more than fit, courier's own attributes are kept and the rest dropped.
    """
    carried = {
        name: value
        for name, value in attributes.items()
        if value
        and name not in added
        and name != DLQ_ATTRIBUTE
        and not name.startswith(_LEGACY_PREFIX)
    }
    room = MAX_ATTRIBUTES - len(added)
    if len(carried) > room:
        order = sorted(carried, key=lambda name: (name not in _OWN_ATTRIBUTES, name))
        log.warning(
            "message attributes dropped from a copy: SQS allows %d",
            MAX_ATTRIBUTES,
            extra={"fields": {"event": "attributes_dropped", "dropped": order[room:]}},
        )
        carried = {name: carried[name] for name in order[:room]}
    return {**carried, **added}


class DeadLetterQueue:
    """Sends poison messages to the DLQ (the poller deletes them from the source after)."""

    def __init__(self, sqs: Any, dlq_url: str, source_queue_url: str) -> None:
        self._sqs = sqs
        self.url = dlq_url
        self._source = source_queue_url

    async def move(self, message: Message, verdict: DeadLetter) -> None:
        """Put ``message`` on the DLQ with ``verdict``'s reason; raises if SQS did not take it."""
        info = DeadLetterInfo(
            reason=verdict.reason,
            target=verdict.target,
            detail=verdict.detail[:256],
            receive_count=message.receive_count,
            source_message_id=message.message_id,
            source_queue=self._source,
            failed_at=round(time.time(), 3),
        )
        attributes = carried_attributes(message.attributes, {DLQ_ATTRIBUTE: info.to_attribute()})
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
