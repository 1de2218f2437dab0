"""The strict layer in front of the emulators refuses what real AWS refuses, as AWS does.

Every request here is sent by a real aiobotocore client (SQS over its JSON protocol, as courier
sends it) to the session's moto through the strict WSGI layer (``moto_endpoint``), or through
bench/chaos's counting proxy (``courier_testkit.proxy``). Each test checks what botocore reports
(``ClientError`` code, HTTP status) and that the refusal came from the layer, not from moto.
"""

from __future__ import annotations

import base64
import contextlib
import os
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from courier_testkit.aws_limits import (
    DYNAMODB_MAX_ITEM_BYTES,
    SQS_MAX_MESSAGE_BYTES,
    check,
    decode_query,
    dynamodb_item_bytes,
    sqs_message_bytes,
)
from courier_testkit.proxy import Proxy
from courier_testkit.strict import ActionRecorder, AwsCall
from service.aws import AwsClients, open_client, open_clients
from service.bootstrap import Resources
from service.net import bound_port
from service.settings import AwsSettings


def attributes(count: int) -> dict[str, dict[str, str]]:
    return {f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(count)}


async def refused(call: Any, **params: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await call(**params)
    return caught.value


def assert_refused(
    error: ClientError, code: str, aws_calls: ActionRecorder, status: int = 400
) -> None:
    """botocore saw AWS's code and status, and the strict layer is what answered."""
    assert error.response["Error"]["Code"] == code, error.response
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert any(r.code == code for _, r in aws_calls.refusals()), aws_calls.refusals()


@pytest.fixture(autouse=True)
def _forget_calls(aws_calls: ActionRecorder) -> None:
    aws_calls.clear()


async def queue_depth(aws: AwsClients, url: str) -> int:
    found = await aws.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    return int(found["Attributes"]["ApproximateNumberOfMessages"])


# -- message attributes and size ----------------------------------------------------------------


async def test_eleven_message_attributes_are_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    await aws.sqs.send_message(
        QueueUrl=fresh.queue_url, MessageBody="x", MessageAttributes=attributes(10)
    )
    error = await refused(
        aws.sqs.send_message,
        QueueUrl=fresh.queue_url,
        MessageBody="x",
        MessageAttributes=attributes(11),
    )
    assert_refused(error, "InvalidParameterValue", aws_calls)
    assert "Number of message attributes [11]" in error.response["Error"]["Message"]
    assert await queue_depth(aws, fresh.queue_url) == 1


async def test_a_message_over_256_kib_counting_its_attributes_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    attribute = {"pad": {"DataType": "String", "StringValue": "0123456789"}}  # 3 + 6 + 10 bytes
    body = "x" * (SQS_MAX_MESSAGE_BYTES - 19)
    await aws.sqs.send_message(
        QueueUrl=fresh.queue_url, MessageBody=body, MessageAttributes=attribute
    )
    error = await refused(  # one byte more: moto counts the body only and would accept it
        aws.sqs.send_message,
        QueueUrl=fresh.queue_url,
        MessageBody=body + "x",
        MessageAttributes=attribute,
    )
    assert_refused(error, "InvalidParameterValue", aws_calls)
    assert "shorter than 262144 bytes" in error.response["Error"]["Message"]


# -- batches ------------------------------------------------------------------------------------

BATCH_CALLS = {
    "send_message_batch": lambda i: {"Id": str(i), "MessageBody": "x"},
    "delete_message_batch": lambda i: {"Id": str(i), "ReceiptHandle": "nope"},
    "change_message_visibility_batch": lambda i: {
        "Id": str(i),
        "ReceiptHandle": "nope",
        "VisibilityTimeout": 30,
    },
}


@pytest.mark.parametrize("method", sorted(BATCH_CALLS))
async def test_a_batch_of_eleven_entries_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder, method: str
) -> None:
    entries = [BATCH_CALLS[method](i) for i in range(11)]
    error = await refused(getattr(aws.sqs, method), QueueUrl=fresh.queue_url, Entries=entries)
    assert_refused(error, "AWS.SimpleQueueService.TooManyEntriesInBatchRequest", aws_calls)
    # botocore maps the modelled exception too, so ``except sqs.exceptions.X`` works.
    assert isinstance(error, aws.sqs.exceptions.TooManyEntriesInBatchRequest)


@pytest.mark.parametrize("method", sorted(BATCH_CALLS))
async def test_a_batch_with_repeated_ids_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder, method: str
) -> None:
    entries = [BATCH_CALLS[method](0), BATCH_CALLS[method](0)]
    error = await refused(getattr(aws.sqs, method), QueueUrl=fresh.queue_url, Entries=entries)
    assert_refused(error, "AWS.SimpleQueueService.BatchEntryIdsNotDistinct", aws_calls)
    assert isinstance(error, aws.sqs.exceptions.BatchEntryIdsNotDistinct)


@pytest.mark.parametrize("method", sorted(BATCH_CALLS))
async def test_an_empty_batch_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder, method: str
) -> None:
    error = await refused(getattr(aws.sqs, method), QueueUrl=fresh.queue_url, Entries=[])
    assert_refused(error, "AWS.SimpleQueueService.EmptyBatchRequest", aws_calls)


async def test_a_send_batch_over_256_kib_in_total_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    body = "x" * (SQS_MAX_MESSAGE_BYTES // 2 + 1)  # each alone is fine; together too long
    entries = [{"Id": "a", "MessageBody": body}, {"Id": "b", "MessageBody": body}]
    error = await refused(aws.sqs.send_message_batch, QueueUrl=fresh.queue_url, Entries=entries)
    assert_refused(error, "AWS.SimpleQueueService.BatchRequestTooLong", aws_calls)
    assert await queue_depth(aws, fresh.queue_url) == 0


async def test_a_batch_entry_with_eleven_attributes_fails_alone(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    """AWS fails such an entry in ``Failed`` (HTTP 200) and sends the others."""
    entries = [
        {"Id": "good", "MessageBody": "g", "MessageAttributes": attributes(10)},
        {"Id": "bad", "MessageBody": "b", "MessageAttributes": attributes(11)},
        {"Id": "late", "MessageBody": "l", "DelaySeconds": 901},
    ]
    answer = await aws.sqs.send_message_batch(QueueUrl=fresh.queue_url, Entries=entries)
    assert [s["Id"] for s in answer["Successful"]] == ["good"]
    failed = {f["Id"]: f for f in answer["Failed"]}
    assert set(failed) == {"bad", "late"}
    assert all(f["Code"] == "InvalidParameterValue" and f["SenderFault"] for f in failed.values())
    assert await queue_depth(aws, fresh.queue_url) == 1
    assert len(aws_calls.refusals()) == 1


# -- visibility timeout and delay ---------------------------------------------------------------


@pytest.mark.parametrize("timeout", [-1, 43_201])
async def test_a_visibility_timeout_outside_0_to_12_hours_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder, timeout: int
) -> None:
    await aws.sqs.send_message(QueueUrl=fresh.queue_url, MessageBody="x")
    error = await refused(
        aws.sqs.receive_message, QueueUrl=fresh.queue_url, VisibilityTimeout=timeout
    )
    assert_refused(error, "InvalidParameterValue", aws_calls)
    received = await aws.sqs.receive_message(QueueUrl=fresh.queue_url, VisibilityTimeout=43_200)
    handle = received["Messages"][0]["ReceiptHandle"]
    error = await refused(
        aws.sqs.change_message_visibility,
        QueueUrl=fresh.queue_url,
        ReceiptHandle=handle,
        VisibilityTimeout=timeout,
    )
    assert_refused(error, "InvalidParameterValue", aws_calls)
    answer = await aws.sqs.change_message_visibility_batch(
        QueueUrl=fresh.queue_url,
        Entries=[
            {"Id": "bad", "ReceiptHandle": handle, "VisibilityTimeout": timeout},
            {"Id": "good", "ReceiptHandle": handle, "VisibilityTimeout": 0},
        ],
    )
    assert [f["Id"] for f in answer["Failed"]] == ["bad"]
    assert answer["Failed"][0]["Code"] == "InvalidParameterValue"
    assert [s["Id"] for s in answer["Successful"]] == ["good"]


async def test_a_delay_over_900_seconds_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    await aws.sqs.send_message(QueueUrl=fresh.queue_url, MessageBody="x", DelaySeconds=900)
    error = await refused(
        aws.sqs.send_message, QueueUrl=fresh.queue_url, MessageBody="x", DelaySeconds=901
    )
    assert_refused(error, "InvalidParameterValue", aws_calls)


async def test_queue_attributes_out_of_range_are_refused(
    aws: AwsClients, aws_calls: ActionRecorder
) -> None:
    error = await refused(
        aws.sqs.create_queue,
        QueueName=f"limits-{os.getpid()}",
        Attributes={"VisibilityTimeout": "43201"},
    )
    assert_refused(error, "InvalidAttributeValue", aws_calls)


# -- DynamoDB -----------------------------------------------------------------------------------


def big_item(key: str, size: int) -> dict[str, Any]:
    """An item of ``size`` bytes as DynamoDB counts them."""
    item = {"pk": {"S": key}, "blob": {"S": ""}}
    item["blob"]["S"] = "x" * (size - dynamodb_item_bytes(item))
    assert dynamodb_item_bytes(item) == size
    return item


async def test_a_dynamodb_item_over_400_kb_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    table = fresh.status_table
    # moto itself stops at 405,000 bytes (its own estimate); AWS at 400 KiB.
    await aws.dynamodb.put_item(TableName=table, Item=big_item("fits", 400_000))
    error = await refused(
        aws.dynamodb.put_item, TableName=table, Item=big_item("big", DYNAMODB_MAX_ITEM_BYTES + 1)
    )
    assert_refused(error, "ValidationException", aws_calls)
    assert error.response["Error"]["Message"] == "Item size has exceeded the maximum allowed size"


async def test_a_dynamodb_update_writing_over_400_kb_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    error = await refused(
        aws.dynamodb.update_item,
        TableName=fresh.status_table,
        Key={"pk": {"S": "upd"}},
        UpdateExpression="SET #b = :b",
        ExpressionAttributeNames={"#b": "blob"},
        ExpressionAttributeValues={":b": {"S": "x" * DYNAMODB_MAX_ITEM_BYTES}},
    )
    assert_refused(error, "ValidationException", aws_calls)
    assert "exceeded the maximum allowed size" in error.response["Error"]["Message"]


async def test_a_dynamodb_batch_write_of_26_or_an_oversized_item_is_refused(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    table = fresh.status_table
    puts = [{"PutRequest": {"Item": {"pk": {"S": f"k{i}"}}}} for i in range(26)]
    error = await refused(aws.dynamodb.batch_write_item, RequestItems={table: puts})
    assert_refused(error, "ValidationException", aws_calls)
    oversized = [{"PutRequest": {"Item": big_item("b", DYNAMODB_MAX_ITEM_BYTES + 1)}}]
    error = await refused(aws.dynamodb.batch_write_item, RequestItems={table: oversized})
    assert error.response["Error"]["Message"] == "Item size has exceeded the maximum allowed size"


# -- the recorder -------------------------------------------------------------------------------


async def test_every_call_is_recorded_with_its_access_key_and_resource(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    # The key these clients sign with: the one in the environment when they were made, which
    # a test's monkeypatch may have changed since.
    keys: set[str] = set()

    def note_key(request: Any, **_: Any) -> None:
        authorization = request.headers["Authorization"]
        keys.add(str(authorization, "ascii").split("Credential=")[1].split("/")[0])

    for client in (aws.sqs, aws.dynamodb):
        client.meta.events.register("before-send", note_key)
    try:
        await aws.sqs.send_message(QueueUrl=fresh.queue_url, MessageBody="x")
        await aws.dynamodb.get_item(TableName=fresh.status_table, Key={"pk": {"S": "none"}})
    finally:
        for client in (aws.sqs, aws.dynamodb):
            client.meta.events.unregister("before-send", note_key)
    assert len(keys) == 1, f"the clients signed with {sorted(keys)}"
    key = keys.pop()
    assert {"sqs:SendMessage", "dynamodb:GetItem"} <= aws_calls.actions(key)
    assert AwsCall(key, "sqs", "SendMessage", (fresh.queue_url,)) in aws_calls.calls()
    assert AwsCall(key, "dynamodb", "GetItem", (fresh.status_table,)) in aws_calls.calls()
    assert aws_calls.actions("someone-else") == set()


# -- the SQS query protocol ---------------------------------------------------------------------


async def test_the_query_protocol_is_refused_in_xml(
    moto_endpoint: str, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    form = {"Action": "SendMessage", "QueueUrl": fresh.queue_url, "MessageBody": "x"}
    for i in range(11):
        form |= {
            f"MessageAttribute.{i + 1}.Name": f"a{i}",
            f"MessageAttribute.{i + 1}.Value.DataType": "String",
            f"MessageAttribute.{i + 1}.Value.StringValue": "v",
        }
    credential = "Credential=querykey/20260101/us-east-1/sqs/aws4_request"
    headers = {"Authorization": f"AWS4-HMAC-SHA256 {credential}, SignedHeaders=host, Signature=0"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(moto_endpoint + "/", data=form, headers=headers) as response,
    ):
        text = await response.text()
    assert response.status == 400
    assert "<Code>InvalidParameterValue</Code>" in text
    assert aws_calls.actions("querykey") == {"sqs:SendMessage"}


def test_query_forms_decode_to_the_json_shape() -> None:
    form = {
        "Action": "SendMessageBatch",
        "SendMessageBatchRequestEntry.1.Id": "a",
        "SendMessageBatchRequestEntry.1.MessageBody": "x",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Name": "n",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.DataType": "Binary",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.BinaryValue": base64.b64encode(
            b"abc"
        ).decode(),
        "SendMessageBatchRequestEntry.2.Id": "a",
        "SendMessageBatchRequestEntry.2.MessageBody": "y",
    }
    request = decode_query(form)
    assert request["Entries"][0]["MessageAttributes"]["n"]["DataType"] == "Binary"
    assert sqs_message_bytes(request["Entries"][0]) == 1 + 1 + 6 + 3
    refusal = check("sqs", "SendMessageBatch", request)
    assert refusal is not None
    assert refusal.code == "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"


# -- bench and chaos: the counting proxy --------------------------------------------------------


@contextlib.asynccontextmanager
async def strict_proxy(endpoint: str, *, lenient: bool = False) -> AsyncIterator[tuple[Proxy, str]]:
    """The counting proxy in this loop, in front of the session's moto, for SQS."""
    proxy = Proxy({"sqs": endpoint}, lenient=lenient)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        proxy.session = session
        with warnings.catch_warnings():
            # The proxy routes through a lambda, which aiohttp calls deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            application = proxy.application("sqs")
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = bound_port(site)
            yield proxy, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_the_bench_and_chaos_proxy_enforces_the_same_limits(
    aws_settings: AwsSettings, fresh: Resources
) -> None:
    async with (
        strict_proxy(aws_settings.endpoint_url) as (proxy, url),
        open_client("sqs", aws_settings, endpoint_url=url) as sqs,
    ):
        error = await refused(
            sqs.send_message,
            QueueUrl=fresh.queue_url,
            MessageBody="x",
            MessageAttributes=attributes(11),
        )
        assert error.response["Error"]["Code"] == "InvalidParameterValue"
        entries = [
            {"Id": "ok", "MessageBody": "x"},
            {"Id": "bad", "MessageBody": "y", "DelaySeconds": 901},
        ]
        answer = await sqs.send_message_batch(QueueUrl=fresh.queue_url, Entries=entries)
        assert [f["Id"] for f in answer["Failed"]] == ["bad"]
        assert [s["Id"] for s in answer["Successful"]] == ["ok"]
        async with aiohttp.ClientSession() as session, session.get(url + "/_proxy/stats") as reply:
            stats = await reply.json()
    key = os.environ["AWS_ACCESS_KEY_ID"]
    assert stats["_calls"]["by_access_key"][key] == {
        "sqs:SendMessage": 1,
        "sqs:SendMessageBatch": 1,
    }
    assert [r["code"] for r in stats["_calls"]["refused"]] == [
        "InvalidParameterValue",
        "InvalidParameterValue",
    ]
    assert proxy.counts["sqs"] == {"SendMessage": 1, "SendMessageBatch": 1}


async def test_the_proxy_forwards_everything_when_lenient(
    aws_settings: AwsSettings, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    """``--lenient``: the proxy records and forwards; here the session's strict moto refuses."""
    async with (
        strict_proxy(aws_settings.endpoint_url, lenient=True) as (proxy, url),
        open_client("sqs", aws_settings, endpoint_url=url) as sqs,
    ):
        error = await refused(
            sqs.send_message,
            QueueUrl=fresh.queue_url,
            MessageBody="x" * SQS_MAX_MESSAGE_BYTES,
            MessageAttributes=attributes(1),
        )
    assert error.response["Error"]["Code"] == "InvalidParameterValue"
    assert proxy.recorder.refusals() == []
    assert proxy.recorder.actions() == {"sqs:SendMessage"}
    assert [r.code for _, r in aws_calls.refusals()] == ["InvalidParameterValue"]


async def test_the_strict_layer_is_on_in_the_session_fixture(aws_settings: AwsSettings) -> None:
    """A new client on the session's endpoint meets the layer too (nothing to opt into)."""
    async with open_clients(aws_settings) as clients:
        error = await refused(
            clients.sqs.send_message_batch, QueueUrl="http://nowhere/1/q", Entries=[]
        )
    assert error.response["Error"]["Code"] == "AWS.SimpleQueueService.EmptyBatchRequest"
