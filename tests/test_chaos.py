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
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chaos import report, verify
from chaos.load import LoadResult, Request
from chaos.rig import TARGETS, Rig, rig
from chaos.scenarios import SMALL, aws, common, crash, graceful, legacy, outage, planted, poison
from courier_testkit.strict import AwsCall, MessageEvent, message_events
from courier_testkit.tcpproxy import tcp_proxy
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
    rows = await crash.run(chaos_rig, SMALL)
    assert_held(rows)
    (row,) = rows
    assert row.delivered == row.accepted == SMALL.crash_requests
    assert all(n > 0 for n in row.notes["in_flight_at_kill"]), "the kills hit idle workers"


async def test_legacy_outage_opens_and_closes_the_circuit(chaos_rig: Rig) -> None:
    rows = await outage.run(chaos_rig, SMALL)
    assert_held(rows)
    (row,) = rows
    assert row.notes["circuit_opened"] >= 1
    assert row.notes["circuit_open_at_end"] == 0


async def test_poison_is_dead_lettered_and_blocks_nothing(chaos_rig: Rig) -> None:
    rows = await poison.run(chaos_rig, SMALL)
    assert_held(rows)
    _, dirty = rows
    assert set(dirty.notes["dlq_reasons"]) == {reason for _, reason in planted.POISON_KINDS}
    # The refusing target saw one call per attempt (each refused request was received once).
    # Two poison runs of 600, one target-400 in each, refused once in its one attempt.
    assert dirty.notes["refused_calls_per_attempt"] == {"1/1": 2}
    assert len(dirty.notes["cpu_ms_per_message"]) == 2


async def test_aws_outages(chaos_rig: Rig) -> None:
    rows = await aws.run(chaos_rig, SMALL)
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
    rows = await graceful.run(chaos_rig, SMALL)
    assert_held(rows)
    (row,) = rows
    assert row.notes["in_flight_at_sigterm"] > 0
    # Counted by message id: everything the victim received was deleted or released.
    assert row.notes["victim_received"] > 0
    assert row.notes["orphaned_at_exit"] == 0
    assert (
        row.notes["victim_deleted"] + row.notes["victim_released"] == (row.notes["victim_received"])
    )
    assert row.notes["exit_code"] == 0
    # No attempt went unanswered: no dropped, reset or refused connection, no cut body.
    assert row.notes["client_errors"] == {}, row.notes["client_errors"]


@pytest.mark.timeout(240)  # two fleets of three; a capped target's join wait is ~25 s
async def test_legacy_system_with_real_capacity(chaos_rig: Rig) -> None:
    rows = await legacy.run(chaos_rig, SMALL)
    assert_held(rows)
    steady, halved, throttled, capped = rows
    sizes = legacy.SIZES["small"]
    assert steady.notes["calls"] > 0
    assert halved.notes["capacity"] == f"{sizes.capacity} -> {sizes.capacity // 2}"
    pauses = throttled.notes["pauses"]
    assert len(pauses) == legacy.PROCESSES
    assert all(p["answered_429"] >= 1 and p["calls_in_pause"] == 0 for p in pauses.values())
    assert 0 < capped.notes["peak_concurrent"] <= sizes.fleet_cap


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
        messages, _ = await planted.sealed_messages(chaos_rig, resources, "stop", 300, 0)
        await planted.preload(chaos_rig, resources.queue_url, messages)
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


# -- the accounting itself, on made-up outcomes (no rig) --------------------------------------


def outcome(*requests: tuple[str, int]) -> tuple[LoadResult, verify.Drained]:
    """A load run of (request id, final status) requests, each 202 delivered everywhere."""
    made = []
    for index, (request_id, status) in enumerate(requests):
        made.append(
            Request(
                index,
                f"k{index}",
                f"u{index}",
                status=status,
                request_id=request_id,
                answers=[str(status)],
                answered_at=[1.0],
                accepted_at=1.0 if status == 202 else 0,
            )
        )
    delivered = {r.request_id for r in made if r.status == 202}
    by_target: dict[str, dict[str, Any]] = {
        name: {
            "effects": {f"{rid}:{name}": 1 for rid in delivered},
            "first_at": {f"{rid}:{name}": 2.0 for rid in delivered},
            "requests": {},
        }
        for name, _ in TARGETS
    }
    by_target["idm"] = {"effects": {}, "first_at": {}, "requests": {}}
    drained = verify.Drained(verify.Effects(by_target), True, 3.0, 3.0, 0)
    return LoadResult(made, 0.0, 2.0), drained


def test_summarize_holds_on_a_clean_run() -> None:
    row = report.Row("clean")
    common.summarize(row, *outcome(("a", 202), ("b", 202), ("c", 202)))
    assert row.violations == []
    assert (row.requests, row.accepted, row.refused, row.delivered, row.lost) == (3, 3, 0, 3, 0)


def test_summarize_fails_two_202s_under_one_request_id() -> None:
    """Two accepted requests, one id: the second is invisible to the delivery count by id."""
    row = report.Row("repeated id")
    common.summarize(row, *outcome(("a", 202), ("a", 202), ("c", 202)))
    assert row.lost == 0  # what the count by id alone would have reported
    assert row.violations == ["3 requests answered 202 under only 2 distinct request ids"]


def test_summarize_fails_a_202_without_request_id() -> None:
    row = report.Row("empty id")
    common.summarize(row, *outcome(("a", 202), ("", 202)))
    assert "1 requests answered 202 without a request id" in row.violations


def test_summarize_fails_a_refusal_no_fault_explains() -> None:
    row = report.Row("refused")
    common.summarize(row, *outcome(("a", 202), ("", 503)))
    assert row.refused == 1
    assert row.violations == [
        "1 of 2 requests never accepted, unexplained by the fault (final answers {'503': 1})"
    ]


def test_summarize_counts_refusals_the_fault_explains() -> None:
    row = report.Row("explained")

    def explain(request: Request) -> str | None:
        return "503 while sqs was cut" if request.status == 503 else None

    common.summarize(row, *outcome(("a", 202), ("", 503)), explain=explain)
    assert row.violations == []
    assert row.refused == 1
    assert row.notes["refused_explained"] == {"503 while sqs was cut": 1}
    assert "refused" in report.table([row]).splitlines()[0]


def received(key: str, handle: str, message_id: str, at: float = 1.0) -> MessageEvent:
    return MessageEvent(key, "received", handle, message_id=message_id, at=at)


def test_holdings_by_message_id() -> None:
    events = [
        received("victim", "h1", "m1"),
        received("victim", "h2", "m2"),
        received("victim", "h3", "m3"),
        received("victim", "h4", "m4", at=5.0),
        received("survivor", "h5", "m5"),
        MessageEvent("victim", "deleted", "h1"),
        MessageEvent("victim", "visibility", "h2", visibility_timeout=0),
        # a heartbeat hides m3 for longer: still invisible when the process is gone
        MessageEvent("victim", "visibility", "h3", visibility_timeout=30),
        MessageEvent("victim", "visibility", "h4", visibility_timeout=30),
        MessageEvent("victim", "visibility", "h4", visibility_timeout=0),
    ]
    held = verify.holdings(events, "victim", since=2.0)
    assert held.received == {"m1", "m2", "m3", "m4"}
    assert held.received_before == {"m1", "m2", "m3"}
    assert held.deleted == {"m1"}
    assert held.released == {"m2", "m4"}
    assert held.orphaned == {"m3"}
    # m3 visible again later and deleted by the survivor under a new handle: no longer orphaned
    later = [*events, received("survivor", "h6", "m3"), MessageEvent("survivor", "deleted", "h6")]
    assert verify.holdings(later, "victim", since=2.0).orphaned == set()


def test_graceful_orphans_are_a_violation() -> None:
    row = report.Row("graceful")
    held = verify.holdings([received("victim", "h1", "m1")], "victim", since=2.0)
    graceful.check_orphans(row, held, visibility=8)
    assert row.notes["orphaned_at_exit"] == 1
    assert row.violations == [
        "1 of the 1 messages received by the stopping process were neither deleted nor visible "
        "again when it exited: they wait out the visibility timeout (8s)"
    ]
    silent = report.Row("graceful")
    graceful.check_orphans(silent, verify.holdings([], "victim", since=2.0), visibility=8)
    assert silent.violations == [
        "the ledger saw no message received by the stopping process before SIGTERM"
    ]


def test_ledger_records_messages_received_deleted_and_released() -> None:
    """The strict layer's message ledger, from SQS JSON-protocol requests and answers."""

    def call(operation: str) -> AwsCall:
        return AwsCall("victim", "sqs", operation, ("q",))

    answer = {"Messages": [{"MessageId": "m1", "ReceiptHandle": "h1"}]}
    got = message_events(call("ReceiveMessage"), {}, json.dumps(answer).encode())
    assert [(e.event, e.message_id, e.receipt_handle) for e in got] == [("received", "m1", "h1")]
    entries = [{"Id": "0", "ReceiptHandle": "h1"}, {"Id": "1", "ReceiptHandle": "h2"}]
    done = json.dumps({"Successful": [{"Id": "1"}], "Failed": [{"Id": "0"}]}).encode()
    got = message_events(call("DeleteMessageBatch"), {"Entries": entries}, done)
    assert [(e.event, e.receipt_handle) for e in got] == [("deleted", "h2")]
    released = [{**entry, "VisibilityTimeout": 0} for entry in entries]
    got = message_events(call("ChangeMessageVisibilityBatch"), {"Entries": released}, done)
    assert [(e.event, e.receipt_handle, e.visibility_timeout) for e in got] == [
        ("visibility", "h2", 0)
    ]


def entry(arrival: float, end: float, status: int = 200, path: str = "/billing/p0") -> Any:
    return legacy.TimelineEntry(arrival, end, status, 0.0, path)


def test_legacy_pause_check_allows_calls_in_flight_and_flags_calls_in_the_pause() -> None:
    """After a process's first 429 (answered at 10.0), calls arriving within the grace (0.3 s)
    were already under way; one arriving 2 s later broke the Retry-After pause."""
    calls = [
        entry(9.8, 10.0, 429),
        entry(9.9, 10.05, 429),
        entry(10.2, 10.3, 429),  # started before the 429 was seen: allowed
        entry(15.1, 15.2),
        entry(9.0, 12.0, 200, "/billing/p1"),  # another process's calls are not counted
        entry(12.0, 12.1, 200, "/billing/p1"),
    ]
    pauses = legacy.pauses_after_first_429(calls, ["/billing/p0"], retry_after=5)
    assert pauses["/billing/p0"]["calls_in_pause"] == 0
    assert pauses["/billing/p0"]["next_call_after_s"] == 5.1
    broken = legacy.pauses_after_first_429([*calls, entry(12.0, 12.1)], ["/billing/p0"], 5)
    assert broken["/billing/p0"]["calls_in_pause"] == 1
    assert broken["/billing/p0"]["in_pause_after_s"] == [2.0]
    never = legacy.pauses_after_first_429(calls, ["/billing/p1"], 5)
    assert never["/billing/p1"]["first_429"] is None


def test_legacy_measures_goodput_refusals_and_p99_from_the_timeline() -> None:
    calls = [entry(i / 10, (i + 1) / 10) for i in range(99)] + [entry(5.0, 5.001, 503)]
    measured = legacy.measure(calls, seconds=10, capacity=2, latency=0.1)
    assert measured["goodput_per_s"] == 9.9
    assert measured["goodput_of_max"] == 0.495
    assert measured["refused_share"] == 0.01
    assert measured["p99_vs_unloaded"] == 1.0


def drains(*cpu_ms: float) -> list[poison.Drain]:
    return [poison.Drain(report.Row("run"), 100.0, c) for c in cpu_ms]


def test_poison_that_costs_cpu_per_message_is_a_violation() -> None:
    rows = [report.Row("clean"), report.Row("poison")]
    poison.compare_cost(rows, drains(3.0, 3.1), drains(4.5, 4.6), tolerance=0.15)
    assert rows[1].violations == [
        "CPU per message 4.55 ms with poison is 49% above the clean runs' 3.05 ms "
        "(bound 15%: tolerance 15%, spread between repeats 3%)"
    ]
    assert rows[0].notes["cpu_spread"] == 0.033


def test_poison_cost_within_the_spread_between_repeats_is_no_evidence() -> None:
    rows = [report.Row("clean"), report.Row("poison")]
    poison.compare_cost(rows, drains(2.5, 3.5), drains(3.4, 3.6), tolerance=0.15)
    assert rows[1].violations == []
    assert rows[1].notes["cpu_bound"] == 1.333  # clean runs 2.5 and 3.5: 33% apart
