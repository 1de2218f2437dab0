"""The messages every consumer processes: sealed once, loaded into a fresh queue per run.

Events are create-mailbox events sealed the way courier's API seals them (one KMS data key,
AES-256-GCM), with the ``op``, ``request_id`` and ``traceparent`` attributes the API sets.
Peers that do not decrypt get the same bodies and simply forward them.

Times are on ``time.monotonic()`` (CLOCK_MONOTONIC, system-wide on Linux), so a send time
recorded here compares with an arrival time recorded by the stub process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from courier_testkit.aws import plain_client
from courier_testkit.events import Event, send_batch, send_events
from courier_testkit.events import seal_events as seal
from service.envelope import EnvelopeCipher
from service.settings import AwsSettings, EnvelopeSettings

PACE_TICK_SECONDS = 0.01


def mailbox(index: int) -> dict[str, Any]:
    return {
        "username": f"bench{index:07d}",
        "display_name": f"Bench User {index}",
        "plan": "standard",
        "contact_email": f"bench{index}@example.com",
    }


async def seal_events(aws: AwsSettings, key_arn: str, count: int, tag: str) -> list[Event]:
    """``count`` events sealed under fresh data keys (KMS once per 10,000, courier's default)."""
    async with plain_client("kms", aws) as kms:
        cipher = EnvelopeCipher(kms, EnvelopeSettings(kms_key_id=key_arn))
        return await seal(cipher, count, mailbox, tag=tag, subject="bench")


async def load(aws: AwsSettings, queue_url: str, batch: Sequence[Event]) -> float:
    """Put ``batch`` on the queue (SendMessageBatch in tens, 16 at a time); returns seconds."""
    started = time.perf_counter()
    async with plain_client("sqs", aws) as sqs:
        await send_events(sqs, queue_url, batch)
    return time.perf_counter() - started


async def paced(
    aws: AwsSettings, queue_url: str, events: Sequence[Event], rate: float, duration: float
) -> dict[str, float]:
    """Send at ``rate`` messages/s for ``duration`` s (open loop); request id -> send time.

    Every 10 ms the messages due by then go out in SendMessageBatch requests of up to 10,
    without waiting for earlier requests, so a slow answer does not slow the offered rate.
    The send time is taken just before the request.
    """
    wanted = min(len(events), max(1, round(rate * duration)))
    sent: dict[str, float] = {}
    tasks: set[asyncio.Task[None]] = set()
    async with plain_client("sqs", aws) as sqs:

        async def send(batch: Sequence[Event]) -> None:
            at = time.monotonic()
            for event in batch:
                sent[event.request_id] = at
            await send_batch(sqs, queue_url, batch)

        start = time.monotonic()
        position = 0
        while position < wanted:
            due = min(wanted, int((time.monotonic() - start) * rate) + 1)
            while position < due:
                batch = events[position : min(due, position + 10)]
                position += len(batch)
                task = asyncio.create_task(send(batch))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(PACE_TICK_SECONDS)
        await asyncio.gather(*tasks)
    return sent


async def depth(aws: AwsSettings, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    async with plain_client("sqs", aws) as sqs:
        response = await sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    attributes = response["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


async def purge(aws: AwsSettings, queue_url: str) -> None:
    """Drop the visible messages (what a consumer has in flight stays, and finishes)."""
    async with plain_client("sqs", aws) as sqs:
        await sqs.purge_queue(QueueUrl=queue_url)
