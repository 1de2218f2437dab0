"""What the worker decides for one message: the received ``Message`` and its ``Outcome``.

The pipeline returns an outcome, the poller applies it: ``Ack`` deletes, ``Retry`` makes the
message visible again later (on the queue's last receive it becomes a ``DeadLetter``),
``DeadLetter`` moves it to the DLQ then deletes it, ``Release`` gives it back at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """A received SQS message."""

    message_id: str
    receipt_handle: str
    body: str
    attributes: Mapping[str, str]
    receive_count: int
    sent_at: float
    group_id: str | None = None

    @classmethod
    def from_sqs(cls, raw: Mapping[str, Any]) -> Message:
        """Parse an entry of ReceiveMessage's ``Messages``."""
        system = raw.get("Attributes", {})
        attributes = {
            name: value.get("StringValue", "")
            for name, value in raw.get("MessageAttributes", {}).items()
            if value.get("DataType", "").startswith(("String", "Number"))
        }
        return cls(
            message_id=raw["MessageId"],
            receipt_handle=raw["ReceiptHandle"],
            body=raw.get("Body", ""),
            attributes=attributes,
            receive_count=int(system.get("ApproximateReceiveCount", "1")),
            sent_at=int(system.get("SentTimestamp", "0")) / 1000,
            group_id=system.get("MessageGroupId"),
        )


@dataclass(frozen=True, slots=True)
class Ack:
    """Done: delete the message (``outcome``: completed or duplicate)."""

    outcome: str = "completed"


RETRIES_EXHAUSTED = "retries_exhausted"


@dataclass(frozen=True, slots=True)
class Retry:
    """Transient failure: make the message visible again after ``delay_seconds``.

    On the queue's last receive (``service/worker/redrive.py``) it is dead-lettered instead,
    as ``exhausted()``: ``reason`` becomes the detail, ``target`` names the (first) target
    that failed, and ``after_move`` records the request as ``failed``.
    """

    delay_seconds: float
    reason: str
    target: str = ""
    after_move: Callable[[], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )

    def exhausted(self) -> DeadLetter:
        """The dead letter this retry becomes when SQS would deliver the message no more."""
        return DeadLetter(
            RETRIES_EXHAUSTED,
            target=self.target,
            detail=self.reason[:256],
            after_move=self.after_move,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Permanent failure: move the message to the DLQ with the reason, then delete it.

    ``after_move`` runs once the DLQ copy exists and before the delete: it records the
    terminal state, which must not exist while the copy does not (a redelivery that read
    ``failed`` would drop the message as done). If it fails, the message is deleted anyway:
    the DLQ copy exists, and keeping the message would only dead-letter it twice.
    """

    reason: str
    target: str = ""
    detail: str = ""
    after_move: Callable[[], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )


@dataclass(frozen=True, slots=True)
class Release:
    """Give the message back at once (shutdown, or the rest of a FIFO group)."""


Outcome = Ack | Retry | DeadLetter | Release
Handler = Callable[[Message], Awaitable[Outcome]]
DeadLetterSink = Callable[[Message, DeadLetter], Awaitable[None]]


def backoff_seconds(
    receive_count: int, base: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff on the receive count, with jitter in [50%, 100%] of the step."""
    step = min(maximum, base * 2 ** max(0, receive_count - 1))
    return (rng or random).uniform(step / 2, step)
