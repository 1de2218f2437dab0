"""Small versions of the fault and load scenarios, against real processes (``python -m chaos``
runs the full ones and prints the table).

One rig for the module: fauxqs (SQS), dynalite (DynamoDB) and moto (KMS) in their own
processes behind cuttable TCP proxies, the chaos stubs (IdM + three legacy systems) in one
process, and courier as ``python -m service run`` processes started per scenario. Every
scenario checks its invariants itself (``chaos.report.Row.violations``); the tests assert
there are none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator

import pytest

from chaos import report, scenarios, verify
from chaos.rig import Rig, rig
from chaos.scenarios import SMALL
from chaos.tcpproxy import tcp_proxy
from service.settings import QueueSettings

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
async def chaos_rig() -> AsyncIterator[Rig]:
    async with rig() as running:
        yield running


def assert_held(rows: list[report.Row], *, except_: tuple[str, ...] = ()) -> None:
    """No violations in ``rows`` other than those containing one of ``except_``."""
    assert rows
    left = [
        (row.scenario, violation)
        for row in rows
        for violation in row.violations
        if not any(part in violation for part in except_)
    ]
    assert left == [], "\n" + report.table(rows)


async def test_crash_of_workers_loses_nothing(chaos_rig: Rig) -> None:
    rows = await scenarios.crash(chaos_rig, SMALL)
    assert_held(rows)
    (row,) = rows
    assert row.delivered == row.accepted == SMALL.crash_requests
    assert all(n > 0 for n in row.notes["in_flight_at_kill"]), "the kills hit idle workers"


async def test_legacy_outage_opens_and_closes_the_circuit(chaos_rig: Rig) -> None:
    rows = await scenarios.outage(chaos_rig, SMALL)
    assert_held(rows)
    (row,) = rows
    assert row.notes["circuit_opened"] >= 1
    assert row.notes["circuit_open_at_end"] == 0


async def test_poison_is_dead_lettered_and_blocks_nothing(chaos_rig: Rig) -> None:
    rows = await scenarios.poison(chaos_rig, SMALL)
    assert_held(rows)
    _, dirty = rows
    assert set(dirty.notes["dlq_reasons"]) == {reason for _, reason in scenarios.POISON_KINDS}


async def test_aws_outages(chaos_rig: Rig) -> None:
    rows = await scenarios.aws(chaos_rig, SMALL)
    assert_held(rows)
    sqs, kms, dynamodb = rows
    assert sqs.notes["answers_while_cut"].get("503", 0) > 0
    assert kms.notes["stale_secret_lookups"] > 0
    # Documented behaviour of a status-table outage: the API refuses (503), the worker keeps
    # delivering but cannot record completion, so after recovery it delivers those again
    # (same Idempotency-Key: absorbed by the targets) and then completes them.
    assert dynamodb.notes["answers_while_cut"].get("503", 0) > 0
    assert dynamodb.redeliveries > 0


async def test_graceful_shutdown_under_load(chaos_rig: Rig) -> None:
    rows = await scenarios.graceful(chaos_rig, SMALL)
    # Late deliveries (a receive interrupted by the stop) are timing-dependent here; the
    # deterministic test of that bug is the next one.
    assert_held(rows, except_=("messages received by the stopping process",))
    (row,) = rows
    assert row.notes["in_flight_at_sigterm"] > 0
    assert row.notes["exit_code"] == 0


async def test_sigterm_releases_the_messages_of_an_interrupted_receive(chaos_rig: Rig) -> None:
    """SQS answers every request 1 s late, so at SIGTERM a receive is always in flight with
    messages SQS has already handed over. After the process exits, nothing may stay invisible."""
    resources = await chaos_rig.fresh("stop")
    await chaos_rig.stubs.reset()
    async with tcp_proxy(chaos_rig.stack.direct.sqs_endpoint_url, "slow-sqs") as slow:
        slow.response_delay = 1.0

        def through(url: str) -> str:
            return slow.url + "/" + url.split("://", 1)[1].split("/", 1)[1]

        settings = chaos_rig.settings(
            resources,
            "worker",
            worker={"wait_seconds": 1, "visibility_timeout_seconds": 120, "pollers": 4},
            http={"drain_seconds": 5},
        )
        settings = settings.replace(
            aws=dataclasses.replace(settings.aws, sqs_endpoint_url=slow.url),
            queue=QueueSettings(
                url=through(resources.queue_url), dlq_url=through(resources.dlq_url)
            ),
        )
        messages, _ = await scenarios.sealed_messages(chaos_rig, resources, "stop", 300, 0)
        await scenarios.preload(chaos_rig, resources.queue_url, messages)
        async with chaos_rig.courier(settings, "stop-worker") as worker:
            await verify_some_delivered(chaos_rig)
            worker.process.signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while worker.process.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not worker.process.alive(), "the worker did not exit"
        invisible = await not_visible(chaos_rig, resources.queue_url)
    assert invisible == 0, f"{invisible} messages neither finished nor released"


async def verify_some_delivered(chaos_rig: Rig) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await verify.effects(chaos_rig)
        if found.key_counts("crm"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker delivered nothing")


async def not_visible(chaos_rig: Rig, queue_url: str) -> int:
    async with verify.sqs_client(chaos_rig) as sqs:
        response = await sqs.get_queue_attributes(
            QueueUrl=verify.direct_url(chaos_rig, queue_url),
            AttributeNames=["ApproximateNumberOfMessagesNotVisible"],
        )
    return int(response["Attributes"]["ApproximateNumberOfMessagesNotVisible"])
