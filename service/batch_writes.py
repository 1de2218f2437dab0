"""Coalesce whole-item puts into DynamoDB's BatchWriteItem (up to 25 puts per request).

The status table takes one write per finished message and one per unkeyed API request. Each
was its own PutItem / UpdateItem; ``PutBatcher.put`` takes one item and resolves when the
BatchWriteItem it rode in has written it, so concurrent writers share requests while each
still waits for its own item to be durable (the worker acknowledges a message only then).

BatchWriteItem has no conditions, so only writes that need none go this way: a worker's
``completed`` record (final, and equal whichever copy writes it) and an unkeyed request's first
record (its id is random). Two puts of one key in one batch are one put (DynamoDB refuses a
batch naming a key twice): the later item is written and both callers learn it was. That is
right only because every writer of a key writes the same record, but for ``updated_at``;
anything else must not go through here.

Items DynamoDB leaves unprocessed (throttling) are sent again with backoff; their callers
wait, the others are answered as soon as their item is written. An item still unwritten after
``max_attempts`` fails its caller (``UnprocessedError``). When DynamoDB refuses a whole batch
(e.g. a ValidationException), its items are sent again one by one, so one bad item fails only
its own caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

from .batching import Coalescer
from .errors import is_retryable

MAX_BATCH = 25  # BatchWriteItem's limit on puts and deletes per request

Item = dict[str, Any]


class UnprocessedError(Exception):
    """DynamoDB kept leaving the item unprocessed (throttled): try again later."""


Waiting = dict[str, tuple[Item, list[asyncio.Future[None]]]]


class PutBatcher(Coalescer[Waiting]):
    """Groups puts to ``table`` submitted within ``linger_seconds`` into BatchWriteItem calls."""

    def __init__(
        self,
        dynamodb: Any,
        table: str,
        key: str,
        linger_seconds: float = 0.002,
        max_attempts: int = 4,
    ) -> None:
        super().__init__("status-write", linger_seconds, MAX_BATCH)
        self._dynamodb = dynamodb
        self._table = table
        self._key = key
        self._max_attempts = max_attempts
        # Keyed by the item's key: two puts of one item in one batch are refused by DynamoDB,
        # so the later one replaces the earlier and both callers wait for the one write.
        self._pending: Waiting = {}

    async def put(self, item: Mapping[str, Any]) -> None:
        """Write ``item`` (DynamoDB wire format) in the next batch; raises if it was not written."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = repr(item[self._key])
        _, waiting = self._pending.get(key, (None, []))
        self._pending[key] = (dict(item), [*waiting, future])
        self._added()
        await future

    def _waiting(self) -> int:
        return len(self._pending)

    def _take(self, count: int) -> Waiting:
        return {key: self._pending.pop(key) for key in list(self._pending)[:count]}

    async def _send(self, batch: Waiting) -> None:
        try:
            await self._write_all(batch)
        except asyncio.CancelledError:
            _settle(batch, asyncio.CancelledError())
            raise
        except Exception as exc:  # the request failed: every item not yet answered fails with it
            if len(batch) > 1 and not is_retryable(exc):
                await self._one_by_one(batch)
            _settle(batch, exc)
        finally:  # whatever happened, nobody is left waiting
            _settle(batch, UnprocessedError("the batch ended without an answer for the item"))

    async def _write_all(self, batch: Waiting) -> None:
        remaining = {key: item for key, (item, _) in batch.items()}
        for attempt in range(self._max_attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
            unprocessed = await self._write(remaining)
            _settle({k: batch[k] for k in remaining if k not in unprocessed}, None)
            remaining = {k: remaining[k] for k in unprocessed if k in remaining}
            if not remaining:
                return
        _settle(
            {key: batch[key] for key in remaining},
            UnprocessedError(f"BatchWriteItem left the item unprocessed {self._max_attempts}x"),
        )

    async def _one_by_one(self, batch: Waiting) -> None:
        """After a refused batch: each item alone, so the refusal reaches only its own caller."""
        for key, entry in batch.items():
            try:
                await self._write_all({key: entry})
            except Exception as exc:
                _settle({key: entry}, exc)

    async def _write(self, items: dict[str, Item]) -> set[str]:
        """One BatchWriteItem; the keys of the items DynamoDB left unprocessed."""
        response = await self._dynamodb.batch_write_item(
            RequestItems={self._table: [{"PutRequest": {"Item": item}} for item in items.values()]}
        )
        unprocessed = response.get("UnprocessedItems", {}).get(self._table, [])
        return {repr(r["PutRequest"]["Item"][self._key]) for r in unprocessed}


def _settle(
    batch: Mapping[str, tuple[Item, list[asyncio.Future[None]]]], error: BaseException | None
) -> None:
    """Resolve every caller in ``batch`` not yet resolved: with ``error``, or as written."""
    for _, futures in batch.values():
        for future in futures:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
