"""``courier replay --op / --older-than / --newer-than / --rate`` select and pace what they move.

The dead letters are written by courier's own ``DeadLetterQueue.move`` (the ``dlq`` attribute,
the carried attributes, the send), from messages received off the work queue, with different
ops and failure times. Only the clock the move stamps ``failed_at`` with is set by the test.
"""

from __future__ import annotations

import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import service.worker.dlq
from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import Settings
from service.worker.dlq import DeadLetterInfo, DeadLetterQueue
from service.worker.outcomes import DeadLetter, Message
from service.worker.replay import ReplayFilter, replay
from tests.chain import plant, receive_all, run_cli

HOUR = 3600.0


@dataclass(frozen=True)
class Letter:
    """One dead letter to plant: its request id, op and age (seconds since it failed)."""

    request_id: str
    op: str
    age: float


# request id -> op, age. "redriven" was moved by SQS's redrive: no ``dlq`` attribute, so its
# age is taken from when it was sent to the DLQ (now).
LETTERS = (
    Letter("create-3h", "create-mailbox", 3 * HOUR),
    Letter("create-30m", "create-mailbox", 0.5 * HOUR),
    Letter("create-1m", "create-mailbox", 60),
    Letter("delete-3h", "delete-mailbox", 3 * HOUR),
    Letter("delete-1m", "delete-mailbox", 60),
)
REDRIVEN = "redriven"
ALL = {letter.request_id for letter in LETTERS} | {REDRIVEN}


async def dead_letter(aws: AwsClients, fresh: Resources, letters: tuple[Letter, ...]) -> None:
    """Put ``letters`` on the work queue, then dead-letter each as the worker does."""
    for letter in letters:
        attributes = {"op": letter.op, "request_id": letter.request_id}
        await plant(aws, fresh.queue_url, f"sealed-{letter.request_id}", attributes)
    received = [Message.from_sqs(raw) for raw in await receive_all(aws, fresh.queue_url)]
    assert len(received) == len(letters)
    by_id = {letter.request_id: letter for letter in letters}
    dlq = DeadLetterQueue(aws.sqs, fresh.dlq_url, fresh.queue_url)
    now = time.time()
    for message in received:
        failed_at = now - by_id[message.attributes["request_id"]].age
        # Only the clock the move stamps ``failed_at`` with (service.worker.dlq's own ``time``).
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                service.worker.dlq, "time", types.SimpleNamespace(time=lambda at=failed_at: at)
            )
            await dlq.move(message, DeadLetter("target_rejected", "crm", "HTTP 400"))
        await aws.sqs.delete_message(QueueUrl=fresh.queue_url, ReceiptHandle=message.receipt_handle)


@pytest.fixture
async def planted(aws: AwsClients, fresh: Resources) -> None:
    """The LETTERS in the DLQ, plus one message SQS's redrive moved there just now."""
    await dead_letter(aws, fresh, LETTERS)
    await plant(
        aws, fresh.dlq_url, "sealed-redriven", {"op": "create-mailbox", "request_id": REDRIVEN}
    )
    # The planting went through courier's writer: the failure times are what the filters read.
    copies = {
        raw["MessageAttributes"]["request_id"]["StringValue"]: DeadLetterInfo.of_sqs(raw)
        for raw in await peek(aws, fresh.dlq_url)
    }
    assert set(copies) == ALL
    now = time.time()
    for letter in LETTERS:
        info = copies[letter.request_id]
        assert info is not None, letter
        assert info.reason == "target_rejected", info
        assert abs(now - info.failed_at - letter.age) < 30, (letter, info)
    assert copies[REDRIVEN] is None


async def peek(aws: AwsClients, url: str) -> list[dict[str, Any]]:
    """Every message of a queue, left visible."""
    found: dict[str, dict[str, Any]] = {}
    for _ in range(10):
        response = await aws.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
        )
        new = [raw for raw in response.get("Messages", []) if raw["MessageId"] not in found]
        if not new:
            break
        found.update((raw["MessageId"], raw) for raw in new)
    return list(found.values())


async def selected(aws: AwsClients, fresh: Resources, selection: ReplayFilter) -> set[str]:
    """The request ids a dry run of ``selection`` would move (nothing moves)."""
    chosen: set[str] = set()

    def note(message: Message, is_chosen: bool) -> None:
        if is_chosen:
            chosen.add(message.attributes["request_id"])

    report = await replay(
        aws.sqs, fresh.dlq_url, fresh.queue_url, selection, dry_run=True, on_message=note
    )
    assert report.examined == len(LETTERS) + 1, report
    assert report.matched == len(chosen), report
    return chosen


# (filter, the request ids it selects); ages: --older-than is a minimum, --newer-than a maximum
CASES = (
    (ReplayFilter(), ALL),
    (ReplayFilter(op="delete-mailbox"), {"delete-3h", "delete-1m"}),
    (ReplayFilter(op="create-mailbox"), {"create-3h", "create-30m", "create-1m", REDRIVEN}),
    (ReplayFilter(op="no-such-op"), set()),
    (ReplayFilter(min_age_seconds=600), {"create-3h", "create-30m", "delete-3h"}),
    (ReplayFilter(min_age_seconds=2 * HOUR), {"create-3h", "delete-3h"}),
    # the redriven one was sent to the DLQ just now
    (ReplayFilter(max_age_seconds=600), {"create-1m", "delete-1m", REDRIVEN}),
    (ReplayFilter(min_age_seconds=600, max_age_seconds=HOUR), {"create-30m"}),
    (ReplayFilter(op="create-mailbox", min_age_seconds=HOUR), {"create-3h"}),
    (ReplayFilter(op="delete-mailbox", max_age_seconds=600), {"delete-1m"}),
)


async def test_filters_select_exactly_the_matching_letters(
    aws: AwsClients, fresh: Resources, planted: None
) -> None:
    wrong = []
    for selection, expected in CASES:
        found = await selected(aws, fresh, selection)
        if found != expected:
            wrong.append((selection, sorted(found), sorted(expected)))
    assert wrong == [], "(filter, selected, expected)"


async def test_cli_op_and_age_filters_move_exactly_the_matching_letters(
    aws: AwsClients, fresh: Resources, settings: Settings, planted: None, tmp_path: Path
) -> None:
    code, output = await run_cli(
        settings, tmp_path, "replay", "--dry-run", "--older-than", "600", "--newer-than", "3600"
    )
    assert code == 0, output
    listed = [line for line in output.splitlines() if line.startswith("would move ")]
    assert [line.split(" request=")[1].split()[0] for line in listed] == ["create-30m"], output
    assert "examined 6, matched 1, would move 1, skipped 0" in output

    code, output = await run_cli(
        settings, tmp_path, "replay", "--op", "delete-mailbox", "--older-than", "600"
    )
    assert code == 0, output
    assert "examined 6, matched 1, moved 1, skipped 0, left 0, failed 0" in output
    [copy] = await receive_all(aws, fresh.queue_url)
    assert copy["MessageAttributes"]["request_id"]["StringValue"] == "delete-3h"
    assert copy["Body"] == "sealed-delete-3h"

    code, output = await run_cli(settings, tmp_path, "replay", "--newer-than", "600")
    assert code == 0, output
    assert "examined 5, matched 3, moved 3, skipped 0, left 0, failed 0" in output
    moved = {
        raw["MessageAttributes"]["request_id"]["StringValue"]
        for raw in await receive_all(aws, fresh.queue_url)
    }
    assert moved == {"create-1m", "delete-1m", REDRIVEN}
    left = {
        raw["MessageAttributes"]["request_id"]["StringValue"]
        for raw in await receive_all(aws, fresh.dlq_url)
    }
    assert left == {"create-3h", "create-30m"}


async def test_cli_rate_paces_the_moves(
    aws: AwsClients,
    fresh: Resources,
    settings: Settings,
    tmp_path: Path,
) -> None:
    count, rate = 6, 4.0
    letters = tuple(
        Letter(f"paced-{i}-{uuid.uuid4().hex[:6]}", "create-mailbox", 60) for i in range(count)
    )
    await dead_letter(aws, fresh, letters)
    code, output = await run_cli(settings, tmp_path, "replay", "--rate", f"{rate:g}")
    assert code == 0, output
    assert f"moved {count}, skipped 0, left 0, failed 0" in output
    copies = await receive_all(aws, fresh.queue_url)
    assert len(copies) == count
    # When the work queue took each copy (its clock, in ms): the first move goes at once, each
    # next one waits 1/rate. Unpaced, six moves against moto take well under 0.5 s; the default
    # --rate 10 would take 0.5 s.
    sent = sorted(int(raw["Attributes"]["SentTimestamp"]) / 1000 for raw in copies)
    spread = sent[-1] - sent[0]
    assert spread >= 0.8 * (count - 1) / rate, sent
