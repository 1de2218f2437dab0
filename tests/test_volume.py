"""Volume acceptance: 5,000 create-mailbox events, three targets answering in 20 ms, none lost.

SQS is fauxqs (moto's SQS slows down as a queue fills). KMS (the data key) is moto's session
server. The status table is dynalite (npm, Node), started by ``courier_testkit.aws.dynalite``, the
launcher the benchmarks use too: moto spends ~8 ms of CPU parsing each UpdateItem
expression and capped this test at 80-120 msg/s (42-64 s on a 2-vCPU machine) even in a
process of its own; dynalite takes ~1 ms, so courier itself is what is measured. The report
below shows the status-table calls (completions share BatchWriteItem requests) and how busy
dynalite was.

The events are sealed the way the API seals them and pre-loaded with SendMessageBatch; then
courier runs in-process with ``role = worker`` and default worker settings (only the
long-poll wait is shortened) against three stub legacy systems. The test prints wall time,
throughput, SQS requests per message, KMS and DynamoDB calls and where the CPU went.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

import pytest
from aiobotocore.session import get_session
from prometheus_client.metrics import MetricWrapperBase

from courier_testkit.aws import dynalite
from courier_testkit.events import seal_events, send_events
from courier_testkit.processes import Server
from service import daemon, metrics
from service.aws import AwsClients, client_config
from service.bootstrap import (
    ResourceNames,
    Resources,
    ensure_queue,
    ensure_table,
    work_queue_attributes,
)
from service.envelope import EnvelopeCipher
from service.settings import (
    AwsSettings,
    EnvelopeSettings,
    QueueSettings,
    Settings,
    TargetFormat,
    TargetSettings,
    WorkerSettings,
)
from service.stubs import LegacyStub
from tests.chain import TARGETS, mailbox

if TYPE_CHECKING:  # at run time it is loaded only as the plugin below, so pytest can rewrite it
    from tests.fauxqs import FauxqsServer

pytest_plugins = ("tests.fauxqs",)
pytestmark = pytest.mark.volume

MESSAGES = 5_000
TARGET_LATENCY_SECONDS = 0.02
LOAD_CONCURRENCY = 16
# ~20-25 s on a 2-vCPU machine with dynalite; the bounds leave room for a slow run.
DELIVERY_DEADLINE_SECONDS = 100.0
TEST_TIMEOUT_SECONDS = 150
POLL_SECONDS = 0.1


@pytest.fixture
async def status_dynamodb() -> AsyncIterator[Server]:
    """dynalite in a process of its own, for the status table (stopped after the test)."""
    async with dynalite() as server:
        yield server


@contextlib.asynccontextmanager
async def _raw_client(service: str, endpoint_url: str, aws: AwsSettings) -> AsyncIterator[Any]:
    """The test's own client: its requests do not count in courier's metrics."""
    async with get_session().create_client(
        service, region_name=aws.region, endpoint_url=endpoint_url, config=client_config(aws)
    ) as client:
        yield client


@pytest.fixture
async def fauxqs_sqs(fauxqs_endpoint: str, aws_settings: AwsSettings) -> AsyncIterator[Any]:
    async with _raw_client("sqs", fauxqs_endpoint, aws_settings) as client:
        yield client


async def _queue_pair(sqs: Any, prefix: str) -> QueueSettings:
    """A work queue and its DLQ on fauxqs, with the attributes ``bootstrap`` gives them."""
    names = ResourceNames(prefix=prefix)
    dlq_url = await ensure_queue(sqs, names.dlq, {"MessageRetentionPeriod": str(14 * 86400)})
    url = await ensure_queue(sqs, names.queue, await work_queue_attributes(sqs, names, dlq_url))
    return QueueSettings(url=url, dlq_url=dlq_url)


async def _status_table(endpoint_url: str, aws: AwsSettings, table: str) -> None:
    async with _raw_client("dynamodb", endpoint_url, aws) as dynamodb:
        # dynalite has no UpdateTimeToLive; expiry plays no part in this test.
        await ensure_table(dynamodb, table, [("pk", "HASH")])


async def _depth(sqs: Any, queue_url: str) -> int:
    """Messages in the queue: visible, in flight and delayed."""
    response = await sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )
    return sum(int(value) for value in response["Attributes"].values())


def _samples(metric: MetricWrapperBase) -> Counter[tuple[str, ...]]:
    """A metric's current samples, keyed by (sample suffix, *label values)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for family in metric.collect():
        for sample in family.samples:
            suffix = sample.name.removeprefix(family.name)
            counts[(suffix, *sample.labels.values())] += int(sample.value)
    return counts


def _snapshot() -> dict[str, Counter[tuple[str, ...]]]:
    return {
        "aws": _samples(metrics.aws_requests),
        "processed": _samples(metrics.messages_processed),
        "received": _samples(metrics.messages_received),
        "batch": _samples(metrics.sqs_batch_size),
    }


def _delta(
    after: dict[str, Counter[tuple[str, ...]]], before: dict[str, Counter[tuple[str, ...]]]
) -> dict[str, Counter[tuple[str, ...]]]:
    return {name: after[name] - before[name] for name in after}


def _calls(requests: Counter[tuple[str, ...]], service: str) -> dict[str, int]:
    return {
        operation: int(count)
        for (suffix, name, operation), count in sorted(requests.items())
        if suffix == "_total" and name == service
    }


def _worker_settings(
    settings: Settings,
    fauxqs_endpoint: str,
    dynamodb_endpoint: str,
    queues: QueueSettings,
    urls: dict[str, str],
) -> Settings:
    targets = tuple(
        TargetSettings(name=name, url=f"{urls[name]}/{name}", format=cast(TargetFormat, fmt))
        for name, fmt in TARGETS
    )
    aws = dataclasses.replace(
        settings.aws, sqs_endpoint_url=fauxqs_endpoint, dynamodb_endpoint_url=dynamodb_endpoint
    )
    return settings.replace(
        role="worker",
        aws=aws,
        queue=queues,
        targets=targets,
        # Default worker settings; only a short long-poll, so shutdown does not wait 20 s.
        worker=WorkerSettings(wait_seconds=1),
        http=dataclasses.replace(settings.http, port=0, health_port=0, drain_seconds=5),
    )


async def _until(condition: Callable[[], bool], deadline: float, what: Callable[[], str]) -> float:
    while not condition():
        assert time.perf_counter() < deadline, f"timed out waiting for {what()}"
        await asyncio.sleep(POLL_SECONDS)
    return time.perf_counter()


@pytest.mark.timeout(TEST_TIMEOUT_SECONDS)
async def test_5000_messages_to_three_targets_none_lost(
    fauxqs_server: FauxqsServer,
    fauxqs_endpoint: str,
    fauxqs_sqs: Any,
    status_dynamodb: Server,
    settings: Settings,
    fresh: Resources,
    aws: AwsClients,
    aws_settings: AwsSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queues = await _queue_pair(fauxqs_sqs, f"volume-{uuid.uuid4().hex[:8]}")
    await _status_table(status_dynamodb.url, aws_settings, fresh.status_table)
    load_started = time.perf_counter()
    cipher = EnvelopeCipher(aws.kms, EnvelopeSettings(kms_key_id=fresh.data_key_arn))
    events = await seal_events(cipher, MESSAGES, mailbox, tag="volume", subject="volume-test")
    sealed = time.perf_counter()
    await send_events(fauxqs_sqs, queues.url, events, LOAD_CONCURRENCY)
    loaded = time.perf_counter()
    assert await _depth(fauxqs_sqs, queues.url) == MESSAGES

    stubs = {name: LegacyStub(name=name) for name, _ in TARGETS}
    for stub in stubs.values():
        stub.behaviour.latency_seconds = TARGET_LATENCY_SECONDS
    expected = {name: {f"{event.request_id}:{name}" for event in events} for name in stubs}

    def progress() -> str:
        counts = {name: len(stub.effects) for name, stub in stubs.items()}
        return f"deliveries {counts} after {time.perf_counter() - started:.1f}s"

    async with contextlib.AsyncExitStack() as stack:
        urls = {
            name: await stack.enter_async_context(stub.serving()) for name, stub in stubs.items()
        }
        configured = _worker_settings(settings, fauxqs_endpoint, status_dynamodb.url, queues, urls)
        before = _snapshot()
        cpu_before, loop_cpu_before = time.process_time(), time.thread_time()
        fauxqs_cpu_before = fauxqs_server.cpu_seconds()
        dynalite_cpu_before = status_dynamodb.cpu_seconds()
        started = time.perf_counter()
        deadline = started + DELIVERY_DEADLINE_SECONDS
        await stack.enter_async_context(daemon.serving(configured))
        delivered = await _until(
            lambda: all(len(stub.effects) >= MESSAGES for stub in stubs.values()),
            deadline,
            progress,
        )
        # Acknowledgements follow deliveries in batches: wait for the deletes to land.
        while (depth := await _depth(fauxqs_sqs, queues.url)) and time.perf_counter() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        acked = time.perf_counter()
        counted = _delta(_snapshot(), before)
        cpu = time.process_time() - cpu_before
        loop_cpu = time.thread_time() - loop_cpu_before
        fauxqs_cpu = fauxqs_server.cpu_seconds() - fauxqs_cpu_before
        dynalite_cpu = status_dynamodb.cpu_seconds() - dynalite_cpu_before

    dlq_depth = await _depth(fauxqs_sqs, queues.dlq_url)
    lost = {name: len(expected[name] - set(stub.effects)) for name, stub in stubs.items()}
    unexpected = {name: len(set(stub.effects) - expected[name]) for name, stub in stubs.items()}
    duplicates = {
        name: sum(count - 1 for count in stub.effects.values() if count > 1)
        for name, stub in stubs.items()
    }
    processed = {
        outcome: int(n)
        for (suffix, outcome), n in counted["processed"].items()
        if suffix == "_total"
    }
    sqs, kms = _calls(counted["aws"], "sqs"), _calls(counted["aws"], "kms")
    dynamodb = _calls(counted["aws"], "dynamodb")
    sqs_total = sum(sqs.values())
    received = counted["received"][("_total",)]
    deletes = counted["batch"][("_sum", "delete")], counted["batch"][("_count", "delete")]
    wall = delivered - started
    report = [
        "",
        f"volume: {MESSAGES} messages x {len(stubs)} targets answering in "
        f"{TARGET_LATENCY_SECONDS * 1000:.0f} ms; SQS fauxqs, status table dynalite, "
        "KMS moto",
        f"  load: sealed in {sealed - load_started:.2f}s, SendMessageBatch in {loaded - sealed:.2f}s",
        f"  wall: every target had every message after {wall:.1f}s = {MESSAGES / wall:.0f} msg/s; "
        f"queue empty after {acked - started:.1f}s",
        f"  SQS: {sqs_total} requests = {sqs_total / MESSAGES:.3f} per message {sqs}; "
        f"{received / max(1, sqs.get('ReceiveMessage', 0)):.1f} messages per receive, "
        f"{deletes[0] / max(1, deletes[1]):.1f} per DeleteMessageBatch",
        f"  KMS: {sum(kms.values())} calls by the worker {kms}",
        f"  DynamoDB: {sum(dynamodb.values())} calls {dynamodb}; dynalite's CPU "
        f"{dynalite_cpu:.1f}s = {dynalite_cpu / max(1, sum(dynamodb.values())) * 1000:.1f} ms per call, "
        f"{dynalite_cpu / wall:.0%} of a core",
        f"  CPU: test process {cpu:.1f}s = {cpu / MESSAGES * 1000:.2f} ms per message "
        f"({loop_cpu:.1f}s in the event loop: courier, stubs), {cpu / wall:.0%} of a core; "
        f"fauxqs {fauxqs_cpu:.1f}s",
        f"  outcomes {processed}; lost {lost}; duplicates {duplicates}; "
        f"DLQ {dlq_depth}; left in queue {depth}",
    ]
    with capsys.disabled():
        print("\n".join(report))

    assert lost == dict.fromkeys(stubs, 0), f"messages lost: {lost}"
    assert unexpected == dict.fromkeys(stubs, 0)
    assert dlq_depth == 0, "messages were dead-lettered"
    assert depth == 0, "messages were delivered but never deleted"
    assert duplicates == dict.fromkeys(stubs, 0), f"duplicate deliveries: {duplicates}"
    assert processed.get("completed") == MESSAGES, processed
