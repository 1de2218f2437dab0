"""Coalesce single SQS operations into the ``*Batch`` APIs (up to 10 entries per request).

SendMessageBatch, DeleteMessageBatch and ChangeMessageVisibilityBatch share one shape:
``Entries`` with an ``Id`` each in, ``Successful`` / ``Failed`` lists keyed by ``Id`` out.
``Batcher.submit`` takes one entry and resolves when the batch it rode in is answered, so
concurrent callers share requests while each learns its own outcome: only the entries SQS
rejected fail. ``Coalescer`` is the lingering and batching both this and DynamoDB's
BatchWriteItem (``service/batch_writes.py``) share.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from . import metrics

MAX_BATCH = 10
BatchT = TypeVar("BatchT")

BatchCall = Callable[[list[dict[str, Any]]], Awaitable[Mapping[str, Any]]]


class BatchEntryError(Exception):
    """SQS refused one entry of a batch (``code``; ``sender_fault`` means the entry is bad)."""

    def __init__(self, code: str, message: str, sender_fault: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.sender_fault = sender_fault


class Coalescer(abc.ABC, Generic[BatchT]):
    """Lingers up to ``linger_seconds`` after a first entry, or until ``max_batch`` are waiting,
    then sends what waits as batches, each in a task of its own.

    The scheduling shared by SQS's ``*Batch`` calls (``Batcher``) and DynamoDB's
    BatchWriteItem (``service/batch_writes.PutBatcher``); subclasses keep the waiting entries
    and say how a batch is taken and sent.
    """

    def __init__(self, name: str, linger_seconds: float, max_batch: int) -> None:
        self._name = name
        self._linger = linger_seconds
        self._max_batch = max_batch
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Send everything pending and wait for every batch in flight (for shutdown)."""
        while self._waiting() or self._in_flight:
            self._flush_now()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _added(self) -> None:
        """An entry was added: send now if a batch is full, else make sure a flush is timed."""
        if self._waiting() >= self._max_batch:
            self._flush_now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush_now)

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting():
            task = asyncio.create_task(
                self._send(self._take(self._max_batch)), name=f"{self._name}-batch"
            )
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    @abc.abstractmethod
    def _waiting(self) -> int:
        """How many entries wait for a batch."""

    @abc.abstractmethod
    def _take(self, count: int) -> BatchT:
        """Remove and return up to ``count`` waiting entries, oldest first."""

    @abc.abstractmethod
    async def _send(self, batch: BatchT) -> None:
        """Send ``batch`` and answer its callers, whatever happens."""


Pending = list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]


class Batcher(Coalescer[Pending]):
    """Groups entries submitted within ``linger_seconds`` into batches of at most 10."""

    def __init__(self, name: str, call: BatchCall, linger_seconds: float = 0.002) -> None:
        super().__init__(name, linger_seconds, MAX_BATCH)
        self._call = call
        self._pending: Pending = []
        self._sizes = metrics.sqs_batch_size.labels(name)

    async def submit(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``entry`` (without ``Id``) in the next batch; returns its ``Successful`` item."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((dict(entry), future))
        self._added()
        return await future

    def _waiting(self) -> int:
        return len(self._pending)

    def _take(self, count: int) -> Pending:
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def _send(self, batch: Pending) -> None:
        entries = [{**entry, "Id": str(index)} for index, (entry, _) in enumerate(batch)]
        self._sizes.observe(len(entries))
        try:
            response = await self._call(entries)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the whole request failed: every caller in it gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        _resolve(batch, response)


def _resolve(batch: Pending, response: Mapping[str, Any]) -> None:
    for item in response.get("Successful", []):
        future = batch[int(item["Id"])][1]
        if not future.done():
            future.set_result(item)
    for item in response.get("Failed", []):
        future = batch[int(item["Id"])][1]
        if not future.done():
            error = BatchEntryError(
                item.get("Code", "Unknown"), item.get("Message", ""), bool(item.get("SenderFault"))
            )
            future.set_exception(error)
    for _, future in batch:  # an entry SQS did not mention at all must not hang its caller
        if not future.done():
            future.set_exception(
                BatchEntryError("Missing", "entry absent from the batch response", False)
            )
