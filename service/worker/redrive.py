"""The work queue's ``maxReceiveCount``: the receive after which SQS's redrive takes a message.

SQS moves a message to the DLQ on the receive after its ``maxReceiveCount``-th, without a
reason, and its status record stays ``processing`` for good: a client polling the request
never sees it end, and an operator finds ``(redrive)`` in the DLQ with nothing to say why.
So a message still failing on that last receive is dead-lettered by courier itself
(``Dispatcher``), as ``retries_exhausted`` with the last failure as its detail. The limit is
read from the queue's ``RedrivePolicy`` when the worker starts and every few minutes after,
so an operator's change is followed; until the first read succeeds, or with no redrive policy,
nothing changes and SQS's redrive stays the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from .outcomes import Message

log = logging.getLogger("courier.poller")

REFRESH_SECONDS = 300.0


class RedriveLimit:
    """``maxReceiveCount`` of one queue (None: unknown, or no redrive policy)."""

    def __init__(self, sqs: Any, queue_url: str, refresh_seconds: float = REFRESH_SECONDS) -> None:
        """``sqs``: a client with ``get_queue_attributes`` (aiobotocore's)."""
        self.max_receive_count: int | None = None
        self._sqs = sqs
        self._queue_url = queue_url
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None

    def is_last(self, message: Message) -> bool:
        """Whether SQS will dead-letter ``message`` instead of delivering it again."""
        limit = self.max_receive_count
        return limit is not None and message.receive_count >= limit

    async def refresh(self) -> None:
        """Read the policy; a failed read keeps what was known (logged)."""
        try:
            response = await self._sqs.get_queue_attributes(
                QueueUrl=self._queue_url, AttributeNames=["RedrivePolicy"]
            )
        except Exception as exc:
            log.warning(
                "could not read the work queue's redrive policy",
                extra={
                    "fields": {
                        "event": "redrive_policy_unread",
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                        "max_receive_count": self.max_receive_count,
                    }
                },
            )
            return
        limit = parse_max_receive_count(response.get("Attributes", {}).get("RedrivePolicy"))
        if limit != self.max_receive_count:
            log.info(
                "work queue redrive policy read",
                extra={"fields": {"event": "redrive_policy", "max_receive_count": limit}},
            )
        self.max_receive_count = limit

    def start(self) -> None:
        """Read now, then every ``refresh_seconds``, in a task of its own."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redrive-policy")

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_seconds)


def parse_max_receive_count(policy: str | None) -> int | None:
    """``maxReceiveCount`` of a ``RedrivePolicy`` attribute (a JSON string), or None."""
    if not policy:
        return None
    try:
        value = json.loads(policy).get("maxReceiveCount")
        limit = int(value)
    except (ValueError, TypeError, AttributeError):
        return None
    return limit if limit >= 1 else None
