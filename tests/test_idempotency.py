"""One Idempotency-Key, one IdM call, one queued message: races, replays and failed sends.

Real moto behind an in-process counting proxy (courier_testkit.proxy, the one the benchmarks use), so a
test can see every DynamoDB / SQS operation courier sends and make SQS fail and recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from courier_testkit.proxy import Proxy, listening
from service.api import openapi
from service.api.mailboxes import IDEMPOTENCY_NAMESPACE
from service.aws import AwsClients
from service.bootstrap import Resources
from service.operations import create_mailbox
from service.settings import AwsSettings, Settings
from service.status import RequestState, StatusRecord, StatusStore, now_iso
from tests.test_api import VALID_BODY, Api, Reply, assert_problem, running_api

RETRY_LATER = "a service courier depends on is unavailable; retry later"


def request_id_of(key: str, subject: str = "tester") -> str:
    """The request id courier derives from a caller and an Idempotency-Key."""
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{subject}\n{key}").hex


@pytest.fixture
async def api(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Api]:
    async with running_api(settings, fresh, aws) as running:
        yield running


def store_of(api: Api) -> StatusStore:
    return StatusStore(api.aws.dynamodb, api.resources.status_table, 1)


def request_id_in(reply: Reply) -> str:
    """The request id a 202 or a 409 in-progress answer names."""
    if reply.status == 202:
        return str(reply.body["request_id"])
    assert reply.status == 409, reply.body
    assert reply.body["type"] == "urn:courier:problem:request-in-progress", reply.body
    assert int(reply.headers["Retry-After"]) >= 1
    return reply.headers["Location"].removeprefix("/v1/requests/")


@contextlib.asynccontextmanager
async def proxied_api(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> AsyncIterator[tuple[Api, Proxy]]:
    endpoint = aws_settings.endpoint_url
    proxy = Proxy({"sqs": endpoint, "dynamodb": endpoint})
    async with listening(proxy) as urls:
        through_proxy = dataclasses.replace(
            aws_settings,
            sqs_endpoint_url=urls["sqs"],
            dynamodb_endpoint_url=urls["dynamodb"],
            read_timeout_seconds=5,
        )
        async with running_api(settings, fresh, aws, aws_settings=through_proxy) as api:
            yield api, proxy


async def test_concurrent_duplicates_call_the_idm_once_and_queue_once(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    async with proxied_api(settings, fresh, aws, aws_settings) as (api, proxy):
        api.idm.behaviour.latency_seconds = 0.3  # all eight arrive while the first is at the IdM
        headers = {"Idempotency-Key": "burst-1"}
        replies = await asyncio.gather(*(api.post(headers=headers) for _ in range(8)))
        assert {r.status for r in replies} <= {202, 409}, [r.body for r in replies]
        assert 202 in {r.status for r in replies}
        assert {request_id_in(r) for r in replies} == {request_id_of("burst-1")}
        assert len(api.idm.calls) == 1
        messages = await api.drain_queue()
        assert len(messages) == 1
        assert "attempt" not in messages[0]["MessageAttributes"]  # a first send has no attempt
        assert proxy.counts["dynamodb"]["DeleteItem"] == 0


async def test_replays_while_the_worker_is_paused_enqueue_nothing(api: Api) -> None:
    headers = {"Idempotency-Key": "paused-1"}
    first = await api.post(headers=headers)
    assert first.status == 202, first.body
    for _ in range(3):
        await asyncio.sleep(0.1)
        again = await api.post(headers=headers)
        assert again.status == 202
        assert again.body == {"request_id": first.body["request_id"], "status": "accepted"}
    assert len(api.idm.calls) == 1
    assert len(await api.drain_queue()) == 1


async def test_a_duplicate_of_a_request_in_progress_gets_409_with_retry_after(api: Api) -> None:
    # Another instance claimed the key a moment ago and is still calling the IdM.
    request_id = request_id_of("busy-1")
    await claim(store_of(api), request_id, lease_seconds=60)
    started = time.monotonic()
    reply = await api.post(headers={"Idempotency-Key": "busy-1"})
    assert time.monotonic() - started >= 0.5  # it waited for the other instance first
    assert_problem(
        reply,
        409,
        "request-in-progress",
        "Conflict",
        "a request with this Idempotency-Key is still in progress; retry after Retry-After seconds",
    )
    assert reply.headers["Retry-After"] == "1"
    assert reply.headers["Location"] == f"/v1/requests/{request_id}"
    assert api.idm.calls == []
    assert await api.queued() == []


async def test_a_crashed_claim_is_taken_over_after_its_lease(api: Api) -> None:
    request_id = request_id_of("crashed-1")
    await claim(store_of(api), request_id, lease_seconds=-1)  # its lease ran out
    reply = await api.post(headers={"Idempotency-Key": "crashed-1"})
    assert reply.status == 202, reply.body
    assert reply.body == {"request_id": request_id, "status": "accepted"}
    assert [call.idempotency_key for call in api.idm.calls] == [request_id]
    (message,) = await api.drain_queue()
    # The crashed claimer may have sent a copy: this one says it is a later attempt.
    assert message["MessageAttributes"]["attempt"]["StringValue"] == "2"
    record = await store_of(api).get(request_id)
    assert record is not None
    assert record.state is RequestState.ACCEPTED


async def claim(store: StatusStore, request_id: str, lease_seconds: int) -> None:
    """A pending record as another API instance leaves it while it calls the IdM."""
    record = StatusRecord(
        request_id=request_id,
        op=create_mailbox.NAME,
        state=RequestState.PENDING,
        created_at=now_iso(),
        updated_at=now_iso(),
        body_hash=body_hash(VALID_BODY),
        subject="tester",
        claim="another-instance",
        lease_until=int(time.time()) + lease_seconds,
    )
    assert await store.claim(record) is None


def body_hash(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def test_a_failed_send_is_marked_and_a_retry_resends_without_the_idm(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    async with proxied_api(settings, fresh, aws, aws_settings) as (api, proxy):
        headers = {"Idempotency-Key": "sqs-down-1"}
        proxy.behaviour["sqs"].down = True
        reply = await api.post(headers=headers)
        assert_problem(reply, 503, "service-unavailable", "Service Unavailable", RETRY_LATER)
        assert reply.headers["Retry-After"] == "2"
        request_id = request_id_of("sqs-down-1")
        record = await store_of(api).get(request_id)
        assert record is not None
        assert record.state is RequestState.SEND_FAILED
        assert record.identity_id == api.idm.identities["jane.doe"]
        assert proxy.counts["dynamodb"]["DeleteItem"] == 0

        proxy.behaviour["sqs"].down = False
        retried = await api.post(headers=headers)
        assert retried.status == 202, retried.body
        assert retried.body == {"request_id": request_id, "status": "accepted"}
        assert len(api.idm.calls) == 1  # the identity of the first attempt was reused
        (message,) = await api.drain_queue()
        assert message["MessageAttributes"]["request_id"]["StringValue"] == request_id
        assert message["MessageAttributes"]["attempt"]["StringValue"] == "2"
        record = await store_of(api).get(request_id)
        assert record is not None
        assert record.state is RequestState.ACCEPTED
        assert proxy.counts["dynamodb"]["DeleteItem"] == 0


async def test_a_failed_send_without_key_is_marked_not_deleted(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    async with proxied_api(settings, fresh, aws, aws_settings) as (api, proxy):
        proxy.behaviour["sqs"].down = True
        reply = await api.post()
        assert reply.status == 503, reply.body
        (item,) = await api.status_records()
        assert item["state"]["S"] == "send_failed"
        assert proxy.counts["dynamodb"]["DeleteItem"] == 0
        # The record is written (a share of a BatchWriteItem), then marked send_failed.
        assert proxy.counts["dynamodb"]["BatchWriteItem"] == 1
        assert proxy.counts["dynamodb"]["UpdateItem"] == 1


async def test_happy_path_dynamodb_calls(
    settings: Settings, fresh: Resources, aws: AwsClients, aws_settings: AwsSettings
) -> None:
    async with proxied_api(settings, fresh, aws, aws_settings) as (api, proxy):
        assert (await api.post({**VALID_BODY, "username": "warm.up"})).status == 202
        proxy.counts["dynamodb"].clear()  # secrets are loaded now: count courier's own calls
        assert (await api.post({**VALID_BODY, "username": "no.key"})).status == 202
        # No key: an unconditional write, shared with concurrent requests (none here).
        assert dict(proxy.counts["dynamodb"]) == {"BatchWriteItem": 1}
        proxy.counts["dynamodb"].clear()
        keyed = await api.post(headers={"Idempotency-Key": "cheap-1"})
        assert keyed.status == 202
        assert dict(proxy.counts["dynamodb"]) == {"PutItem": 1, "UpdateItem": 1}
        proxy.counts["dynamodb"].clear()
        assert (await api.post(headers={"Idempotency-Key": "cheap-1"})).status == 202
        assert dict(proxy.counts["dynamodb"]) == {"PutItem": 1}  # the failed claim shows the record


async def test_api_writes_never_overwrite_the_workers_state(api: Api) -> None:
    store = store_of(api)
    request_id = uuid.uuid4().hex
    await claim(store, request_id, lease_seconds=60)
    # The message went out and a worker finished it before the API wrote "accepted".
    await store.update(request_id, state=RequestState.COMPLETED, targets={"crm": "delivered"})
    current = await store.accept(request_id, "another-instance", "idm-1")
    assert current is not None
    assert current.state is RequestState.COMPLETED
    current = await store.mark_send_failed(request_id, "another-instance", "idm-1")
    assert current is not None
    assert current.state is RequestState.COMPLETED
    record = await store.get(request_id)
    assert record is not None
    assert record.state is RequestState.COMPLETED
    assert record.targets == {"crm": "delivered"}


# --- who may read a status record ---------------------------------------------------------------


async def test_an_ownerless_record_is_visible_to_admins_only(api: Api) -> None:
    request_id = uuid.uuid4().hex
    # What a worker leaves when it has to recreate a record the API never wrote.
    await store_of(api).update(request_id, state=RequestState.COMPLETED, op=create_mailbox.NAME)
    reader = await api.call(
        "GET", f"/v1/requests/{request_id}", authorization=f"Bearer {api.token('mailbox:read')}"
    )
    assert_problem(
        reader, 404, "request-not-found", "Not Found", f"no request with id {request_id!r}"
    )
    admin = api.token("mailbox:read mailbox:admin", sub="operator")
    shown = await api.call("GET", f"/v1/requests/{request_id}", authorization=f"Bearer {admin}")
    assert shown.status == 200, shown.body
    assert shown.body["status"] == "completed"


async def test_a_token_with_an_empty_subject_is_401(api: Api) -> None:
    for subject in ("", "   "):
        token = api.token(sub=subject)
        for reply in (
            await api.post(token=token),
            await api.call(
                "GET", f"/v1/requests/{uuid.uuid4().hex}", authorization=f"Bearer {token}"
            ),
        ):
            assert_problem(
                reply, 401, "invalid-token", "Unauthorized", "the token's 'sub' claim is empty"
            )
            assert (
                reply.headers["WWW-Authenticate"] == 'Bearer realm="courier", error="invalid_token"'
            )
    assert api.idm.calls == []
    await api.assert_nothing_accepted()


async def test_a_waiter_replays_the_owners_answer(api: Api) -> None:
    # The owner's IdM call takes a while; the duplicate arrives meanwhile and gets the 202.
    api.idm.behaviour.latency_seconds = 0.3
    headers = {"Idempotency-Key": "waiter-1"}
    owner = asyncio.create_task(api.post(headers=headers))
    while not api.idm.calls:
        await asyncio.sleep(0.01)
    duplicate = await api.post(headers=headers)
    first = await owner
    assert first.status == duplicate.status == 202
    assert duplicate.body == first.body
    assert len(api.idm.calls) == 1
    assert len(await api.drain_queue()) == 1


def test_the_document_describes_the_new_answers() -> None:
    document = openapi.document()
    conflict = document["components"]["responses"]["Conflict"]
    assert {"Retry-After", "Location"} <= set(conflict["headers"])
    create = document["paths"]["/v1/mailboxes"]["post"]["responses"]
    assert create["409"] == {"$ref": "#/components/responses/Conflict"}
    states = document["components"]["schemas"]["RequestStatus"]["properties"]["status"]["enum"]
    assert {state.value for state in RequestState} == set(states)


async def test_a_retry_after_an_idm_failure_is_a_fresh_attempt_not_a_409(api: Api) -> None:
    headers = {"Idempotency-Key": "idm-down-1"}
    api.idm.behaviour.down = True
    failed = await api.post(headers=headers)
    assert failed.status == 502, failed.body
    record = await store_of(api).get(request_id_of("idm-down-1"))
    assert record is not None
    assert record.state is RequestState.SEND_FAILED  # the claim is released at once
    api.idm.behaviour.down = False
    retried = await api.post(headers=headers)
    assert retried.status == 202, retried.body
    assert retried.body == {"request_id": request_id_of("idm-down-1"), "status": "accepted"}
    assert len(await api.drain_queue()) == 1
