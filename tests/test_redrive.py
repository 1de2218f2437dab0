"""The queue's last receive: courier dead-letters a still-failing message itself, with a reason.

Without it SQS's redrive moves the message on the next receive with no ``dlq`` attribute, and
its status record stays ``processing`` for good (``service/worker/redrive.py``). moto applies
the RedrivePolicy as SQS does, so the old behaviour shows here as ``(redrive)``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from courier_testkit.ports import free_port
from service.aws import AwsClients, open_client
from service.bootstrap import Resources
from service.envelope import EnvelopeCipher
from service.settings import Settings
from service.status import RequestState, StatusStore
from service.worker.dlq import DeadLetterInfo
from service.worker.outcomes import RETRIES_EXHAUSTED, DeadLetter, Message, Outcome, Retry
from service.worker.pipeline import Pipeline
from service.worker.poller import Poller
from service.worker.redrive import RedriveLimit, parse_max_receive_count
from service.worker.replay import ReplayFilter, replay
from tests.chain import eventually, mailbox, plant, plant_request, running_chain
from tests.test_poller import worker_settings


async def _limit_receives(aws: AwsClients, resources: Resources, count: int) -> None:
    dlq = await aws.sqs.get_queue_attributes(
        QueueUrl=resources.dlq_url, AttributeNames=["QueueArn"]
    )
    policy = {"deadLetterTargetArn": dlq["Attributes"]["QueueArn"], "maxReceiveCount": count}
    await aws.sqs.set_queue_attributes(
        QueueUrl=resources.queue_url, Attributes={"RedrivePolicy": json.dumps(policy)}
    )


async def _dead_letters(aws: AwsClients, dlq_url: str) -> list[dict[str, Any]]:
    response = await aws.sqs.receive_message(
        QueueUrl=dlq_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=1,
        VisibilityTimeout=0,  # a look: the copy stays there for the replay
        MessageAttributeNames=["All"],
    )
    return list(response.get("Messages", []))


async def test_a_delivery_failing_on_the_last_receive_is_dead_lettered_with_why(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    """billing answers 503 on both receives a maxReceiveCount of 2 allows: the request ends
    ``failed`` with the reason, the DLQ copy says which target and why, and a replay once
    billing is back delivers to billing alone."""
    await _limit_receives(aws, fresh, 2)
    async with running_chain(settings, fresh, aws) as chain:
        billing = chain.targets["billing"]
        billing.behaviour.down = True
        request_id = await chain.create(mailbox(40))
        record = await chain.wait_status(request_id, "failed", timeout=20)
        assert record["targets"] == {
            "crm": "delivered",
            "directory": "delivered",
            "billing": "failed",
        }
        assert record["error"] == "retries exhausted: billing: HTTP 503"
        [raw] = await eventually(lambda: _dead_letters(aws, fresh.dlq_url), 10, "the DLQ copy")
        info = DeadLetterInfo.of_sqs(raw)
        assert info is not None, raw["MessageAttributes"]  # None: SQS's redrive moved it
        assert (info.reason, info.target, info.detail) == (
            RETRIES_EXHAUSTED,
            "billing",
            "billing: HTTP 503",
        )
        assert info.receive_count == 2
        assert len(billing.calls) == 2  # one call per receive, none after the last
        assert await chain.queue_depth() == 0

        billing.behaviour.down = False
        report = await replay(aws.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter())
        assert report.moved == 1
        await chain.wait_status(request_id, "completed", timeout=20)
        assert billing.effects == {f"{request_id}:billing": 1}
        assert chain.targets["crm"].effects == {f"{request_id}:crm": 1}  # not called again


async def test_a_handler_error_on_the_last_receive_is_dead_lettered_too(
    aws: AwsClients, fresh: Resources
) -> None:
    """courier's own failure (here the handler raising) ends the same way, without a target."""
    await _limit_receives(aws, fresh, 2)
    receives: list[int] = []
    dead: list[tuple[Message, DeadLetter]] = []

    async def handler(message: Message) -> Outcome:
        receives.append(message.receive_count)
        raise RuntimeError("status table refused the write")

    async def dead_letter(message: Message, verdict: DeadLetter) -> None:
        dead.append((message, verdict))

    await plant(aws, fresh.queue_url, "body")
    redrive = RedriveLimit(aws.sqs, fresh.queue_url)
    settings = worker_settings(backoff_base_seconds=0.1, backoff_max_seconds=0.2)
    poller = Poller(aws.sqs, fresh.queue_url, handler, settings, dead_letter, redrive=redrive)
    poller.start()
    try:
        await eventually(lambda: dead, 15, "the message dead-lettered")
    finally:
        await poller.stop(1)
    assert receives == [1, 2]
    [(message, verdict)] = dead
    assert message.receive_count == 2
    assert (verdict.reason, verdict.target) == (RETRIES_EXHAUSTED, "")
    assert verdict.detail == "error: RuntimeError"


async def test_courier_own_failure_on_the_last_receive_fails_the_request_by_its_attributes(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    """KMS unreachable, so the envelope cannot be opened: the dead letter says why, and the
    request, named by the message's attributes, is recorded ``failed``."""
    request_id = await plant_request(aws, settings, 50)
    response = await aws.sqs.receive_message(
        QueueUrl=fresh.queue_url,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["All"],
        WaitTimeSeconds=1,
    )
    [message] = [Message.from_sqs(raw) for raw in response["Messages"]]
    store = StatusStore(aws.dynamodb, fresh.status_table, 1)
    unreachable = replace(settings.aws, kms_endpoint_url=f"http://127.0.0.1:{free_port()}")
    async with open_client("kms", unreachable) as kms:
        pipeline = Pipeline(EnvelopeCipher(kms, settings.envelope), store, [], settings.worker)
        outcome = await pipeline.handle(message)
    assert isinstance(outcome, Retry), outcome
    verdict = outcome.exhausted()
    assert (verdict.reason, verdict.target, verdict.detail) == (
        RETRIES_EXHAUSTED,
        "",
        outcome.reason,
    )
    assert verdict.after_move is not None
    await verdict.after_move()
    record = await store.get(request_id)
    assert record is not None
    assert record.state is RequestState.FAILED
    assert record.error == f"retries exhausted: {outcome.reason}"


async def test_the_limit_follows_the_queue_and_survives_a_failed_read(
    aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    limit = RedriveLimit(aws.sqs, fresh.queue_url)
    await limit.refresh()
    assert limit.max_receive_count == 20  # courier bootstrap's
    await _limit_receives(aws, fresh, 5)
    await limit.refresh()
    assert limit.max_receive_count == 5
    assert limit.is_last(_message(5))
    assert not limit.is_last(_message(4))

    await aws.sqs.delete_queue(QueueUrl=fresh.queue_url)
    with caplog.at_level("WARNING", logger="courier.poller"):
        await limit.refresh()
    assert limit.max_receive_count == 5  # what was known stays
    [event] = [
        fields
        for record in caplog.records
        if (fields := getattr(record, "fields", {})).get("event") == "redrive_policy_unread"
    ]
    assert "NonExistentQueue" in event["error"] or "QueueDoesNotExist" in event["error"]


async def test_a_queue_without_a_redrive_policy_retries_as_before(
    aws: AwsClients, fresh: Resources
) -> None:
    await aws.sqs.set_queue_attributes(QueueUrl=fresh.queue_url, Attributes={"RedrivePolicy": ""})
    limit = RedriveLimit(aws.sqs, fresh.queue_url)
    await limit.refresh()
    assert limit.max_receive_count is None
    assert not limit.is_last(_message(10_000))


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (None, None),
        ("", None),
        ('{"deadLetterTargetArn": "arn:aws:sqs:r:1:q", "maxReceiveCount": 5}', 5),
        ('{"maxReceiveCount": "20"}', 20),  # SQS itself answers with a string
        ('{"maxReceiveCount": 0}', None),
        ('{"maxReceiveCount": "many"}', None),
        ("{}", None),
        ("[]", None),
        ("not json", None),
    ],
)
def test_the_policy_is_parsed_strictly(policy: str | None, expected: int | None) -> None:
    assert parse_max_receive_count(policy) == expected


def _message(receive_count: int) -> Message:
    return Message("m", "r", "", {}, receive_count, 0.0)
