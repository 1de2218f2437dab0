"""Batch partial failures from a real server: moto behind the strict AWS layer.

SQS answers a batch with one bad entry with HTTP 200, the bad entry in ``Failed``
(``SenderFault``) and the others done. Here the server produces those answers: the strict layer
(``courier_testkit``) fails an entry AWS would refuse (11 attributes, a visibility timeout over
12 h) and moto itself fails a receipt handle it never issued. Each test checks that only the
bad entry's caller fails, and how, and that the others' work is really done on the queue.

An entry missing from a batch answer is not something SQS, moto or the strict layer produce;
``tests/test_batching.py`` covers it with a fake batch call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from courier_testkit.strict import ActionRecorder
from service.aws import AwsClients
from service.batching import BatchEntryError, Batcher
from service.bootstrap import Resources
from service.errors import PermanentError
from service.queue import Producer
from tests.chain import receive_all
from tests.test_batching import aws_requests

ELEVEN = {f"a{i:02d}": "v" for i in range(11)}


async def test_an_invalid_message_fails_alone_and_permanently(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    producer = Producer(aws.sqs, fresh.queue_url, linger_seconds=0.2)
    before = aws_requests("sqs", "SendMessageBatch")
    aws_calls.clear()
    bodies = ["ok-0", "ok-1", "too-many-attributes", "ok-2", "ok-3"]
    results = await asyncio.gather(
        *(
            producer.send(body, ELEVEN if body == "too-many-attributes" else {"request_id": body})
            for body in bodies
        ),
        return_exceptions=True,
    )
    await producer.aclose()
    assert aws_requests("sqs", "SendMessageBatch") - before == 1  # all five in one request
    refused = results[2]
    assert isinstance(refused, PermanentError), results
    assert "InvalidParameterValue" in str(refused)
    assert "Number of message attributes [11]" in str(refused)
    assert isinstance(refused.__cause__, BatchEntryError)
    assert refused.__cause__.sender_fault
    # The server, not courier, refused it: in the strict layer's record.
    assert [r.code for call, r in aws_calls.refusals() if call.operation == "SendMessageBatch"] == [
        "InvalidParameterValue"
    ]
    accepted = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(r, str) and r for r in accepted), results
    messages = await receive_all(aws, fresh.queue_url)
    assert sorted(m["Body"] for m in messages) == ["ok-0", "ok-1", "ok-2", "ok-3"]
    assert sorted(m["MessageId"] for m in messages) == sorted(str(r) for r in accepted)


async def received(aws: AwsClients, url: str, count: int) -> list[dict[str, Any]]:
    """``count`` messages planted and received (in flight for 60 s)."""
    for index in range(count):
        await aws.sqs.send_message(QueueUrl=url, MessageBody=f"m{index}")
    messages = await receive_all(aws, url)
    assert len(messages) == count
    return sorted(messages, key=lambda m: str(m["Body"]))


def batcher_for(aws: AwsClients, url: str, operation: str) -> Batcher:
    """A Batcher sending ``operation`` to the queue, wired as the consumer wires its own."""
    call = getattr(aws.sqs, operation)

    async def send(entries: list[dict[str, Any]]) -> Any:
        return await call(QueueUrl=url, Entries=entries)

    return Batcher(operation, send, linger_seconds=0.2)


async def visible(aws: AwsClients, url: str) -> list[str]:
    response = await aws.sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0
    )
    return sorted(m["Body"] for m in response.get("Messages", []))


async def test_an_invalid_visibility_change_fails_alone(
    aws: AwsClients, fresh: Resources, aws_calls: ActionRecorder
) -> None:
    first, second, third = await received(aws, fresh.queue_url, 3)
    batcher = batcher_for(aws, fresh.queue_url, "change_message_visibility_batch")
    before = aws_requests("sqs", "ChangeMessageVisibilityBatch")
    aws_calls.clear()
    results = await asyncio.gather(
        batcher.submit({"ReceiptHandle": first["ReceiptHandle"], "VisibilityTimeout": 0}),
        batcher.submit({"ReceiptHandle": second["ReceiptHandle"], "VisibilityTimeout": 43_201}),
        batcher.submit({"ReceiptHandle": third["ReceiptHandle"], "VisibilityTimeout": 0}),
        return_exceptions=True,
    )
    assert aws_requests("sqs", "ChangeMessageVisibilityBatch") - before == 1
    refused = results[1]
    assert isinstance(refused, BatchEntryError), results
    assert (refused.code, refused.sender_fault) == ("InvalidParameterValue", True)
    assert "VisibilityTimeout" in str(refused)
    assert [r.code for _, r in aws_calls.refusals()] == ["InvalidParameterValue"]
    assert isinstance(results[0], dict)
    assert isinstance(results[2], dict)
    # The two valid changes took effect; the refused one left its message in flight.
    assert await visible(aws, fresh.queue_url) == [first["Body"], third["Body"]]


async def test_a_receipt_handle_the_server_never_issued_fails_alone(
    aws: AwsClients, fresh: Resources
) -> None:
    first, second = await received(aws, fresh.queue_url, 2)
    batcher = batcher_for(aws, fresh.queue_url, "delete_message_batch")
    results = await asyncio.gather(
        batcher.submit({"ReceiptHandle": first["ReceiptHandle"]}),
        batcher.submit({"ReceiptHandle": "never-issued-" + second["ReceiptHandle"][:20]}),
        batcher.submit({"ReceiptHandle": second["ReceiptHandle"]}),
        return_exceptions=True,
    )
    refused = results[1]
    assert isinstance(refused, BatchEntryError), results
    assert (refused.code, refused.sender_fault) == ("ReceiptHandleIsInvalid", True)  # moto's own
    assert isinstance(results[0], dict)
    assert isinstance(results[2], dict)
    depth = await aws.sqs.get_queue_attributes(
        QueueUrl=fresh.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    counts = depth["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "0"
    assert counts["ApproximateNumberOfMessagesNotVisible"] == "0"  # both really deleted
