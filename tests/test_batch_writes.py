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
    """Answers BatchWriteItem, leaving the first ``unprocessed`` attempts' items unprocessed."""

    def __init__(self) -> None:
        self.unprocessed = 0
        self.status = 200
        self.requests: list[list[dict[str, Any]]] = []
        self.items: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        writes = next(iter(payload["RequestItems"].values()))
        self.requests.append(writes)
        if self.status != 200:
            body = {
                "__type": "com.amazonaws.dynamodb.v20120810#ValidationException",
                "message": "no",
            }
            return web.json_response(body, status=self.status)
        if self.unprocessed > 0:
            self.unprocessed -= 1
            table = next(iter(payload["RequestItems"]))
            return web.json_response({"UnprocessedItems": {table: writes}})
        for write in writes:
            item = write["PutRequest"]["Item"]
            self.items[item["pk"]["S"]] = item
        return web.json_response({"UnprocessedItems": {}})


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
        assert len(stub.requests) == 1
        assert all(isinstance(r, StatusRefusedError) for r in results), results


async def test_two_writes_of_one_item_in_a_batch_become_one_put() -> None:
    # DynamoDB refuses a batch naming one key twice (two copies of a message finishing at once).
    async with flaky_store() as (stub, store):
        first = record("e" * 32, RequestState.COMPLETED)
        await asyncio.gather(store.complete(first), store.complete(first))
        assert [len(writes) for writes in stub.requests] == [1]
