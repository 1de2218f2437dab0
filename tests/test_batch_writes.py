"""The status table's batched writes: what shares a BatchWriteItem, and what a caller learns.

Against moto for the real API (items written, requests counted), and against a small aiohttp
stand-in for what moto never does: leave items unprocessed (throttling) or fail the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from courier_testkit.ports import serving
from service.bootstrap import Resources
from service.dynamo import DynamoDB, open_dynamodb
from service.settings import AwsSettings
from service.status import (
    RequestState,
    StatusRecord,
    StatusRefusedError,
    StatusStore,
    StatusUnavailableError,
    carried_fields,
    completed_record,
    now_iso,
)


def batch_writes() -> float:
    return (
        REGISTRY.get_sample_value(
            "courier_aws_requests_total", {"service": "dynamodb", "operation": "BatchWriteItem"}
        )
        or 0.0
    )


def record(request_id: str, state: RequestState = RequestState.ACCEPTED) -> StatusRecord:
    return StatusRecord(
        request_id=request_id,
        op="create-mailbox",
        state=state,
        created_at=now_iso(),
        updated_at=now_iso(),
        body_hash="b" * 64,
        subject="client-1",
        identity_id=f"idm-{request_id[:6]}",
    )


@pytest.fixture
async def dynamodb(aws_settings: AwsSettings) -> AsyncIterator[DynamoDB]:
    async with open_dynamodb(aws_settings) as client:
        yield client


async def test_concurrent_completions_share_batches_of_25(
    dynamodb: DynamoDB, fresh: Resources
) -> None:
    store = StatusStore(dynamodb, fresh.status_table, 1, linger_seconds=0.05)
    ids = [uuid.uuid4().hex for _ in range(30)]
    before = batch_writes()
    finals = [
        completed_record(i, "create-mailbox", {"crm": "delivered"}, carried_fields(record(i)))
        for i in ids
    ]
    await asyncio.gather(*(store.complete(final) for final in finals if final is not None))
    assert batch_writes() - before == 2  # 25 + 5
    for request_id in ids:
        stored = await store.get(request_id)
        assert stored is not None
        assert stored.state is RequestState.COMPLETED
        assert stored.targets == {"crm": "delivered"}
        assert stored.subject == "client-1"
        assert stored.body_hash == "b" * 64


async def test_a_completion_keeps_what_the_api_wrote(dynamodb: DynamoDB, fresh: Resources) -> None:
    store = StatusStore(dynamodb, fresh.status_table, 1)
    request_id = uuid.uuid4().hex
    written = record(request_id)
    await store.create(written)
    final = completed_record(request_id, written.op, {"crm": "delivered"}, carried_fields(written))
    assert final is not None
    await store.complete(final)
    stored = await store.get(request_id)
    assert stored is not None
    assert (stored.state, stored.created_at, stored.identity_id, stored.body_hash) == (
        RequestState.COMPLETED,
        written.created_at,
        written.identity_id,
        written.body_hash,
    )


@pytest.mark.parametrize(
    "carried",
    [
        None,
        "not a mapping",
        {"created_at": "x"},
        {**dict.fromkeys(("created_at", "body_hash", "subject"), ""), "identity_id": 7},
    ],
)
def test_an_event_without_the_fields_gets_no_whole_record(carried: Any) -> None:
    # Such an event (sealed before the API carried them) completes field by field instead.
    assert completed_record("r", "create-mailbox", {}, carried) is None


# --- what moto never does: a stand-in DynamoDB -----------------------------------------------


class FlakyDynamo:
    """Answers BatchWriteItem; can leave items unprocessed, refuse, or answer slowly."""

    def __init__(self) -> None:
        self.unprocessed = 0  # how many answers leave items unprocessed
        self.only_unprocessed: set[str] = set()  # when set, only these keys are left over
        self.status = 200
        self.refused: set[str] = set()  # keys whose presence makes DynamoDB refuse the batch
        self.delay = 0.0
        self.requests: list[list[dict[str, Any]]] = []
        self.items: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        (table, writes), *_ = payload["RequestItems"].items()
        self.requests.append(writes)
        await asyncio.sleep(self.delay)
        keys = {write["PutRequest"]["Item"]["pk"]["S"] for write in writes}
        if self.status != 200 or keys & self.refused:
            body = {
                "__type": "com.amazonaws.dynamodb.v20120810#ValidationException",
                "message": "no",
            }
            return web.json_response(body, status=400)
        left: list[dict[str, Any]] = []
        if self.unprocessed > 0:
            self.unprocessed -= 1
            left = [w for w in writes if self._left_over(w["PutRequest"]["Item"]["pk"]["S"])]
        for write in writes:
            if write not in left:
                item = write["PutRequest"]["Item"]
                self.items[item["pk"]["S"]] = item
        return web.json_response({"UnprocessedItems": {table: left} if left else {}})

    def _left_over(self, key: str) -> bool:
        return not self.only_unprocessed or key in self.only_unprocessed


@contextlib.asynccontextmanager
async def flaky_store() -> AsyncIterator[tuple[FlakyDynamo, StatusStore]]:
    stub = FlakyDynamo()
    app = web.Application()
    app.router.add_post("/", stub.handle)
    async with serving(app) as url:
        settings = AwsSettings(endpoint_url=url)
        async with open_dynamodb(settings) as client:
            yield stub, StatusStore(client, "status", 1)


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


async def test_unprocessed_items_are_sent_again_until_written() -> None:
    async with flaky_store() as (stub, store):
        stub.unprocessed = 2
        await store.create(record("a" * 32))
        assert len(stub.requests) == 3
        assert "req#" + "a" * 32 in stub.items


async def test_items_left_unprocessed_every_time_fail_their_callers_as_unavailable() -> None:
    async with flaky_store() as (stub, store):
        stub.unprocessed = 100
        with pytest.raises(StatusUnavailableError, match="unprocessed"):
            await store.create(record("b" * 32))
        assert len(stub.requests) == 4  # max_attempts
        assert not stub.items


async def test_a_refused_batch_fails_every_caller_in_it() -> None:
    async with flaky_store() as (stub, store):
        stub.status = 400
        results = await asyncio.gather(
            store.create(record("c" * 32)), store.create(record("d" * 32)), return_exceptions=True
        )
        assert [len(writes) for writes in stub.requests] == [2, 1, 1]  # then each alone
        assert all(isinstance(r, StatusRefusedError) for r in results), results


async def test_one_refused_item_fails_only_its_own_caller() -> None:
    async with flaky_store() as (stub, store):
        stub.refused = {"req#" + "f" * 32}
        results = await asyncio.gather(
            store.create(record("f" * 32)), store.create(record("0" * 32)), return_exceptions=True
        )
        assert isinstance(results[0], StatusRefusedError), results
        assert results[1] is None
        assert set(stub.items) == {"req#" + "0" * 32}


async def test_written_items_are_answered_while_the_unprocessed_are_retried() -> None:
    async with flaky_store() as (stub, store):
        stub.unprocessed, stub.only_unprocessed = 2, {"req#" + "1" * 32}
        slow = asyncio.create_task(store.create(record("1" * 32)))
        fast = asyncio.create_task(store.create(record("2" * 32)))
        await asyncio.wait_for(fast, 5)
        assert not slow.done()  # still being retried
        await asyncio.wait_for(slow, 5)
        assert [len(writes) for writes in stub.requests] == [2, 1, 1]
        assert {"req#" + "1" * 32, "req#" + "2" * 32} <= set(stub.items)


async def test_a_stalled_dynamodb_fails_the_callers_as_unavailable() -> None:
    async with flaky_store() as (stub, store):
        stub.delay = 10  # longer than the DynamoDB read timeout (3 s)
        with pytest.raises(StatusUnavailableError):
            await asyncio.wait_for(store.create(record("3" * 32)), 8)


async def test_drain_finishes_writes_whose_callers_went_away() -> None:
    async with flaky_store() as (stub, store):
        stub.delay = 0.2
        caller = asyncio.create_task(store.create(record("4" * 32)))
        await asyncio.sleep(0.05)  # the batch is in flight
        caller.cancel()
        await store.drain()
        assert "req#" + "4" * 32 in stub.items


async def test_two_writes_of_one_item_in_a_batch_become_one_put() -> None:
    # DynamoDB refuses a batch naming one key twice (two copies of a message finishing at once).
    async with flaky_store() as (stub, store):
        first = record("e" * 32, RequestState.COMPLETED)
        await asyncio.gather(store.complete(first), store.complete(first))
        assert [len(writes) for writes in stub.requests] == [1]
