"""The invariants, measured from the outside: effects at the stubs, the DLQ, the queue, statuses.

- every request answered 202 (and not meant to fail) has an effect at every target: else lost;
- a request's effect arrives under one key per target: a username delivered under two request
  ids is a duplicate effect (no idempotency key can absorb it); the same key delivered twice
  is a redelivery (absorbed by a target that honours Idempotency-Key, reported);
- the DLQ holds exactly the poison, each with the reason expected for its kind;
- a stopping process leaves no message it received invisible: counted by message id from the
  strict proxy's message ledger (every SQS message received, deleted or made visible again,
  by access key), not from queue depths;
- what courier says about itself in its log is found by the fields of its JSON lines
  (``log_events``: by ``event``), not by the wording of their message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiobotocore.session import get_session

from chaos.rig import TARGETS, Rig
from courier_testkit.strict import MessageEvent
from service.aws import client_config
from service.bootstrap import Resources
from service.worker.dlq import DeadLetterInfo

POLL_SECONDS = 0.25


@dataclass
class Effects:
    """Every target's recorded deliveries."""

    by_target: dict[str, dict[str, Any]]

    def key_counts(self, target: str) -> dict[str, int]:
        counts: dict[str, int] = self.by_target[target]["effects"]
        return counts

    def delivered_everywhere(self, request_ids: Iterable[str]) -> set[str]:
        ids = set(request_ids)
        for target, _ in TARGETS:
            keys = self.key_counts(target)
            ids = {i for i in ids if f"{i}:{target}" in keys}
        return ids

    def refused(self, target: str) -> dict[str, int]:
        """Calls ``target`` answered 400 for the reject marker, by Idempotency-Key."""
        counts: dict[str, int] = self.by_target[target].get("refused", {})
        return counts

    def redeliveries(self, request_ids: Collection[str] | None = None) -> int:
        total = 0
        for target, _ in TARGETS:
            for key, count in self.key_counts(target).items():
                if request_ids is None or key.split(":", 1)[0] in request_ids:
                    total += max(0, count - 1)
        return total

    def duplicate_effects(self, usernames: Collection[str] | None = None) -> int:
        """Usernames delivered (or identities created) under more than one request id."""
        total = 0
        for name in [*(t for t, _ in TARGETS), "idm"]:
            for username, ids in self.by_target[name]["requests"].items():
                if usernames is None or username in usernames:
                    total += max(0, len(ids) - 1)
        return total

    def last_effect_at(self, request_id: str) -> float | None:
        times = [self.by_target[t]["first_at"].get(f"{request_id}:{t}") for t, _ in TARGETS]
        return None if any(t is None for t in times) else max(times)  # type: ignore[type-var]


async def effects(rig: Rig) -> Effects:
    names = [*(t for t, _ in TARGETS), "idm"]
    found = await asyncio.gather(*(rig.stubs.effects(name) for name in names))
    return Effects(dict(zip(names, found, strict=True)))


def sqs_client(rig: Rig) -> Any:
    return get_session().create_client(
        "sqs",
        region_name=rig.aws.region,
        endpoint_url=rig.stack.direct.sqs_endpoint_url,
        config=client_config(rig.stack.direct),
    )


def direct_url(rig: Rig, url: str) -> str:
    return rig.stack.direct.sqs_endpoint_url + "/" + url.split("://", 1)[1].split("/", 1)[1]


async def depth(rig: Rig, queue_url: str) -> int:
    """Messages visible, in flight or delayed."""
    async with sqs_client(rig) as sqs:
        response = await sqs.get_queue_attributes(
            QueueUrl=direct_url(rig, queue_url),
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
    return sum(int(v) for v in response["Attributes"].values())


async def dlq_count(rig: Rig, resources: Resources) -> int:
    """Messages in the DLQ (visible or not), without receiving them."""
    return await depth(rig, resources.dlq_url)


async def dlq_messages(rig: Rig, resources: Resources) -> list[dict[str, Any]]:
    """Every message in the DLQ (received with a long visibility so each is seen once)."""
    found: dict[str, dict[str, Any]] = {}
    async with sqs_client(rig) as sqs:
        for _ in range(1000):
            response = await sqs.receive_message(
                QueueUrl=direct_url(rig, resources.dlq_url),
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=300,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
            batch = response.get("Messages", [])
            if not batch:
                break
            for raw in batch:
                found[raw["MessageId"]] = raw
    return list(found.values())


def dlq_reasons(messages: Iterable[dict[str, Any]]) -> Counter[str]:
    """Reason per DLQ message; '(redrive)' for those SQS moved after maxReceiveCount (what
    courier's own last-receive dead-lettering missed)."""
    reasons: Counter[str] = Counter()
    for raw in messages:
        reasons[dlq_reason(raw)] += 1
    return reasons


def dlq_reason(raw: dict[str, Any]) -> str:
    """Why courier dead-lettered a received DLQ message; '(redrive)' if SQS moved it."""
    info = DeadLetterInfo.of_sqs(raw)
    return info.reason if info else "(redrive)"


async def statuses(rig: Rig, resources: Resources) -> Counter[str]:
    """Status records by state (a scan of the status table on dynalite)."""
    return Counter((await states_by_id(rig, resources)).values())


async def states_by_id(rig: Rig, resources: Resources) -> dict[str, str]:
    """Request id -> state of every request's status record (a scan of the status table)."""
    states: dict[str, str] = {}
    async with get_session().create_client(
        "dynamodb",
        region_name=rig.aws.region,
        endpoint_url=rig.stack.direct.dynamodb_endpoint_url,
        config=client_config(rig.stack.direct),
    ) as dynamodb:
        paginator = dynamodb.get_paginator("scan")
        async for page in paginator.paginate(TableName=resources.status_table):
            for item in page.get("Items", []):
                key = item.get("pk", {}).get("S", "")
                if not key.startswith("req#"):
                    continue  # not a request: e.g. the fleet's membership (worker/fleet.py)
                states[key.removeprefix("req#")] = item.get("state", {}).get("S", "?")
    return states


@contextlib.asynccontextmanager
async def message_ledger(rig: Rig) -> AsyncIterator[None]:
    """The strict proxy's message ledger, emptied and on inside the block (off after)."""
    proxy = rig.stack.proxy
    assert proxy is not None, "the rig runs without the strict proxy"
    url = next(iter(proxy.urls.values())) + "/_proxy/ledger"

    async def switch(on: bool) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.post(url, json={"on": on}) as response,
        ):
            response.raise_for_status()

    await switch(True)
    await proxy.reset()
    try:
        yield
    finally:
        await switch(False)


async def message_events(rig: Rig) -> list[MessageEvent]:
    """The strict proxy's message ledger so far."""
    assert rig.stack.proxy is not None, "the rig runs without the strict proxy"
    calls = await rig.stack.proxy.calls()
    return [MessageEvent(**event) for event in calls.get("messages", [])]


@dataclass
class Holdings:
    """What became of the messages one access key received, by message id."""

    received: set[str] = field(default_factory=set)
    received_before: set[str] = field(default_factory=set)  # before the ``since`` instant
    deleted: set[str] = field(default_factory=set)  # by anyone
    released: set[str] = field(default_factory=set)  # made visible again (timeout 0) by the key
    orphaned: set[str] = field(default_factory=set)  # neither: invisible until the timeout


def holdings(events: Iterable[MessageEvent], access_key: str, since: float) -> Holdings:
    """Sort every message ``access_key`` received into deleted, released or orphaned.

    A message is settled when any consumer deleted it, or when the last thing ``access_key``
    did with its newest receipt handle of it was to make it visible again at once. Anything else
    (never touched again, or only hidden longer, as a heartbeat does) leaves it invisible until
    the visibility timeout runs out: an orphan.
    """
    events = list(events)
    message_of = {e.receipt_handle: e.message_id for e in events if e.event == "received"}
    newest: dict[str, str] = {}  # message id -> the key's newest receipt handle of it
    last: dict[str, MessageEvent] = {}  # receipt handle -> the key's last settling event
    found = Holdings()
    for event in events:
        if event.event == "received" and event.access_key == access_key:
            found.received.add(event.message_id)
            if event.at < since:
                found.received_before.add(event.message_id)
            newest[event.message_id] = event.receipt_handle
        elif event.event == "deleted" and event.receipt_handle in message_of:
            found.deleted.add(message_of[event.receipt_handle])
        if event.event != "received" and event.access_key == access_key:
            last[event.receipt_handle] = event
    for message_id, handle in newest.items():
        settled = last.get(handle)
        if message_id in found.deleted:
            continue
        if (
            settled is not None
            and settled.event == "visibility"
            and settled.visibility_timeout == 0
        ):
            found.released.add(message_id)
        else:
            found.orphaned.add(message_id)
    return found


@dataclass
class Drained:
    """When the expected deliveries were all there (or the deadline passed)."""

    effects: Effects
    complete: bool
    at: float  # every expected delivery made and the work queue empty
    delivered_at: float | None = (
        None  # every expected delivery made (the queue may hold duplicates)
    )
    queue_depth: int = -1
    missing: set[str] = field(default_factory=set)


async def wait_delivered(
    rig: Rig,
    resources: Resources,
    request_ids: Collection[str],
    *,
    timeout: float,
    settle_seconds: float = 0.0,
) -> Drained:
    """Until every id in ``request_ids`` reached every target and the work queue is empty."""
    deadline = time.monotonic() + timeout
    delivered_at = None
    while True:
        found = await effects(rig)
        missing = set(request_ids) - found.delivered_everywhere(request_ids)
        queue = await depth(rig, resources.queue_url) if not missing else -1
        if not missing and delivered_at is None:
            delivered_at = time.monotonic()
        if not missing and queue == 0:
            at = time.monotonic()
            if settle_seconds:
                await asyncio.sleep(settle_seconds)  # late redeliveries, if any, show up now
                found = await effects(rig)
            return Drained(found, True, at, delivered_at, queue, missing)
        if time.monotonic() > deadline:
            queue = await depth(rig, resources.queue_url)
            return Drained(found, False, time.monotonic(), delivered_at, queue, missing)
        await asyncio.sleep(POLL_SECONDS)


async def wait_dead_lettered(
    rig: Rig, resources: Resources, count: int, timeout: float
) -> list[dict[str, Any]]:
    """The DLQ's messages once there are ``count`` of them (or at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        async with sqs_client(rig) as sqs:
            response = await sqs.get_queue_attributes(
                QueueUrl=direct_url(rig, resources.dlq_url),
                AttributeNames=["ApproximateNumberOfMessages"],
            )
        if (
            int(response["Attributes"]["ApproximateNumberOfMessages"]) >= count
            or time.monotonic() > deadline
        ):
            return await dlq_messages(rig, resources)
        await asyncio.sleep(POLL_SECONDS)


def log_events(log: str, event: str) -> list[dict[str, Any]]:
    """The lines of a courier process's log (one JSON object a line) whose ``event`` field is
    ``event``, parsed, in order; anything else on the stream (not JSON) is skipped."""
    found = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
