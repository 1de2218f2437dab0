"""Batcher (coalescing single SQS operations into ``*Batch`` calls) and the Producer using it.

The Batcher is our code, so its unit tests drive it with a fake batch call; the Producer and
the API are tested against moto's SQS over HTTP, counting the requests courier really sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.aws import AwsClients
from service.batching import MAX_BATCH, BatchEntryError, Batcher
from service.bootstrap import Resources
from service.errors import MISCONFIGURED
from service.queue import Producer, SendError
from service.settings import Settings
from tests.chain import receive_all
from tests.test_api import VALID_BODY, Api, running_api


class FakeBatchCall:
    """Answers batch calls like SQS does, recording every request's entries."""

    def __init__(
        self,
        *,
        fail_bodies: Mapping[str, tuple[str, bool]] | None = None,
        raise_on_call: set[int] | None = None,
        omit_bodies: set[str] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self._fail = dict(fail_bodies or {})  # body -> (code, sender_fault)
        self._raise_on = raise_on_call or set()  # 0-based call numbers that raise
        self._omit = omit_bodies or set()
        self._delay = delay

    async def __call__(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        number = len(self.calls)
        self.calls.append(entries)
        if self._delay:
            await asyncio.sleep(self._delay)
        if number in self._raise_on:
            raise ConnectionError(f"call {number} failed")
        successful, failed = [], []
        for entry in entries:
            body = entry["MessageBody"]
            if body in self._omit:
                continue
            if body in self._fail:
                code, sender_fault = self._fail[body]
                failed.append(
                    {"Id": entry["Id"], "Code": code, "Message": "no", "SenderFault": sender_fault}
                )
            else:
                successful.append({"Id": entry["Id"], "MessageId": f"id-{body}"})
        return {"Successful": successful, "Failed": failed}

    @property
    def sizes(self) -> list[int]:
        return [len(entries) for entries in self.calls]


async def submit_all(batcher: Batcher, bodies: list[str]) -> list[Any]:
    return await asyncio.gather(
        *(batcher.submit({"MessageBody": body}) for body in bodies), return_exceptions=True
    )


# --- Batcher -----------------------------------------------------------------------------------


async def test_submits_within_the_linger_share_one_call() -> None:
    call = FakeBatchCall()
    results = await submit_all(Batcher("t", call, linger_seconds=0.01), ["a", "b", "c"])
    assert call.sizes == [3]
    assert [r["MessageId"] for r in results] == ["id-a", "id-b", "id-c"]
    assert [e["Id"] for e in call.calls[0]] == ["0", "1", "2"]


async def test_more_than_ten_submits_are_split_into_batches_of_ten() -> None:
    call = FakeBatchCall()
    bodies = [f"m{i}" for i in range(25)]
    results = await submit_all(Batcher("t", call, linger_seconds=0.01), bodies)
    assert call.sizes == [MAX_BATCH, MAX_BATCH, 5]
    assert [r["MessageId"] for r in results] == [f"id-{b}" for b in bodies]
    for entries in call.calls:  # Ids are unique within each request, as SQS requires
        assert [e["Id"] for e in entries] == [str(i) for i in range(len(entries))]


async def test_a_full_batch_is_sent_without_waiting_for_the_linger() -> None:
    call = FakeBatchCall()
    batcher = Batcher("t", call, linger_seconds=30)
    results = await asyncio.wait_for(submit_all(batcher, [f"m{i}" for i in range(10)]), 5)
    assert call.sizes == [10]
    assert len(results) == 10


async def test_partial_failure_fails_only_the_failed_entries() -> None:
    call = FakeBatchCall(
        fail_bodies={"bad": ("InvalidMessageContents", True), "busy": ("X", False)}
    )
    results = await submit_all(Batcher("t", call), ["ok1", "bad", "ok2", "busy"])
    assert call.sizes == [4]
    assert results[0]["MessageId"] == "id-ok1"
    assert results[2]["MessageId"] == "id-ok2"
    bad, busy = results[1], results[3]
    assert isinstance(bad, BatchEntryError)
    assert (bad.code, bad.sender_fault, str(bad)) == (
        "InvalidMessageContents",
        True,
        "InvalidMessageContents: no",
    )
    assert isinstance(busy, BatchEntryError)
    assert (busy.code, busy.sender_fault) == ("X", False)


async def test_whole_call_failure_fails_every_entry_of_that_call_only() -> None:
    call = FakeBatchCall(raise_on_call={0})
    results = await submit_all(Batcher("t", call), [f"m{i}" for i in range(13)])
    assert call.sizes == [10, 3]
    assert all(isinstance(r, ConnectionError) for r in results[:10])
    assert [r["MessageId"] for r in results[10:]] == ["id-m10", "id-m11", "id-m12"]


async def test_an_entry_missing_from_the_response_does_not_hang() -> None:
    call = FakeBatchCall(omit_bodies={"lost"})
    results = await asyncio.wait_for(submit_all(Batcher("t", call), ["ok", "lost"]), 5)
    assert results[0]["MessageId"] == "id-ok"
    assert isinstance(results[1], BatchEntryError)
    assert results[1].code == "Missing"


async def test_drain_flushes_pending_entries_at_once_and_waits_for_them() -> None:
    call = FakeBatchCall(delay=0.05)
    batcher = Batcher("t", call, linger_seconds=30)
    tasks = [asyncio.create_task(batcher.submit({"MessageBody": f"m{i}"})) for i in range(12)]
    await asyncio.sleep(0)  # every submit is pending; 10 of them already left as a full batch
    await asyncio.wait_for(batcher.drain(), 5)
    assert call.sizes == [10, 2]
    assert all(task.done() for task in tasks)
    assert [task.result()["MessageId"] for task in tasks] == [f"id-m{i}" for i in range(12)]
    await batcher.drain()  # nothing left: returns at once
    assert call.sizes == [10, 2]


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    call = FakeBatchCall(delay=0.5)
    batcher = Batcher("t", call, linger_seconds=0.01)
    first = asyncio.create_task(batcher.submit({"MessageBody": "a"}))
    second = asyncio.create_task(batcher.submit({"MessageBody": "b"}))
    async with asyncio.timeout(10):
        while not call.calls:  # until the batch is in flight (it takes 0.5 s to answer)
            await asyncio.sleep(0.001)
    first.cancel()
    assert (await second)["MessageId"] == "id-b"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert call.sizes == [2]


async def test_batches_in_flight_do_not_block_new_submits() -> None:
    call = FakeBatchCall(delay=0.05)
    batcher = Batcher("t", call, linger_seconds=0.001)
    first = asyncio.create_task(batcher.submit({"MessageBody": "a"}))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(batcher.submit({"MessageBody": "b"}))
    results = await asyncio.gather(first, second)
    assert [r["MessageId"] for r in results] == ["id-a", "id-b"]
    assert call.sizes == [1, 1]


# --- Producer against moto ---------------------------------------------------------------------


def aws_requests(service: str, operation: str) -> float:
    """courier's count of AWS requests sent (every attempt), from the Prometheus registry."""
    value = REGISTRY.get_sample_value(
        "courier_aws_requests_total", {"service": service, "operation": operation}
    )
    return value or 0.0


def sends() -> float:
    return aws_requests("sqs", "SendMessageBatch") + aws_requests("sqs", "SendMessage")


async def test_producer_coalesces_concurrent_sends(aws: AwsClients, fresh: Resources) -> None:
    producer = Producer(aws.sqs, fresh.queue_url, linger_seconds=0.01)
    before = sends()
    ids = await asyncio.gather(
        *(producer.send(f"body-{i}", {"request_id": f"r{i}", "empty": ""}) for i in range(25))
    )
    await producer.aclose()
    assert sends() - before == 3
    messages = await receive_all(aws, fresh.queue_url)
    assert sorted(m["MessageId"] for m in messages) == sorted(ids)
    assert sorted(m["Body"] for m in messages) == sorted(f"body-{i}" for i in range(25))
    assert all(set(m["MessageAttributes"]) == {"request_id"} for m in messages)


async def test_producer_fills_fifo_fields(aws: AwsClients, fresh: Resources) -> None:
    producer = Producer(aws.sqs, fresh.fifo_queue_url)
    assert producer.fifo
    await asyncio.gather(
        *(
            producer.send(
                f"b{i}", {"request_id": f"r{i}"}, group_id="jane", deduplication_id=f"r{i}"
            )
            for i in range(3)
        )
    )
    messages = await receive_all(aws, fresh.fifo_queue_url)
    assert [m["Body"] for m in messages] == ["b0", "b1", "b2"]  # one group keeps its order
    assert {m["Attributes"]["MessageGroupId"] for m in messages} == {"jane"}
    assert [m["Attributes"]["MessageDeduplicationId"] for m in messages] == ["r0", "r1", "r2"]


async def test_producer_without_batching_sends_one_by_one(
    aws: AwsClients, fresh: Resources
) -> None:
    producer = Producer(aws.sqs, fresh.queue_url, batching=False)
    before = aws_requests("sqs", "SendMessage")
    await asyncio.gather(*(producer.send(f"b{i}", {"op": "x"}) for i in range(3)))
    assert aws_requests("sqs", "SendMessage") - before == 3
    assert len(await receive_all(aws, fresh.queue_url)) == 3


async def test_a_refused_batch_fails_every_sender(aws: AwsClients, fresh: Resources) -> None:
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    producer = Producer(aws.sqs, missing)
    results = await asyncio.gather(
        *(producer.send(f"b{i}", {}) for i in range(4)), return_exceptions=True
    )
    # A missing queue is courier's deployment, not the message (service/errors.py): every
    # sender gets a SendError, which the API answers with 503 + Retry-After.
    assert all(isinstance(r, SendError) for r in results), results
    assert all(r.decision is MISCONFIGURED for r in results if isinstance(r, SendError))
    assert all("QueueDoesNotExist" in str(r) or "NonExistentQueue" in str(r) for r in results)


# --- the API end to end ------------------------------------------------------------------------


@pytest.fixture
async def api(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Api]:
    async with running_api(settings, fresh, aws) as running:
        yield running


async def test_concurrent_creates_share_send_message_batches(api: Api) -> None:
    before = sends()
    bodies = [{**VALID_BODY, "username": f"user.{i:02d}"} for i in range(50)]
    replies = await asyncio.gather(*(api.post(body) for body in bodies))
    assert [r.status for r in replies] == [202] * 50
    # Shared: fewer sends than requests. An idle machine sees about 5 full batches with the
    # default 2 ms linger; a loaded one spreads the requests out (18 sends were seen).
    sent = sends() - before
    assert 1 <= sent < len(bodies), sent
    messages = await api.drain_queue()
    assert sorted(m["MessageAttributes"]["request_id"]["StringValue"] for m in messages) == sorted(
        r.body["request_id"] for r in replies
    )
