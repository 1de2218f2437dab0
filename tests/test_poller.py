"""The SQS poller against moto: backoff, poller count, heartbeat, FIFO groups, stop and drain."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service import daemon, metrics
from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import Settings, WorkerSettings
from service.worker.outcomes import Ack, DeadLetter, Message, Outcome, Retry, backoff_seconds
from service.worker.poller import Poller
from tests.chain import (
    Chain,
    chain_courier,
    eventually,
    mailbox,
    plant_request,
    running_chain,
    serving_stubs,
    worker_only_settings,
)

# --- backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize("receive_count", [0, 1, 2, 3, 4, 5, 8, 20, 100])
def test_backoff_is_exponential_with_jitter_in_the_upper_half(receive_count: int) -> None:
    rng = random.Random(receive_count)
    base, maximum = 2.0, 60.0
    step = min(maximum, base * 2 ** max(0, receive_count - 1))
    delays = [backoff_seconds(receive_count, base, maximum, rng) for _ in range(500)]
    assert all(step / 2 <= delay <= step for delay in delays)
    assert max(delays) - min(delays) > step / 4  # really jittered, not a constant


def test_backoff_doubles_per_receive_and_is_capped() -> None:
    rng = random.Random(7)
    assert backoff_seconds(1, 2, 900, rng) <= 2
    assert 2 <= backoff_seconds(2, 2, 900, rng) <= 4
    assert 4 <= backoff_seconds(3, 2, 900, rng) <= 8
    assert all(450 <= backoff_seconds(n, 2, 900, rng) <= 900 for n in range(11, 60))


def test_backoff_with_zero_base_is_immediate() -> None:
    assert backoff_seconds(5, 0, 900) == 0


# --- a bare poller on a fresh queue ----------------------------------------------------------


def worker_settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(
        **{
            "wait_seconds": 1,
            "visibility_timeout_seconds": 5,
            "backoff_base_seconds": 0.5,
            "backoff_max_seconds": 2,
            **overrides,
        }
    )


async def no_dead_letters(message: Message, verdict: DeadLetter) -> None:
    raise AssertionError(f"unexpected dead letter {verdict}")


@pytest.fixture
async def stopping() -> AsyncIterator[list[Poller]]:
    """Pollers a test starts; stopped at teardown even when the test fails."""
    pollers: list[Poller] = []
    yield pollers
    for poller in pollers:
        await poller.stop(1)


async def send_batch(aws: AwsClients, queue_url: str, bodies: list[str], **extra: str) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body, **extra}
            for i, body in enumerate(bodies[start : start + 10])
        ]
        response = await aws.sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        assert not response.get("Failed")


def receive_calls() -> float:
    value = REGISTRY.get_sample_value(
        "courier_aws_requests_total", {"service": "sqs", "operation": "ReceiveMessage"}
    )
    return value or 0.0


async def test_a_failing_receive_logs_the_backoff_it_waits_as_a_field(
    aws: AwsClients, fresh: Resources, stopping: list[Poller], caplog: pytest.LogCaptureFixture
) -> None:
    missing = fresh.queue_url.rsplit("/", 1)[0] + "/no-such-queue"

    async def handler(message: Message) -> Outcome:
        raise AssertionError("nothing can be received from a missing queue")

    poller = Poller(aws.sqs, missing, handler, worker_settings(), no_dead_letters)
    stopping.append(poller)

    def backoffs() -> list[float]:
        return [
            record.fields["backoff_seconds"]  # type: ignore[attr-defined]
            for record in caplog.records
            if getattr(record, "fields", {}).get("event") == "receive_failed"
        ]

    with caplog.at_level("WARNING", logger="courier.poller"):
        poller.start()
        await eventually(lambda: len(backoffs()) >= 2, timeout=30)
    # Exponential from 1 s: the field is what the poller sleeps, not a human message to parse.
    assert backoffs()[:2] == [1.0, 2.0]


@pytest.mark.timeout(180)  # generous waits: moto slows down a lot on a loaded machine
async def test_idle_queue_settles_to_one_poller(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    handled: list[str] = []

    async def handler(message: Message) -> Outcome:
        await asyncio.sleep(0.2)
        handled.append(message.body)
        return Ack()

    await send_batch(aws, fresh.queue_url, [f"m{i}" for i in range(30)])
    # A long visibility timeout: on a loaded machine an ack can land more than the usual 5 s
    # after the receive, and the redelivered copy would be handled twice.
    settings = worker_settings(pollers=4, visibility_timeout_seconds=120)
    poller = Poller(aws.sqs, fresh.queue_url, handler, settings, no_dead_letters)
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, metrics.pollers_active._value.get())
            await asyncio.sleep(0.01)

    async def observe(seconds: float) -> tuple[float, float]:
        """(most long-polls at once, ReceiveMessage calls sent) over ``seconds``."""
        most, before = 0.0, receive_calls()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            most = max(most, metrics.pollers_active._value.get())
            await asyncio.sleep(0.01)
        return most, receive_calls() - before

    sampler = asyncio.create_task(sample())
    poller.start()
    stopping.append(poller)
    expected = sorted(f"m{i}" for i in range(30))
    await eventually(lambda: set(handled) == set(expected), 60, "30 messages handled")
    sampler.cancel()
    # An extra poller stops once the first poller has seen the queue empty: it may finish the
    # long poll it is in and, having raced the first poller, one more (2 x wait_seconds).
    # Wait for a quiet window (however long a loaded machine makes that), then measure one.
    settle_by = time.monotonic() + 30
    while (await observe(2.5))[0] > 1:
        assert time.monotonic() < settle_by, "the pollers never settled to one"
    idle_peak, calls = await observe(3)
    assert peak >= 2, "a busy queue should have had several pollers"
    assert idle_peak <= 1
    # One poller long-polls for at least wait_seconds=1 per call: at most 4 calls start in 3 s
    # (a slow machine makes fewer, never more), and it still polls.
    assert 1 <= calls <= 4, f"{calls} ReceiveMessage calls in 3 s with wait_seconds=1"
    assert sorted(handled) == expected


async def test_retry_hides_the_message_for_at_least_its_delay(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    seen: list[tuple[float, int]] = []

    async def handler(message: Message) -> Outcome:
        seen.append((time.monotonic(), message.receive_count))
        return Retry(0.3, "not yet") if len(seen) == 1 else Ack()

    await send_batch(aws, fresh.queue_url, ["once"])
    poller = Poller(aws.sqs, fresh.queue_url, handler, worker_settings(), no_dead_letters)
    poller.start()
    stopping.append(poller)
    await eventually(lambda: len(seen) == 2, 8, "the retried message back")
    (first, count1), (second, count2) = seen
    assert (count1, count2) == (1, 2)
    # 0.3 s rounds up to SQS's 1 s granularity: not back at once, which would be a hot loop.
    assert second - first >= 0.9


async def test_handler_error_is_retried_not_lost(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    counts: list[int] = []

    async def handler(message: Message) -> Outcome:
        counts.append(message.receive_count)
        if len(counts) == 1:
            raise RuntimeError("bug in a handler")
        return Ack()

    await send_batch(aws, fresh.queue_url, ["boom"])
    poller = Poller(
        aws.sqs, fresh.queue_url, handler, worker_settings(backoff_base_seconds=0), no_dead_letters
    )
    poller.start()
    stopping.append(poller)
    await eventually(lambda: len(counts) == 2, 8, "redelivery after a handler error")
    assert counts == [1, 2]


async def test_fifo_group_released_behind_a_retry_keeps_its_order(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    handled: list[str] = []

    async def handler(message: Message) -> Outcome:
        handled.append(message.body)
        if message.body == "g-1" and handled.count("g-1") == 1:
            return Retry(1, "first attempt fails")
        return Ack()

    for body in ("g-1", "g-2", "g-3"):
        await aws.sqs.send_message(
            QueueUrl=fresh.fifo_queue_url, MessageBody=body, MessageGroupId="g"
        )
    poller = Poller(aws.sqs, fresh.fifo_queue_url, handler, worker_settings(), no_dead_letters)
    poller.start()
    stopping.append(poller)
    await eventually(lambda: handled.count("g-3") == 1, 10, "the whole group")
    assert handled == ["g-1", "g-1", "g-2", "g-3"]


# --- dead letters: the terminal state follows the DLQ copy -----------------------------------


async def _visible_after(aws: AwsClients, url: str, seconds: float) -> list[dict[str, Any]]:
    """Messages that come back within ``seconds`` (received and deleted-from-view for 30 s)."""
    response = await aws.sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=int(seconds), VisibilityTimeout=30
    )
    return list(response.get("Messages", []))


async def test_dead_letter_records_its_state_only_after_the_move_then_deletes(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    events: list[str] = []
    attempts: list[int] = []

    async def record_failed() -> None:
        events.append("marked failed")

    async def handler(message: Message) -> Outcome:
        attempts.append(message.receive_count)
        return DeadLetter("target_rejected", "crm", "HTTP 400", after_move=record_failed)

    async def flaky_dlq(message: Message, verdict: DeadLetter) -> None:
        events.append("move")
        if len(attempts) == 1:
            raise RuntimeError("the DLQ refused the copy")
        events.append("moved")

    await send_batch(aws, fresh.queue_url, ["poison"])
    poller = Poller(
        aws.sqs, fresh.queue_url, handler, worker_settings(visibility_timeout_seconds=2), flaky_dlq
    )
    poller.start()
    stopping.append(poller)
    await eventually(lambda: "marked failed" in events, 10, "the second attempt's move")
    # First attempt: the move failed, so nothing was marked and the message stayed.
    assert events == ["move", "move", "moved", "marked failed"]
    assert attempts == [1, 2]
    await poller.stop(1)
    assert await _visible_after(aws, fresh.queue_url, 3) == []  # deleted after the move


async def test_dead_letter_is_deleted_even_when_recording_its_state_fails(
    aws: AwsClients, fresh: Resources, stopping: list[Poller]
) -> None:
    moved: list[str] = []

    async def status_down() -> None:
        raise RuntimeError("status table unavailable")

    async def handler(message: Message) -> Outcome:
        return DeadLetter("target_rejected", "crm", "HTTP 400", after_move=status_down)

    async def dlq(message: Message, verdict: DeadLetter) -> None:
        moved.append(message.body)

    await send_batch(aws, fresh.queue_url, ["poison"])
    poller = Poller(
        aws.sqs, fresh.queue_url, handler, worker_settings(visibility_timeout_seconds=2), dlq
    )
    poller.start()
    stopping.append(poller)
    await eventually(lambda: bool(moved), 10, "the move")
    await poller.stop(1)
    # The DLQ copy exists: keeping the message would only dead-letter it a second time.
    assert await _visible_after(aws, fresh.queue_url, 3) == []
    assert moved == ["poison"]


# --- heartbeat -------------------------------------------------------------------------------


async def test_heartbeat_keeps_a_slow_message_invisible(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    extensions = metrics.visibility_extensions._value.get()
    received = metrics.messages_received._value.get()
    async with running_chain(
        settings,
        fresh,
        aws,
        target_overrides={"billing": {"timeout_seconds": 10}},
        visibility_timeout_seconds=5,
    ) as chain:
        chain.targets["billing"].behaviour.latency_seconds = 8
        request_id = await chain.create(mailbox(40))
        await chain.wait_status(request_id, "completed", timeout=14)
        assert metrics.messages_received._value.get() - received == 1  # never redelivered
        assert metrics.visibility_extensions._value.get() - extensions >= 2
        assert len(chain.targets["billing"].calls) == 1
        for name, stub in chain.targets.items():
            assert stub.effects == {f"{request_id}:{name}": 1}, name
        await eventually(lambda: _empty(chain), 5, "queue empty")


async def _empty(chain: Chain) -> bool:
    return await chain.queue_depth() == 0


# --- stop and drain --------------------------------------------------------------------------


async def test_stop_finishes_in_flight_work_within_the_bound(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    async with running_chain(
        settings, fresh, aws, drain_seconds=3, target_overrides={"crm": {"timeout_seconds": 5}}
    ) as chain:
        chain.targets["crm"].behaviour.latency_seconds = 1
        ids = [await chain.create(mailbox(50 + i)) for i in range(4)]
        await eventually(lambda: len(chain.targets["crm"].calls) == 4, 5, "4 calls in flight")
        started = time.monotonic()
        await chain.poller.stop(3)
        elapsed = time.monotonic() - started
        # The bound, plus slack for a loaded machine: the statuses below show the work finished.
        assert elapsed < 3 + 2
        for request_id in ids:
            assert (await chain.status(request_id))["status"] == "completed"
        assert await chain.queue_depth() == 0
        assert chain.poller.in_flight == 0


async def test_stop_releases_what_does_not_finish_in_time(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    released = REGISTRY.get_sample_value(
        "courier_messages_processed_total", {"outcome": "released"}
    )
    async with running_chain(
        settings,
        fresh,
        aws,
        drain_seconds=1,
        target_overrides={"crm": {"timeout_seconds": 10}},
    ) as chain:
        chain.targets["crm"].behaviour.latency_seconds = 3
        ids = {await chain.create(mailbox(60 + i)) for i in range(3)}
        await eventually(lambda: len(chain.targets["crm"].calls) == 3, 5, "3 calls in flight")
        started = time.monotonic()
        await chain.poller.stop(1)
        # The 1 s bound, plus slack for a loaded machine; that the calls were not waited for
        # is shown below (released, not deleted, still "accepted").
        assert time.monotonic() - started < 1 + 2
        assert chain.poller.in_flight == 0
        assert await chain.queue_depth() == 3  # nothing deleted
        found: dict[str, str] = {}
        for _ in range(3):  # visible again at once: no wait, no visibility timeout to sit out
            response = await aws.sqs.receive_message(
                QueueUrl=fresh.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
            )
            for raw in response.get("Messages", []):
                found[raw["MessageId"]] = raw["MessageAttributes"]["request_id"]["StringValue"]
        assert set(found.values()) == ids
        for request_id in ids:
            assert (await chain.status(request_id))["status"] == "accepted"
    after = REGISTRY.get_sample_value("courier_messages_processed_total", {"outcome": "released"})
    assert (after or 0) - (released or 0) == 3


async def test_sigterm_drains_and_exits_zero_within_the_bound(
    settings: Settings, fresh: Resources, aws: AwsClients, tmp_path: Path
) -> None:
    async with serving_stubs() as stubs:
        configured = worker_only_settings(
            settings,
            stubs,
            target_overrides={"crm": {"timeout_seconds": 10}},
            drain_seconds=1,
        )
        stubs["crm"].behaviour.latency_seconds = 3
        async with chain_courier(configured, tmp_path) as courier:
            await courier.wait_ready()
            request_id = await plant_request(aws, configured, 70)
            await eventually(lambda: bool(stubs["crm"].calls), 10, "a call in flight")
            started = time.monotonic()
            code = await courier.signal_and_wait(signal.SIGTERM, timeout=10)
            elapsed = time.monotonic() - started
            log = courier.log()
        assert code == 0, log
        # The bound systemd is promised (TimeoutStopSec); that the 3 s call was not waited
        # for is shown below (the message is released, not completed and deleted).
        bound = daemon.stop_bound_seconds(configured)
        assert elapsed <= bound, f"took {elapsed:.1f}s to stop, bound {bound:.1f}s"
        assert '"consumer_stopped"' in log, log
        response = await aws.sqs.receive_message(
            QueueUrl=fresh.queue_url, WaitTimeSeconds=0, MessageAttributeNames=["All"]
        )
        [raw] = response["Messages"]  # released, not deleted: visible again at once
        assert raw["MessageAttributes"]["request_id"]["StringValue"] == request_id
