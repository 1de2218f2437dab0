"""Create-mailbox events sealed as courier's API seals them, and put on a queue as it puts them.

For the runs that load a queue directly (bench's drains, the volume test): the same envelope
(``EnvelopeCipher.seal``) and the same attributes (``op``, ``request_id``, ``traceparent``) the
API sends, so what the worker receives cannot be told apart from a request's message.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.envelope import EnvelopeCipher
from service.operations import create_mailbox
from service.status import RequestState, StatusRecord, carried_fields, now_iso

SEND_CONCURRENCY = 16  # SendMessageBatch requests in flight while loading a queue


@dataclass(frozen=True, slots=True)
class Event:
    """One sealed message: its request id and SQS body."""

    request_id: str
    body: str


async def seal_events(
    cipher: EnvelopeCipher,
    count: int,
    payload: Callable[[int], dict[str, Any]],
    *,
    tag: str,
    subject: str,
) -> list[Event]:
    """``count`` create-mailbox events for ``payload(index)``, each with its own request id;
    the identity ids are ``idm-<tag>-<index in hex>`` and the token subject ``subject``."""
    requested_at = now_iso()
    events = []
    for index in range(count):
        request_id = uuid.uuid4().hex
        identity_id = f"idm-{tag}-{index:x}"
        event = create_mailbox.event(payload(index), identity_id, subject, requested_at)
        # What the API carries for the worker's final write, built as the API builds it.
        event["record"] = carried_fields(
            StatusRecord(
                request_id=request_id,
                op=create_mailbox.NAME,
                state=RequestState.ACCEPTED,
                created_at=requested_at,
                updated_at=requested_at,
                subject=subject,
                identity_id=identity_id,
            )
        )
        events.append(Event(request_id, await cipher.seal(create_mailbox.NAME, request_id, event)))
    return events


def work_entry(position: int, event: Event) -> dict[str, Any]:
    """The SendMessageBatch entry the API would send for ``event``."""
    attributes = {
        "op": create_mailbox.NAME,
        "request_id": event.request_id,
        "traceparent": f"00-{event.request_id}-{event.request_id[:16]}-01",
    }
    return {
        "Id": str(position),
        "MessageBody": event.body,
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
        },
    }


async def send_batch(sqs: Any, queue_url: str, batch: Sequence[Event]) -> None:
    """One SendMessageBatch of up to 10 events; raises when SQS refused any entry."""
    entries = [work_entry(position, event) for position, event in enumerate(batch)]
    response = await sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    if response.get("Failed"):
        raise RuntimeError(f"SendMessageBatch refused entries: {response['Failed'][:3]}")


async def send_events(
    sqs: Any, queue_url: str, events: Sequence[Event], concurrency: int = SEND_CONCURRENCY
) -> None:
    """Put ``events`` on the queue: SendMessageBatch in tens, ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def send(batch: Sequence[Event]) -> None:
        async with limit:
            await send_batch(sqs, queue_url, batch)

    await asyncio.gather(*(send(events[i : i + 10]) for i in range(0, len(events), 10)))
