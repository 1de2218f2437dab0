"""The worker end to end: API → SQS (moto) → worker → three stub legacy systems."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from service.aws import AwsClients
from service.bootstrap import Resources
from service.envelope import EnvelopeCipher
from service.errors import CircuitOpenError, TargetHttpError, TargetPausedError
from service.operations import create_mailbox
from service.secrets.credstash import CredStash
from service.settings import Settings, WorkerSettings
from service.status import RequestCompletedError, RequestState, StatusStore
from service.stubs import LegacyStub
from service.worker.dlq import DeadLetterInfo, DeadLetterQueue
from service.worker.outcomes import Message, Outcome
from service.worker.pipeline import TOLD_EXACT_RECEIVES, retry_delay
from service.worker.replay import ReplayFilter, replay
from tests.chain import (
    Chain,
    chain_courier,
    event_payload,
    eventually,
    mailbox,
    plant,
    plant_request,
    running_chain,
    serving_stubs,
    worker_only_settings,
)


@pytest.fixture
async def chain(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Chain]:
    async with running_chain(settings, fresh, aws) as running:
        yield running


async def test_happy_path_delivers_to_every_target_once(chain: Chain) -> None:
    request_id = await chain.create(mailbox(1))
    record = await chain.wait_status(request_id, "completed")
    assert record["targets"] == {
        "crm": "delivered",
        "billing": "delivered",
        "directory": "delivered",
    }
    for name, stub in chain.targets.items():
        assert stub.effects == {f"{request_id}:{name}": 1}, name
    soap = chain.targets["billing"].calls[0]
    assert soap.headers["Content-Type"].startswith("text/xml")
    assert b"<Username>user00001</Username>" in soap.body
    assert chain.targets["crm"].calls[0].headers["Content-Type"] == "application/json"
    # `completed` is written before the ack, and acks are batched: the delete follows shortly.
    await eventually(lambda: _is_empty(chain), 5, "queue empty")
    for name, stub in chain.targets.items():  # and no second copy was delivered meanwhile
        assert stub.effects == {f"{request_id}:{name}": 1}, name


# --- helpers ---------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def circuit_open(target: str) -> float:
    return sample("courier_target_circuit_open", target=target)


async def dlq_depth(chain: Chain) -> int:
    return await chain.queue_depth(chain.resources.dlq_url)


def attributes(raw: dict[str, Any]) -> dict[str, str]:
    return {name: value["StringValue"] for name, value in raw["MessageAttributes"].items()}


# --- a target goes down, then comes back ------------------------------------------------------


async def test_the_worker_completes_requests_from_the_fields_the_api_sealed(chain: Chain) -> None:
    """The API seals the record's fields into the event; the worker writes `completed` whole
    from them in a shared BatchWriteItem, and the record still answers as the API wrote it."""

    def dynamodb_calls(operation: str) -> float:
        return sample("courier_aws_requests_total", service="dynamodb", operation=operation)

    before = {op: dynamodb_calls(op) for op in ("UpdateItem", "BatchWriteItem", "GetItem")}
    headers = {"Authorization": f"Bearer {chain.token()}", "Idempotency-Key": "sealed-1"}
    async with chain.http.post(f"{chain.url}/v1/mailboxes", json=mailbox(2), headers=headers) as r:
        assert r.status == 202
        keyed = (await r.json())["request_id"]
    unkeyed = await chain.create(mailbox(3))
    for request_id in (keyed, unkeyed):
        record = await chain.wait_status(request_id, "completed")  # its owner may read it
        assert set(record["targets"].values()) == {"delivered"}
        assert record["identity_id"]
    # Only the keyed request's own `accepted` update; both completions were whole records,
    # written without reading the record first.
    assert dynamodb_calls("UpdateItem") - before["UpdateItem"] == 1
    assert dynamodb_calls("BatchWriteItem") > before["BatchWriteItem"]
    # The body hash survived the worker's write: the same key with another body is refused...
    async with chain.http.post(
        f"{chain.url}/v1/mailboxes", json=mailbox(4), headers=headers
    ) as reused:
        assert reused.status == 422
    # ...and with the same body it replays the finished request.
    async with chain.http.post(f"{chain.url}/v1/mailboxes", json=mailbox(2), headers=headers) as r:
        assert (r.status, (await r.json())["status"]) == (202, "completed")


async def test_target_down_then_back_completes_without_calling_delivered_targets_again(
    chain: Chain,
) -> None:
    billing = chain.targets["billing"]
    billing.behaviour.down = True
    retried = sample("courier_messages_processed_total", outcome="retried")
    request_id = await chain.create(mailbox(10))

    progress: dict[str, Any] = {}

    async def shows_progress() -> bool:
        progress.update(await chain.status(request_id))
        return bool(progress["targets"])

    await eventually(shows_progress, 10, "per-target progress in the status record")
    assert progress["status"] == "processing"
    assert progress["targets"] == {
        "crm": "delivered",
        "directory": "delivered",
        "billing": "pending",
    }
    await eventually(lambda: circuit_open("billing") == 1, 10, "billing's circuit to open")
    assert len(billing.calls) >= 3  # breaker_failures
    assert (await chain.status(request_id))["status"] == "processing"
    await eventually(
        lambda: sample("courier_messages_processed_total", outcome="retried") - retried >= 3,
        5,
        "three retries",
    )

    billing.behaviour.down = False
    record = await chain.wait_status(request_id, "completed", timeout=10)
    assert record["targets"] == {
        "crm": "delivered",
        "billing": "delivered",
        "directory": "delivered",
    }
    for name, stub in chain.targets.items():
        assert stub.effects == {f"{request_id}:{name}": 1}, name
    assert len(chain.targets["crm"].calls) == 1  # delivered once, never called again
    assert len(chain.targets["directory"].calls) == 1
    assert circuit_open("billing") == 0
    # Retried with visibility backoff, never in a hot loop: one call per receive, >= 1 s apart.
    times = [call.at for call in billing.calls]
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times)), times
    await eventually(lambda: _is_empty(chain), 5, "queue empty")


async def _is_empty(chain: Chain) -> bool:
    return await chain.queue_depth() == 0


# --- poison messages -------------------------------------------------------------------------


def _edit(body: str, **changes: Any) -> str:
    document = json.loads(body)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = document
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return json.dumps(document)


def _flip_last_byte(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


async def test_poison_messages_go_to_the_dlq_with_reasons_while_healthy_ones_flow(
    chain: Chain, aws: AwsClients
) -> None:
    cipher = EnvelopeCipher(aws.kms, chain.settings.envelope)
    valid = await cipher.seal(create_mailbox.NAME, uuid.uuid4().hex, event_payload(1))
    bodies = {
        "malformed": "this is not JSON at all",
        "unsupported_version": _edit(valid, v=2),
        "undecryptable": _edit(
            valid, key__ek=base64.b64encode(os.urandom(16)).decode()
        ),  # random bytes: no KMS blob
        "tampered": _edit(valid, ct=_flip_last_byte(json.loads(valid)["ct"])),
        "unknown_op": await cipher.seal("delete-universe", uuid.uuid4().hex, {"everything": True}),
        "invalid_payload": await cipher.seal(
            create_mailbox.NAME, uuid.uuid4().hex, {"mailbox": {"username": "incomplete"}}
        ),
    }
    planted: dict[str, str] = {}  # message id -> expected reason
    healthy: list[str] = []
    for index, (reason, body) in enumerate(bodies.items()):
        message_id = await plant(
            aws, chain.resources.queue_url, body, {"op": "create-mailbox", "request_id": reason}
        )
        planted[message_id] = reason
        if index % 2:
            healthy.append(await chain.create(mailbox(20 + index)))
    for request_id in healthy:
        await chain.wait_status(request_id, "completed", timeout=10)
    await eventually(lambda: _dlq_holds(chain, len(planted)), 10, "every poison message in the DLQ")

    moved = await chain.dlq_messages()
    assert len(moved) == len(planted)
    for raw in moved:
        found = attributes(raw)
        info = DeadLetterInfo.of_sqs(raw)
        assert info is not None, found
        source = info.source_message_id
        assert info.reason == planted[source], found
        assert info.receive_count == 1  # at once, not after maxReceiveCount
        assert info.source_queue == chain.resources.queue_url
        assert info.failed_at > 0
        assert found["request_id"] == planted[source]  # original attributes kept
        assert info.target == ""
        assert raw["Body"] == bodies[planted[source]]
    await eventually(lambda: _is_empty(chain), 5, "source queue empty")
    for name, stub in chain.targets.items():
        assert set(stub.effects) == {f"{r}:{name}" for r in healthy}


async def _dlq_holds(chain: Chain, count: int) -> bool:
    return await dlq_depth(chain) == count


async def test_target_rejection_dead_letters_and_fails_the_request(chain: Chain) -> None:
    chain.targets["crm"].behaviour.fixed_status = 400
    request_id = await chain.create(mailbox(30))
    record = await chain.wait_status(request_id, "failed", timeout=10)
    assert record["targets"] == {"crm": "failed", "billing": "delivered", "directory": "delivered"}
    assert "400" in record["error"]
    await eventually(lambda: _dlq_holds(chain, 1), 5, "the rejected message in the DLQ")
    [raw] = await chain.dlq_messages()
    found = attributes(raw)
    info = DeadLetterInfo.of_sqs(raw)
    assert info is not None, found
    assert (info.reason, info.target) == ("target_rejected", "crm")
    assert "400" in info.detail
    assert info.receive_count == 1
    assert found["request_id"] == request_id
    assert info.source_message_id
    assert len(chain.targets["crm"].calls) == 1  # a 4xx is never retried
    assert circuit_open("crm") == 0
    await eventually(lambda: _is_empty(chain), 5, "source queue empty")

    chain.targets["crm"].behaviour.fixed_status = 0  # the next request is not held up
    healthy = await chain.create(mailbox(31))
    await chain.wait_status(healthy, "completed", timeout=10)


# --- crash in the middle of a delivery -------------------------------------------------------


async def test_crash_mid_delivery_is_redelivered_after_the_visibility_timeout(
    settings: Settings, fresh: Resources, aws: AwsClients, tmp_path: Path
) -> None:
    async with serving_stubs() as stubs:
        configured = worker_only_settings(
            settings,
            stubs,
            target_overrides={"billing": {"timeout_seconds": 10}},
            visibility_timeout_seconds=5,
        )
        stubs["billing"].behaviour.latency_seconds = 2
        status = StatusStore(aws.dynamodb, fresh.status_table, 1)
        async with chain_courier(configured, tmp_path) as first:
            await first.wait_ready()
            request_id = await plant_request(aws, configured, 35)
            keys = {name: f"{request_id}:{name}" for name in stubs}
            await eventually(lambda: bool(stubs["billing"].calls), 10, "billing being called")
            await eventually(
                lambda: bool(stubs["crm"].effects and stubs["directory"].effects), 5, "crm, dir"
            )
            assert await first.signal_and_wait(signal.SIGKILL) == -signal.SIGKILL
        record = await status.get(request_id)
        assert record is None or record.state != "completed"

        async with chain_courier(configured, tmp_path) as second:
            await second.wait_ready()

            async def completed() -> bool:
                found = await status.get(request_id)
                return found is not None and found.state == "completed"

            await eventually(completed, 15, "the redelivered message to complete")
            await eventually(lambda: _queue_empty(aws, fresh.queue_url), 5, "queue empty")
    # Redelivered, not released: it came back only when the 5 s visibility timeout ran out.
    crm_calls = stubs["crm"].calls
    assert crm_calls[1].at - crm_calls[0].at >= 4, [call.at for call in crm_calls]
    redelivered_calls = {name: len(stub.calls) for name, stub in stubs.items()}
    for name, stub in stubs.items():
        assert keys[name] in stub.effects, name  # every target applied every key
        assert {call.idempotency_key for call in stub.calls} == {keys[name]}
    # The crash came before any progress write, so the redelivery calls every target again.
    assert all(count >= 2 for count in redelivered_calls.values()), redelivered_calls
    print(  # reported by `pytest -s`
        "crash redeliveries:",
        {name: stub.stats() for name, stub in stubs.items()},
    )


async def _queue_empty(aws: AwsClients, url: str) -> bool:
    response = await aws.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    return set(response["Attributes"].values()) == {"0"}


# --- FIFO ------------------------------------------------------------------------------------


@dataclass
class FirstMatchHeldStub(LegacyStub):
    """Holds the first delivery whose body contains ``marker`` until ``release`` is set."""

    marker: bytes = b""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: bool = False

    async def _deliver(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.marker and self.marker in body:
            self.marker = b""
            self.holding = True
            await asyncio.wait_for(self.release.wait(), 9)
            self.holding = False
        return await super()._deliver(request)


async def test_fifo_groups_progress_independently_and_stay_in_order(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    slow = FirstMatchHeldStub(name="crm", marker=b'"username":"alpha"')
    async with running_chain(
        fresh.apply_to(settings, fifo=True),
        fresh,
        aws,
        stubs={"crm": slow},
        target_overrides={"crm": {"timeout_seconds": 10}},
    ) as chain:
        sent: dict[str, list[str]] = {"alpha": [], "bravo": []}
        for index in range(5):
            for username, ids in sent.items():
                chain.idm.identities.clear()  # the stub IdM refuses a username twice
                body = mailbox(index, username=username, display_name=f"{username} {index}")
                ids.append(await chain.create(body))
        for request_id in sent["bravo"]:
            await chain.wait_status(request_id, "completed", timeout=10)
        # bravo finished while alpha's first message was held at crm.
        assert slow.holding
        for request_id in sent["alpha"]:  # the rest of alpha waits behind its first message
            assert (await chain.status(request_id))["status"] != "completed"
        slow.release.set()
        for request_id in sent["alpha"]:
            await chain.wait_status(request_id, "completed", timeout=10)

        for name, stub in chain.targets.items():
            order = [call.idempotency_key.split(":")[0] for call in stub.calls]
            for username, ids in sent.items():
                first_calls = list(dict.fromkeys(r for r in order if r in ids))
                assert first_calls == ids, (name, username)
            assert sum(stub.effects.values()) == 10, name


# --- a poison message is never lost on its way to the DLQ -----------------------------------


def entry_failures(operation: str) -> float:
    """courier_sqs_entry_failures_total for ``operation``, summed over error codes."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name != "courier_sqs_entry_failures":
            continue
        for found in family.samples:
            if found.name.endswith("_total") and found.labels.get("operation") == operation:
                total += found.value
    return total


async def test_poison_stays_queued_and_not_failed_until_its_dlq_copy_exists(
    chain: Chain, aws: AwsClients
) -> None:
    resources = chain.resources
    missing = resources.dlq_url.rsplit("/", 1)[0] + f"/no-such-dlq-{uuid.uuid4().hex[:8]}"
    chain.poller.dead_letter = DeadLetterQueue(aws.sqs, missing, resources.queue_url).move
    crm = chain.targets["crm"]
    crm.behaviour.fixed_status = 400
    failures = entry_failures("deadletter")
    request_id = await chain.create(mailbox(90))

    await eventually(lambda: entry_failures("deadletter") > failures, 10, "a failed DLQ move")
    assert len(crm.calls) == 1
    # The DLQ has no copy, so the request is not terminal and the message is still queued.
    assert (await chain.status(request_id))["status"] != "failed"
    assert await chain.queue_depth() == 1
    assert await dlq_depth(chain) == 0

    chain.poller.dead_letter = DeadLetterQueue(
        aws.sqs, resources.dlq_url, resources.queue_url
    ).move  # the DLQ works again
    record = await chain.wait_status(request_id, "failed", timeout=20)
    assert record["targets"]["crm"] == "failed"
    await eventually(lambda: _dlq_holds(chain, 1), 5, "the poison in the DLQ")
    [raw] = await chain.dlq_messages()
    info = DeadLetterInfo.of_sqs(raw)
    assert info is not None
    assert (info.reason, info.target) == ("target_rejected", "crm")
    assert info.receive_count == 2  # the redelivery that found the DLQ working
    assert attributes(raw)["request_id"] == request_id
    assert len(crm.calls) == 2  # retried as poison again, never acknowledged as a duplicate
    await eventually(lambda: _is_empty(chain), 5, "source queue empty")


# --- every message courier sends fits SQS's 10 attributes ------------------------------------

SQS_MAX_ATTRIBUTES = 10


async def _dlq_peek(chain: Chain) -> list[dict[str, Any]]:
    """The DLQ's messages, made visible again at once (so a replay can take them)."""
    found = await chain.dlq_messages()
    for raw in found:
        await chain.aws.sqs.change_message_visibility(
            QueueUrl=chain.resources.dlq_url,
            ReceiptHandle=raw["ReceiptHandle"],
            VisibilityTimeout=0,
        )
    return found


async def test_every_message_courier_sends_has_at_most_10_attributes(
    chain: Chain, aws: AwsClients
) -> None:
    received: list[dict[str, str]] = []
    handle = chain.poller.handler

    async def recording(message: Message) -> Outcome:
        received.append(dict(message.attributes))  # as SQS delivered them to the worker
        return await handle(message)

    chain.poller.handler = recording
    chain.targets["crm"].behaviour.fixed_status = 400
    request_id = await chain.create(mailbox(91))  # API → work queue
    await chain.wait_status(request_id, "failed", timeout=10)
    await eventually(lambda: _dlq_holds(chain, 1), 5, "the first DLQ copy")
    [first] = await _dlq_peek(chain)  # worker → DLQ
    assert len(first["MessageAttributes"]) <= SQS_MAX_ATTRIBUTES, first["MessageAttributes"]

    report = await replay(
        aws.sqs, chain.resources.dlq_url, chain.resources.queue_url, ReplayFilter()
    )
    assert report.moved == 1  # replay → work queue; crm still refuses

    async def dead_lettered_again() -> bool:
        found = await _dlq_peek(chain)
        return len(found) == 1 and "replayed" in found[0]["MessageAttributes"]

    await eventually(dead_lettered_again, 15, "the replayed copy dead-lettered again")
    [again] = await _dlq_peek(chain)  # worker → DLQ, a replayed message
    assert len(again["MessageAttributes"]) <= SQS_MAX_ATTRIBUTES, again["MessageAttributes"]
    info = DeadLetterInfo.of_sqs(again)
    assert info is not None
    assert (info.reason, info.target) == ("target_rejected", "crm")
    assert [found.get("replayed") for found in received] == [None, "1"]
    assert all(len(found) <= SQS_MAX_ATTRIBUTES for found in received), received
    for raw in (first, again):
        names = set(raw["MessageAttributes"])
        assert {"op", "request_id", "traceparent", "dlq"} <= names, names
        assert not [name for name in names if name.startswith("dlq_")], names


async def test_a_message_with_10_attributes_is_still_dead_lettered_within_the_limit(
    chain: Chain, aws: AwsClients
) -> None:
    crowded = {"op": "create-mailbox", "request_id": "crowded"}
    crowded.update({f"x{index}": "v" for index in range(SQS_MAX_ATTRIBUTES - len(crowded))})
    await plant(aws, chain.resources.queue_url, "this is not JSON at all", crowded)
    await eventually(lambda: _dlq_holds(chain, 1), 10, "the poison in the DLQ")
    [raw] = await chain.dlq_messages()
    found = attributes(raw)
    assert len(found) <= SQS_MAX_ATTRIBUTES, found
    assert found["request_id"] == "crowded"  # courier's own attributes are the ones kept
    info = DeadLetterInfo.of_sqs(raw)
    assert info is not None
    assert info.reason == "malformed"


# --- a copy of a finished request is dropped without calling any target ----------------------


async def _plant_copy(chain: Chain, request_id: str, index: int, extra: dict[str, str]) -> str:
    cipher = EnvelopeCipher(chain.aws.kms, chain.settings.envelope)
    body = await cipher.seal(create_mailbox.NAME, request_id, event_payload(index))
    attributes = {"op": create_mailbox.NAME, "request_id": request_id, **extra}
    return await plant(chain.aws, chain.resources.queue_url, body, attributes)


async def test_a_resent_copy_of_a_finished_request_calls_no_target(
    chain: Chain, aws: AwsClients
) -> None:
    status = StatusStore(aws.dynamodb, chain.resources.status_table, 1)
    done, failed, halfway = (uuid.uuid4().hex for _ in range(3))
    everywhere = {name: "delivered" for name in chain.targets}
    await status.update(done, state=RequestState.COMPLETED, targets=everywhere, op="create-mailbox")
    await status.update(
        failed, state=RequestState.FAILED, targets={"crm": "failed"}, op="create-mailbox"
    )
    await status.update(
        halfway,
        state=RequestState.PROCESSING,
        targets={"crm": "delivered", "billing": "pending", "directory": "pending"},
        op="create-mailbox",
    )
    duplicates = sample("courier_messages_processed_total", outcome="duplicate")
    # First receives (receive count 1) of copies the API re-sent: only `attempt` marks them.
    for index, request_id in enumerate((done, failed, halfway)):
        await _plant_copy(chain, request_id, 92 + index, {"attempt": "2"})

    async def state(request_id: str) -> str:
        record = await status.get(request_id)
        assert record is not None
        return str(record.state)

    async def halfway_completed() -> bool:
        return await state(halfway) == "completed"

    await eventually(halfway_completed, 10, "the unfinished copy to complete")
    await eventually(
        lambda: sample("courier_messages_processed_total", outcome="duplicate") - duplicates == 2,
        10,
        "both finished copies dropped",
    )
    await eventually(lambda: _is_empty(chain), 5, "queue empty")
    for name, stub in chain.targets.items():
        expected = {} if name == "crm" else {f"{halfway}:{name}": 1}  # crm had it already
        assert stub.effects == expected, name
    assert await state(done) == "completed"
    assert await state(failed) == "failed"


# --- a target whose credential is missing is misconfigured, not poison -----------------------


async def test_missing_target_secret_retries_without_dead_lettering_until_fixed(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    # The CredStash table is shared by the session: a name of its own, so no other test's
    # secret can satisfy it.
    secret = f"courier.crm.token-{uuid.uuid4().hex[:8]}"
    async with running_chain(
        settings, fresh, aws, target_overrides={"crm": {"secret": secret}}
    ) as chain:
        retried = sample("courier_messages_processed_total", outcome="retried")
        misconfigured = sample("courier_target_calls_total", target="crm", outcome="misconfigured")
        request_id = await chain.create(mailbox(95))
        await eventually(
            lambda: sample("courier_messages_processed_total", outcome="retried") - retried >= 2,
            15,
            "two retries",
        )
        record = await chain.status(request_id)
        assert record["status"] == "processing", record
        assert record["targets"]["crm"] == "pending"
        assert await dlq_depth(chain) == 0
        assert chain.targets["crm"].calls == []  # never called without its credential
        found = sample("courier_target_calls_total", target="crm", outcome="misconfigured")
        assert found - misconfigured >= 2

        # The operator stores the secret: the next retry delivers.
        await CredStash(aws.dynamodb, aws.kms, fresh.secrets_table).put(
            secret, "crm-token", kms_key=fresh.credstash_key_arn
        )
        await chain.wait_status(request_id, "completed", timeout=15)
        [call] = chain.targets["crm"].calls
        assert call.headers["Authorization"] == "Bearer crm-token"
        assert await dlq_depth(chain) == 0


# --- completed is final ----------------------------------------------------------------------


async def test_a_later_copy_never_turns_a_completed_request_back(
    fresh: Resources, aws: AwsClients
) -> None:
    """Two copies of one request can be in flight (an SQS duplicate, an API re-send): the one
    that ends last must not write processing or failed over the other's completed."""
    status = StatusStore(aws.dynamodb, fresh.status_table, 1)
    request_id = uuid.uuid4().hex
    await status.update(request_id, state=RequestState.PROCESSING, targets={"crm": "delivered"})
    await status.update(request_id, state=RequestState.COMPLETED, targets={"crm": "delivered"})
    for late in (RequestState.PROCESSING, RequestState.FAILED, RequestState.COMPLETED):
        with pytest.raises(RequestCompletedError):
            await status.update(request_id, state=late, targets={"crm": "pending"})
    record = await status.get(request_id)
    assert record is not None
    assert record.state is RequestState.COMPLETED
    assert record.targets == {"crm": "delivered"}


async def test_a_target_s_retry_after_sets_when_it_is_called_again_not_the_backoff(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    # A 30 s backoff would hold the message far longer than the 1 s the target asks for.
    async with running_chain(
        settings, fresh, aws, backoff_base_seconds=30, backoff_max_seconds=60
    ) as chain:
        billing = chain.targets["billing"]
        billing.behaviour.fixed_status = 429
        billing.behaviour.retry_after_seconds = 1
        request_id = await chain.create(mailbox(40))
        await eventually(lambda: len(billing.calls) >= 1, 10, "billing's first call")
        billing.behaviour.fixed_status = 0
        await chain.wait_status(request_id, "completed", timeout=15)
        first, second = billing.calls[0].at, billing.calls[1].at
        assert 0.9 <= second - first < 10, (first, second)  # held in flight, not bounced
        assert billing.effects == {f"{request_id}:billing": 1}
        assert len(chain.targets["crm"].calls) == 1  # the retry skipped the delivered ones


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [
        ([TargetPausedError("billing", 40.0)], 40.0, 40.0),  # longer than a hold: its length
        ([TargetHttpError("billing", 503, retry_after=0.0)], 1.0, 1.0),  # never a receive spin
        ([TargetPausedError("crm", 40.0), TargetHttpError("billing", 503)], 40.0, 40.0),
        ([TargetHttpError("billing", 503)], 4.0, 8.0),  # backoff on the 3rd receive
        ([CircuitOpenError("billing", 20.0)], 20.0, 20.0),
        ([CircuitOpenError("billing", 1.0), TargetPausedError("crm", 2.0)], 4.0, 8.0),
    ],
    ids=["pause", "zero", "pause-and-unknown", "no-word", "circuit", "circuit-and-pause"],
)
def test_retry_delay_follows_what_the_targets_said(
    failures: list[BaseException], low: float, high: float
) -> None:
    message = Message("m-1", "r-1", "{}", {}, receive_count=TOLD_EXACT_RECEIVES, sent_at=0.0)
    settings = WorkerSettings(backoff_base_seconds=2, backoff_max_seconds=900)
    assert low <= retry_delay(message, failures, settings) <= high


def test_a_told_wait_gives_way_to_the_backoff_once_receives_run_low() -> None:
    # A target in maintenance answering Retry-After: 5 for hours must not spend a message's
    # receives every 5 s: SQS would dead-letter it after maxReceiveCount.
    failures = [TargetPausedError("billing", 5.0)]
    later = Message("m-1", "r-1", "{}", {}, receive_count=TOLD_EXACT_RECEIVES + 5, sent_at=0.0)
    settings = WorkerSettings(backoff_base_seconds=2, backoff_max_seconds=900)
    assert retry_delay(later, failures, settings) >= 2 * 2 ** (TOLD_EXACT_RECEIVES + 4) / 2
