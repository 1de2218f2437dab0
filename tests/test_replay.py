"""Replay from the DLQ (library and ``courier replay``): filters, dry run, and nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from courier_testkit.proxy import Proxy, listening
from service.aws import AwsClients, open_clients
from service.bootstrap import Resources
from service.settings import AwsSettings, QueueSettings, Settings
from service.worker import replay as replay_module
from service.worker.dlq import DeadLetterInfo
from service.worker.outcomes import Message
from service.worker.replay import ReplayFilter, ReplayReport, discard, replay
from tests.chain import eventually, mailbox, plant, receive_all, run_cli, running_chain

# (reason, target) of the planted dead letters
DEAD_LETTERS = (
    ("target_rejected", "crm"),
    ("target_rejected", "crm"),
    ("target_rejected", "billing"),
    ("undecryptable", ""),
    ("undecryptable", ""),
    ("malformed", ""),
)


def dead_letter(reason: str, target: str = "", failed_at: float = 1700000000.0) -> str:
    """A ``dlq`` attribute as the worker writes it."""
    document = {
        "reason": reason,
        "target": target,
        "detail": "why it failed",
        "receive_count": 1,
        "source_message_id": str(uuid.uuid4()),
        "source_queue": "https://sqs.example/queue",
        "failed_at": failed_at,
    }
    return json.dumps(document, separators=(",", ":"))


async def plant_dead_letters(aws: AwsClients, dlq_url: str) -> dict[str, dict[str, str]]:
    """The DEAD_LETTERS in the DLQ, as the worker leaves them; body -> attributes."""
    planted: dict[str, dict[str, str]] = {}
    for index, (reason, target) in enumerate(DEAD_LETTERS):
        body = f"body-{index}-{uuid.uuid4().hex[:8]}"
        attributes = {
            "op": "create-mailbox",
            "request_id": f"req-{index}",
            "traceparent": f"00-{index:032x}-{index:016x}-01",
            "dlq": dead_letter(reason, target),
        }
        await plant(aws, dlq_url, body, attributes)
        planted[body] = attributes
    return planted


def info(attributes: dict[str, str]) -> DeadLetterInfo:
    found = DeadLetterInfo.of(attributes)
    assert found is not None, attributes
    return found


def counts(report: Any) -> tuple[int, ...]:
    """(examined, matched, moved, skipped, left, failed)."""
    return (
        report.examined,
        report.matched,
        report.moved,
        report.skipped,
        report.left,
        report.failed,
    )


async def depth(aws: AwsClients, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    response = await aws.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    found = response["Attributes"]
    return int(found["ApproximateNumberOfMessages"]), int(
        found["ApproximateNumberOfMessagesNotVisible"]
    )


def attributes(raw: dict[str, Any]) -> dict[str, str]:
    return {name: value["StringValue"] for name, value in raw.get("MessageAttributes", {}).items()}


async def test_dry_run_lists_and_moves_nothing(aws: AwsClients, fresh: Resources) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    listed: list[tuple[str, bool]] = []
    report = await replay(
        aws.sqs,
        fresh.dlq_url,
        fresh.queue_url,
        ReplayFilter(reason="target_rejected"),
        dry_run=True,
        on_message=lambda message, chosen: listed.append((message.body, chosen)),
    )
    assert (report.examined, report.matched, report.moved, report.failed) == (6, 3, 0, 0)
    assert report.skipped == 0
    assert len(listed) == 6
    assert sum(chosen for _, chosen in listed) == 3
    assert await depth(aws, fresh.queue_url) == (0, 0)
    assert await depth(aws, fresh.dlq_url) == (6, 0)  # all back in view at once


async def test_filter_moves_only_matching_messages_as_clean_replayed_copies(
    aws: AwsClients, fresh: Resources
) -> None:
    planted = await plant_dead_letters(aws, fresh.dlq_url)
    report = await replay(
        aws.sqs,
        fresh.dlq_url,
        fresh.queue_url,
        ReplayFilter(reason="target_rejected", target="crm"),
        rate_per_second=100,
    )
    assert counts(report) == (6, 2, 2, 0, 0, 0)
    copies = await receive_all(aws, fresh.queue_url)
    assert len(copies) == 2
    for raw in copies:
        original = planted[raw["Body"]]
        found = attributes(raw)
        assert (info(original).reason, info(original).target) == ("target_rejected", "crm")
        assert found["replayed"] == "1"
        assert "dlq" not in found
        assert set(found) == {"op", "request_id", "traceparent", "replayed"}
        for name in ("op", "request_id", "traceparent"):
            assert found[name] == original[name]
    assert await depth(aws, fresh.dlq_url) == (4, 0)
    left = {info(attributes(raw)).reason for raw in await receive_all(aws, fresh.dlq_url)}
    assert left == {"target_rejected", "undecryptable", "malformed"}


async def test_limit_and_reason_filter(aws: AwsClients, fresh: Resources) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    report = await replay(
        aws.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(reason="undecryptable"), limit=1
    )
    assert report.moved == 1
    # The rest of its batch was looked at: a second match, if seen, is left for the next run.
    assert report.matched in (1, 2)
    assert report.left == report.matched - 1
    [copy] = await receive_all(aws, fresh.queue_url)
    assert "dlq" not in attributes(copy)
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 5


async def test_nothing_leaves_the_dlq_when_the_send_fails(
    aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    missing = fresh.queue_url.rsplit("/", 1)[0] + f"/no-such-queue-{uuid.uuid4().hex[:8]}"
    report = await replay(aws.sqs, fresh.dlq_url, missing, ReplayFilter(), rate_per_second=100)
    assert counts(report) == (6, 6, 0, 0, 6, 6)
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 6  # every copy still in the DLQ
    assert await depth(aws, fresh.queue_url) == (0, 0)


async def test_discard_counts_a_refused_delete_as_failed_and_carries_on(
    aws: AwsClients, fresh: Resources, aws_settings: AwsSettings
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    # Someone else's client: it purges the DLQ while the pass holds the messages it received,
    # so SQS refuses the deletes of every one but the first (ReceiptHandleIsInvalid).
    other = boto3.client(
        "sqs", region_name=aws_settings.region, endpoint_url=aws_settings.endpoint_for("sqs")
    )
    listed: list[str] = []

    def purge_on_the_second(message: Message, chosen: bool) -> None:
        listed.append(message.message_id)
        if len(listed) == 2:
            other.purge_queue(QueueUrl=fresh.dlq_url)

    report = await discard(aws.sqs, fresh.dlq_url, ReplayFilter(), on_message=purge_on_the_second)
    # Every message examined and tried: the failed deletes did not end the pass.
    assert counts(report) == (6, 6, 1, 0, 5, 5)
    assert report.chosen == 6
    assert await depth(aws, fresh.dlq_url) == (0, 0)


async def test_cli_dry_run_then_replay(
    aws: AwsClients, fresh: Resources, settings: Settings, tmp_path: Path
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    code, output = await run_cli(
        settings, tmp_path, "replay", "--dry-run", "--reason", "target_rejected"
    )
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.startswith("would move ")]
    assert len(lines) == 3, output
    assert all("reason=target_rejected" in line for line in lines)
    assert {line.split("target=")[1] for line in lines} == {"crm", "billing"}
    assert "examined 6, matched 3, would move 3, skipped 0" in output
    assert await depth(aws, fresh.queue_url) == (0, 0)
    assert await depth(aws, fresh.dlq_url) == (6, 0)

    code, output = await run_cli(settings, tmp_path, "replay", "--target", "billing")
    assert code == 0, output
    assert "examined 6, matched 1, moved 1, skipped 0, left 0, failed 0" in output
    [copy] = await receive_all(aws, fresh.queue_url)
    assert attributes(copy)["replayed"] == "1"
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 5


async def test_cli_replay_exits_1_when_sends_fail(
    aws: AwsClients, fresh: Resources, settings: Settings, tmp_path: Path
) -> None:
    await plant(aws, fresh.dlq_url, "poison", {"dlq": dead_letter("malformed")})
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    broken = settings.replace(queue=QueueSettings(url=missing, dlq_url=fresh.dlq_url))
    code, output = await run_cli(broken, tmp_path, "replay")
    assert code == 1, output
    assert "matched 1, moved 0, skipped 0, left 1, failed 1" in output
    visible, in_flight = await depth(aws, fresh.dlq_url)
    assert visible + in_flight == 1


async def test_replayed_rejection_completes_once_the_target_is_fixed(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    async with running_chain(settings, fresh, aws) as chain:
        crm = chain.targets["crm"]
        crm.behaviour.fixed_status = 400
        request_id = await chain.create(mailbox(80))
        await chain.wait_status(request_id, "failed", timeout=10)

        async def dead_lettered() -> bool:
            return await depth(aws, fresh.dlq_url) == (1, 0)

        await eventually(dead_lettered, 5, "the rejected message in the DLQ")
        crm.behaviour.fixed_status = 0  # the operator fixed the target
        report = await replay(
            aws.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(reason="target_rejected")
        )
        assert report.moved == 1
        record = await chain.wait_status(request_id, "completed", timeout=10)
        assert record["targets"] == {
            "crm": "delivered",
            "billing": "delivered",
            "directory": "delivered",
        }
        assert crm.effects == {f"{request_id}:crm": 1}
        assert len(crm.calls) == 2  # the 400, then the replay
        for name in ("billing", "directory"):  # delivered before: not called again
            assert len(chain.targets[name].calls) == 1, name
            assert chain.targets[name].effects == {f"{request_id}:{name}": 1}
        assert await depth(aws, fresh.dlq_url) == (0, 0)


async def test_copies_written_before_the_dlq_attribute_are_still_understood(
    aws: AwsClients, fresh: Resources
) -> None:
    # A DLQ keeps messages for 14 days: copies an older courier wrote carry dlq_* attributes.
    legacy = {
        "op": "create-mailbox",
        "request_id": "req-old",
        "dlq_reason": "target_rejected",
        "dlq_target": "crm",
        "dlq_receive_count": "3",
        "dlq_failed_at": "1700000000",
    }
    await plant(aws, fresh.dlq_url, "old-body", legacy)
    found = info(legacy)
    assert (found.reason, found.target, found.receive_count) == ("target_rejected", "crm", 3)
    report = await replay(
        aws.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(target="crm"), rate_per_second=100
    )
    assert counts(report) == (1, 1, 1, 0, 0, 0)
    [copy] = await receive_all(aws, fresh.queue_url)
    assert attributes(copy) == {"op": "create-mailbox", "request_id": "req-old", "replayed": "1"}


async def test_replay_takes_only_what_the_dlq_held_when_it_began(
    aws: AwsClients, fresh: Resources
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    # Dead-lettered after the replay began (a clock a little ahead shows it as the future).
    later = {"op": "create-mailbox", "dlq": dead_letter("target_rejected", "crm", time.time() + 60)}
    await plant(aws, fresh.dlq_url, "dead-lettered-during-the-replay", later)
    report = await replay(
        aws.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(), rate_per_second=100
    )
    assert counts(report) == (7, 6, 6, 1, 0, 0)
    assert len(await receive_all(aws, fresh.queue_url)) == 6
    assert await depth(aws, fresh.dlq_url) == (1, 0)  # released for the next run at once


async def test_replay_ends_while_the_target_still_refuses(
    settings: Settings, fresh: Resources, aws: AwsClients, tmp_path: Path
) -> None:
    async with running_chain(settings, fresh, aws) as chain:
        crm = chain.targets["crm"]
        crm.behaviour.fixed_status = 400  # refuses, and keeps refusing during the replay
        ids = [await chain.create(mailbox(81 + index)) for index in range(3)]
        for request_id in ids:
            await chain.wait_status(request_id, "failed", timeout=10)

        async def dead_lettered() -> bool:
            return await depth(aws, fresh.dlq_url) == (3, 0)

        await eventually(dead_lettered, 5, "the rejected messages in the DLQ")
        started = time.time()
        # Slow enough that the worker dead-letters the first copies while the replay still runs.
        code, output = await run_cli(chain.settings, tmp_path, "replay", "--rate", "2")
        assert code == 0, output
        found = re.search(r"moved (\d+), skipped (\d+), left (\d+), failed (\d+)", output)
        assert found is not None, output
        moved, skipped, left, failed = map(int, found.groups())
        assert (moved, left, failed) == (3, 0, 0), output
        assert skipped <= 3, output

        async def back_in_the_dlq() -> bool:
            return await depth(aws, fresh.dlq_url) == (3, 0) and len(crm.calls) == 6

        await eventually(back_in_the_dlq, 15, "every replayed copy refused again")
        again = [info(attributes(raw)) for raw in await receive_all(aws, fresh.dlq_url)]
        assert len(again) == 3
        assert all(found.failed_at >= started for found in again), again
        assert len(crm.calls) == 6  # each request moved once: not again and again
        assert await depth(aws, fresh.queue_url) == (0, 0)


@contextlib.asynccontextmanager
async def through_a_proxy(aws_settings: AwsSettings) -> AsyncIterator[tuple[Proxy, AwsClients]]:
    """Clients whose SQS calls pass an in-loop proxy (``courier_testkit.proxy``) in front of
    moto: the test can slow them and see each message received and deleted."""
    endpoint = aws_settings.endpoint_url
    assert endpoint is not None
    proxy = Proxy({"sqs": endpoint})
    proxy.recorder.ledger = True
    async with listening(proxy) as urls:
        proxied = dataclasses.replace(aws_settings, sqs_endpoint_url=urls["sqs"])
        async with open_clients(proxied) as clients:
            yield proxy, clients


async def test_a_slow_replay_deletes_each_message_within_its_listing_visibility(
    aws: AwsClients, fresh: Resources, aws_settings: AwsSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled down: a 2 s listing visibility at 2 messages/s (as 60 s at 1 every 15 s). Ten at
    # once would leave the sixth's receipt handle 2.5 s old, expired, when it is deleted.
    monkeypatch.setattr(replay_module, "LIST_VISIBILITY_SECONDS", 2)
    await plant_dead_letters(aws, fresh.dlq_url)
    async with through_a_proxy(aws_settings) as (proxy, proxied):
        report = await replay(
            proxied.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(), rate_per_second=2
        )
    assert counts(report) == (6, 6, 6, 0, 0, 0)
    events = proxy.recorder.message_events()
    received = {e.receipt_handle: e.at for e in events if e.event == "received"}
    held = [e.at - received[e.receipt_handle] for e in events if e.event == "deleted"]
    assert len(held) == 6
    assert max(held) < 2, held
    assert await depth(aws, fresh.dlq_url) == (0, 0)
    assert len(await receive_all(aws, fresh.queue_url)) == 6


@pytest.mark.parametrize("stops", [1, 2], ids=["stopped", "stopped-twice"])
async def test_a_stopped_replay_finishes_the_move_under_way_and_releases_the_rest(
    aws: AwsClients, fresh: Resources, aws_settings: AwsSettings, stops: int
) -> None:
    await plant_dead_letters(aws, fresh.dlq_url)
    async with through_a_proxy(aws_settings) as (proxy, proxied):
        proxy.behaviour["sqs"].latency_seconds = 0.5  # every SQS call takes half a second
        report = ReplayReport()
        run = asyncio.create_task(
            replay(proxied.sqs, fresh.dlq_url, fresh.queue_url, ReplayFilter(), report=report)
        )

        async def sending() -> bool:
            return proxy.counts["sqs"]["SendMessage"] >= 1

        await eventually(sending, 10, "the first copy on its way to the work queue")
        # Stopped (Ctrl-C, the console's Stop, a shutdown; then again, impatiently) while the
        # copy is being sent: the delete has not been asked for yet.
        for _ in range(stops):
            run.cancel()
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await run
    # The move under way finished: its copy is on the work queue and its original is gone;
    # the rest of the batch is visible again at once, not 60 s later.
    sent = proxy.counts["sqs"]["SendMessage"]
    assert (report.moved, report.failed) == (sent, 0)
    assert len(await receive_all(aws, fresh.queue_url)) == sent
    assert await depth(aws, fresh.dlq_url) == (6 - sent, 0)
