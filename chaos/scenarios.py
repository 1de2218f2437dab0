"""The fault and load scenarios. Each returns rows (``chaos.report.Row``) with its invariants
checked; ``Scale`` sets the sizes (``SMALL`` for ``make test``, ``FULL`` for ``make chaos``).

1. crash      -- SIGKILL of worker processes under load, twice, each restarted.
2. outage     -- a legacy target failing 20% of calls and down for a window.
3. poison     -- 1% poison of every kind among healthy messages, against a clean run.
4. aws        -- SQS, KMS and DynamoDB unreachable in turn, under load.
5. graceful   -- SIGTERM to one of two processes sharing a port, under load.
6. soak       -- sustained load; RSS, open fds and event-loop lag sampled (full run only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import harness
from chaos import verify
from chaos.load import Load, LoadResult, Request, body
from chaos.report import Row
from chaos.rig import REJECTING_TARGET, TARGETS, Rig
from service import daemon
from service.aws import client_config
from service.bootstrap import Resources
from service.envelope import ENCRYPTION_CONTEXT, Envelope, EnvelopeCipher, _header_aad
from service.operations import create_mailbox
from service.settings import EnvelopeSettings, Settings
from service.status import now_iso
from service.worker.dlq import DeadLetterInfo


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of every scenario."""

    name: str
    crash_requests: int
    crash_rate: float
    visibility: int
    outage_requests: int
    outage_rate: float
    outage_down_seconds: float
    breaker_cooldown: float
    backoff: tuple[float, float]  # worker backoff_base_seconds, backoff_max_seconds
    poison_messages: int
    aws_rate: float
    aws_cut_seconds: float
    aws_secret_ttl: float
    graceful_rate: float
    graceful_seconds: float
    graceful_latency: float
    soak_seconds: float
    soak_rate: float
    cpu_tolerance: float  # CPU per message, poison run vs clean run, relative
    drain_timeout: float


SMALL = Scale(
    name="small",
    crash_requests=240,
    crash_rate=60,
    visibility=8,
    outage_requests=200,
    outage_rate=40,
    outage_down_seconds=4,
    breaker_cooldown=3,
    backoff=(0.5, 4.0),
    poison_messages=600,
    aws_rate=30,
    aws_cut_seconds=3,
    aws_secret_ttl=2,
    graceful_rate=100,
    graceful_seconds=5,
    graceful_latency=0.5,
    soak_seconds=0,
    soak_rate=0,
    cpu_tolerance=0.25,
    drain_timeout=60,
)
FULL = Scale(
    name="full",
    crash_requests=3000,
    crash_rate=100,
    visibility=30,
    outage_requests=3000,
    outage_rate=80,
    outage_down_seconds=15,
    breaker_cooldown=10,  # courier's default
    backoff=(2.0, 900.0),  # courier's defaults
    poison_messages=5000,
    aws_rate=60,
    aws_cut_seconds=10,
    aws_secret_ttl=3,
    graceful_rate=120,  # 200/s saturates a 2-vCPU machine running the whole rig (see README)
    graceful_seconds=20,
    graceful_latency=1.6,  # ~100 messages in flight per process
    soak_seconds=240,
    soak_rate=80,
    cpu_tolerance=0.15,
    drain_timeout=240,
)

Scenario = Callable[[Rig, Scale], Awaitable[list[Row]]]


# -- helpers ---------------------------------------------------------------------------------


class Fleet:
    """Several courier processes of one kind, each of which can be killed and restarted."""

    def __init__(
        self,
        rig: Rig,
        settings: Settings,
        name: str,
        size: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.rig = rig
        self.settings = settings
        self.name = name
        self.env = env
        self.slots: list[contextlib.AsyncExitStack | None] = [None] * size
        self.processes: list[harness.CourierProcess | None] = [None] * size

    async def start(self, index: int | None = None) -> None:
        indexes = range(len(self.slots)) if index is None else [index]
        await asyncio.gather(*(self._start(i) for i in indexes))

    async def _start(self, index: int) -> None:
        stack = contextlib.AsyncExitStack()
        self.processes[index] = await stack.enter_async_context(
            self.rig.courier(self.settings, f"{self.name}-{index}", env=self.env)
        )
        self.slots[index] = stack

    async def kill(self, index: int) -> None:
        process = self.processes[index]
        assert process is not None
        process.process.signal(signal.SIGKILL)
        stack = self.slots[index]
        self.slots[index] = self.processes[index] = None
        if stack is not None:
            await stack.aclose()

    async def stop(self) -> None:
        for stack in self.slots:
            if stack is not None:
                await stack.aclose()
        self.slots = [None] * len(self.slots)

    def alive(self) -> list[harness.CourierProcess]:
        return [p for p in self.processes if p is not None]


@contextlib.asynccontextmanager
async def fleet(
    rig: Rig, settings: Settings, name: str, size: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[Fleet]:
    """``size`` courier processes with ``settings`` (``env`` added to their environment)."""
    running = Fleet(rig, settings, name, size, env)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


async def metric(
    process: harness.CourierProcess, name: str, *, url: str = "", **labels: str
) -> float:
    """The sum of ``name`` samples whose labels include ``labels`` (0 when absent); ``url``:
    read /metrics there instead of on the process's API port."""
    total = 0.0
    source = dataclasses.replace(process, url=url) if url else process
    for (sample, sample_labels), value in (await source.metrics()).items():
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            total += value
    return total


def run_id() -> str:
    return uuid.uuid4().hex[:5]


Explain = Callable[[Request], str | None]


def summarize(
    row: Row,
    result: LoadResult,
    drained: verify.Drained,
    *,
    expected_failures: set[str] = frozenset(),  # type: ignore[assignment]
    dlq: list[dict[str, Any]] | None = None,
    explain: Explain | None = None,
) -> None:
    """Fill ``row`` from a load run and what arrived, and check the accounting itself.

    Delivery is counted by request id, so every 202 must carry an id of its own (an empty or
    repeated one would hide a request from ``lost``), and every request sent must end accepted
    unless ``explain`` names the scenario's fault that refused it (counted in ``row.refused``
    and reported by reason).
    """
    accepted = result.accepted
    ids = {r.request_id for r in accepted}
    _check_ids(row, accepted, ids)
    _check_refusals(row, result, explain)
    healthy = ids - expected_failures - {""}
    delivered = drained.effects.delivered_everywhere(healthy)
    row.requests += len(result.requests)
    row.accepted += len(accepted)
    row.delivered += len(delivered)
    row.lost += len(healthy - delivered)
    usernames = {r.username for r in result.requests}
    row.duplicate_effects += drained.effects.duplicate_effects(usernames)
    row.redeliveries += drained.effects.redeliveries(ids)
    row.p99_api_ms = max(row.p99_api_ms, 1000 * verify.percentile(result.latencies(), 99))
    e2e = [
        at - r.accepted_at
        for r in accepted
        if r.request_id in delivered and (at := drained.effects.last_effect_at(r.request_id))
    ]
    row.p99_e2e_s = max(row.p99_e2e_s, verify.percentile(e2e, 99))
    if dlq is not None:
        row.dlq = len(dlq)
    answers = result.answers()
    row.notes["answers"] = dict(answers)
    if drained.delivered_at is not None:
        row.notes["delivered_s_after_load"] = round(drained.delivered_at - result.finished, 2)
    row.notes["queue_empty_s_after_load"] = round(drained.at - result.finished, 2)
    row.check(
        result.server_errors() == 0, f"{result.server_errors()} API answers were 5xx other than 503"
    )
    if drained.missing:
        row.notes["missing_sample"] = sorted(drained.missing)[:5]
    row.check(drained.complete or not healthy - delivered, "delivery did not complete in time")


def _check_ids(row: Row, accepted: list[Request], ids: set[str]) -> None:
    """len(ids) == accepted, and no id is empty."""
    empty = sum(1 for r in accepted if not r.request_id)
    row.check(empty == 0, f"{empty} requests answered 202 without a request id")
    row.check(
        len(ids) == len(accepted),
        f"{len(accepted)} requests answered 202 under only {len(ids)} distinct request ids",
    )


def _check_refusals(row: Row, result: LoadResult, explain: Explain | None) -> None:
    """accepted == requests, except refusals the scenario's fault explains (counted)."""
    refused = [r for r in result.requests if r.status != 202]
    row.refused += len(refused)
    explained: Counter[str] = Counter()
    unexplained: Counter[str] = Counter()
    for request in refused:
        reason = explain(request) if explain is not None else None
        if reason:
            explained[reason] += 1
        else:
            unexplained[str(request.status or (request.answers or ["never sent"])[-1])] += 1
    if explained:
        row.notes["refused_explained"] = dict(explained)
    row.check(
        not unexplained,
        f"{sum(unexplained.values())} of {len(result.requests)} requests never accepted, "
        f"unexplained by the fault (final answers {dict(unexplained)})",
    )


# -- 1. crash --------------------------------------------------------------------------------


async def crash(rig: Rig, scale: Scale) -> list[Row]:
    """N requests through one API process while two worker processes are SIGKILLed in turn."""
    started = time.monotonic()
    row = Row("1 crash (SIGKILL x2)")
    resources = await rig.fresh("crash")
    await rig.stubs.reset()
    await rig.stubs.behave("crm", latency_seconds=0.05)  # work in flight when the kill lands
    api = rig.settings(resources, "api")
    worker = rig.settings(
        resources,
        "worker",
        worker={"visibility_timeout_seconds": scale.visibility, "wait_seconds": 2},
    )
    run = run_id()
    load = Load([""], rig.token(), run=run, rate=scale.crash_rate, count=scale.crash_requests)
    duration = scale.crash_requests / scale.crash_rate
    in_flight_at_kill: list[float] = []
    async with (
        fleet(rig, api, "crash-api") as apis,
        fleet(rig, worker, "crash-worker", 2) as workers,
    ):
        load.urls = [apis.alive()[0].url]
        sending = asyncio.create_task(load.run_all())
        restarted_at = 0.0
        for index, when in enumerate((0.3, 0.6)):
            await asyncio.sleep(duration * (when - (0.3 if index else 0)))
            victim = workers.processes[index]
            assert victim is not None
            with contextlib.suppress(Exception):
                in_flight_at_kill.append(await metric(victim, "courier_messages_in_flight"))
            await workers.kill(index)
            await workers.start(index)
            restarted_at = time.monotonic()
        result = await sending
        ids = {r.request_id for r in result.accepted}
        drained = await verify.wait_delivered(
            rig, resources, ids, timeout=scale.drain_timeout + scale.visibility, settle_seconds=1
        )
        dlq = await verify.dlq_messages(rig, resources)
        states = await verify.statuses(rig, resources)
    summarize(row, result, drained, dlq=dlq)
    row.base_invariants()
    row.recover_s = drained.at - restarted_at
    row.notes.update(
        in_flight_at_kill=in_flight_at_kill,
        statuses=dict(states),
        recover="last restart -> every accepted request delivered (in-flight messages of a "
        f"killed worker return after the visibility timeout, {scale.visibility}s)",
    )
    row.check(states.get("completed", 0) == len(ids), f"status records: {dict(states)}")
    row.seconds = time.monotonic() - started
    return [row]


# -- 2. legacy outage ------------------------------------------------------------------------


async def outage(rig: Rig, scale: Scale) -> list[Row]:
    """billing fails 20% of calls throughout and is down for a window in the middle."""
    started = time.monotonic()
    row = Row("2 legacy outage")
    resources = await rig.fresh("outage")
    await rig.stubs.reset()
    await rig.stubs.behave("billing", failure_rate=0.2, failure_status=503)
    api = rig.settings(resources, "api")
    worker = rig.settings(
        resources,
        "worker",
        worker={
            "visibility_timeout_seconds": scale.visibility,
            "backoff_base_seconds": scale.backoff[0],
            "backoff_max_seconds": scale.backoff[1],
        },
        target={"breaker_cooldown_seconds": scale.breaker_cooldown},
    )
    run = run_id()
    load = Load([""], rig.token(), run=run, rate=scale.outage_rate, count=scale.outage_requests)
    duration = scale.outage_requests / scale.outage_rate
    async with (
        fleet(rig, api, "outage-api") as apis,
        fleet(rig, worker, "outage-worker") as workers,
    ):
        load.urls = [apis.alive()[0].url]
        (process,) = workers.alive()
        opened_before = await metric(
            process, "courier_target_circuit_transitions_total", target="billing", state="open"
        )
        sending = asyncio.create_task(load.run_all())
        await asyncio.sleep(max(0.5, (duration - scale.outage_down_seconds) / 3))
        await rig.stubs.behave("billing", down=True)
        down_at = time.monotonic()
        await asyncio.sleep(scale.outage_down_seconds)
        circuit_during = await metric(process, "courier_target_circuit_open", target="billing")
        await rig.stubs.behave("billing", down=False)
        up_at = time.monotonic()
        result = await sending
        ids = {r.request_id for r in result.accepted}
        drained = await verify.wait_delivered(
            rig, resources, ids, timeout=scale.drain_timeout + 60, settle_seconds=1
        )
        dlq = await verify.dlq_messages(rig, resources)
        opened = (
            await metric(
                process, "courier_target_circuit_transitions_total", target="billing", state="open"
            )
            - opened_before
        )
        closed = await metric(
            process, "courier_target_circuit_transitions_total", target="billing", state="closed"
        )
        circuit_after = await metric(process, "courier_target_circuit_open", target="billing")
        retried = await metric(process, "courier_messages_processed_total", outcome="retried")
    summarize(row, result, drained, dlq=dlq)
    row.base_invariants()
    row.recover_s = drained.at - up_at
    row.notes.update(
        down_seconds=round(up_at - down_at, 1),
        circuit_open_during_outage=circuit_during,
        circuit_opened=opened,
        circuit_closed=closed,
        circuit_open_at_end=circuit_after,
        messages_retried=retried,
        breaker_cooldown_s=scale.breaker_cooldown,
        backoff_base_max_s=list(scale.backoff),
        dlq_reasons=dict(verify.dlq_reasons(dlq)),
        recover="billing back up -> every accepted request delivered",
    )
    row.check(opened >= 1, "the circuit never opened during the outage")
    row.check(closed >= 1 and circuit_after == 0, "the circuit did not close after the outage")
    row.seconds = time.monotonic() - started
    return [row]


# -- 3. poison -------------------------------------------------------------------------------

POISON_KINDS = (
    ("not-json", "malformed"),
    ("undecryptable", "undecryptable"),
    ("bad-version", "unsupported_version"),
    ("unknown-op", "unknown_op"),
    ("invalid-payload", "invalid_payload"),
    ("target-400", "target_rejected"),
)


async def sealed_messages(
    rig: Rig, resources: Resources, run: str, count: int, poison_every: int
) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(request id, body, kind) for ``count`` messages, every ``poison_every``-th one poison;
    and the expected DLQ reason per poison request id."""
    direct = rig.stack.direct
    async with harness_client("kms", direct) as kms:
        cipher = EnvelopeCipher(kms, EnvelopeSettings(kms_key_id=resources.data_key_arn))
        generated = await kms.generate_data_key(
            KeyId=resources.data_key_arn,
            KeySpec="AES_256",
            EncryptionContext=dict(ENCRYPTION_CONTEXT),
        )
        aead = AESGCM(generated["Plaintext"])
        messages: list[tuple[str, str, str]] = []
        expected: dict[str, str] = {}
        requested_at = now_iso()
        poison_seen = 0
        for index in range(count):
            request_id = uuid.uuid4().hex
            poison = poison_every and index % poison_every == poison_every - 1
            kind, reason = (
                POISON_KINDS[poison_seen % len(POISON_KINDS)] if poison else ("healthy", "")
            )
            poison_seen += int(bool(poison))
            mailbox = body(run, index, poison=kind == "target-400")
            event = create_mailbox.event(mailbox, f"idm-{index}", "chaos", requested_at)
            if kind in ("healthy", "target-400"):
                text = await cipher.seal(create_mailbox.NAME, request_id, event)
            elif kind == "not-json":
                text = "not an envelope " + request_id
            elif kind == "undecryptable":
                document = json.loads(await cipher.seal(create_mailbox.NAME, request_id, event))
                document["key"]["ek"] = base64.b64encode(os.urandom(184)).decode()
                text = json.dumps(document)
            elif kind == "bad-version":
                document = json.loads(await cipher.seal(create_mailbox.NAME, request_id, event))
                text = json.dumps({**document, "v": 2})
            else:
                op = "delete-everything" if kind == "unknown-op" else create_mailbox.NAME
                payload = (
                    {"everything": True} if kind == "unknown-op" else {"mailbox": {"username": 1}}
                )
                nonce = os.urandom(12)
                ciphertext = aead.encrypt(
                    nonce, json.dumps(payload).encode(), _header_aad(1, op, request_id)
                )
                text = Envelope(
                    op,
                    request_id,
                    str(generated["KeyId"]),
                    bytes(generated["CiphertextBlob"]),
                    nonce,
                    ciphertext,
                ).serialize()
            messages.append((request_id, text, kind))
            if reason:
                expected[request_id] = reason
    return messages, expected


@contextlib.asynccontextmanager
async def harness_client(service: str, settings: Any) -> AsyncIterator[Any]:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        service,
        region_name=settings.region,
        endpoint_url=settings.endpoint_for(service),
        config=client_config(settings),
    ) as made:
        yield made


async def preload(rig: Rig, queue_url: str, messages: Sequence[tuple[str, str, str]]) -> None:
    url = verify.direct_url(rig, queue_url)
    limit = asyncio.Semaphore(16)
    async with harness_client("sqs", rig.stack.direct) as sqs:

        async def send(batch: Sequence[tuple[str, str, str]]) -> None:
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": text,
                    "MessageAttributes": {
                        "op": {"DataType": "String", "StringValue": create_mailbox.NAME},
                        "request_id": {"DataType": "String", "StringValue": request_id},
                    },
                }
                for i, (request_id, text, _) in enumerate(batch)
            ]
            async with limit:
                response = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not response.get("Failed"), response["Failed"][:2]

        await asyncio.gather(*(send(messages[i : i + 10]) for i in range(0, len(messages), 10)))


@dataclass
class Drain:
    """One run of the poison scenario: its row and what it cost."""

    row: Row
    throughput: float  # healthy messages per second, first effect to last
    cpu_ms_per_message: float  # courier's CPU time over every message it drained


async def _drain_preloaded(rig: Rig, scale: Scale, poison_every: int, label: str) -> Drain:
    row = Row(label)
    resources = await rig.fresh("poison")
    await rig.stubs.reset()
    run = run_id()
    messages, expected = await sealed_messages(
        rig, resources, run, scale.poison_messages, poison_every
    )
    healthy = {rid for rid, _, kind in messages if kind == "healthy"}
    worker = rig.settings(resources, "worker", worker={"wait_seconds": 1})
    async with fleet(rig, worker, f"{label.split(maxsplit=1)[0]}-worker") as workers:
        # Started, then loaded: its CPU time from here on is the draining, not the start-up.
        (process,) = workers.alive()
        cpu_before = process.cpu_seconds()
        await preload(rig, resources.queue_url, messages)
        drained = await verify.wait_delivered(rig, resources, healthy, timeout=scale.drain_timeout)
        cpu = process.cpu_seconds() - cpu_before
        dlq = await verify.wait_dead_lettered(rig, resources, len(expected), timeout=30)
    states = await verify.states_by_id(rig, resources)
    first = min(
        (at for t, _ in TARGETS for at in drained.effects.by_target[t]["first_at"].values()),
        default=0.0,
    )
    last = max((drained.effects.last_effect_at(rid) or 0.0) for rid in healthy)
    row.requests = row.accepted = len(messages)
    delivered = drained.effects.delivered_everywhere(healthy)
    row.delivered = len(delivered)
    row.lost = len(healthy - delivered)
    row.redeliveries = drained.effects.redeliveries()
    row.duplicate_effects = drained.effects.duplicate_effects()
    row.dlq, row.dlq_expected = len(dlq), len(expected)
    row.base_invariants()
    _check_dead_letters(row, dlq, expected)
    refused = {rid for rid, _, kind in messages if kind == "target-400"}
    _check_refused(row, drained.effects, refused, dlq, states)
    row.check(
        all(states.get(rid) == "completed" for rid in delivered),
        f"{sum(states.get(rid) != 'completed' for rid in delivered)} delivered requests "
        "not completed in the status table",
    )
    cpu_ms = 1000 * cpu / len(messages)
    row.notes.update(
        healthy=len(healthy),
        dlq_reasons=dict(verify.dlq_reasons(dlq)),
        cpu_ms_per_message=round(cpu_ms, 3),
    )
    row.recover_s = None
    return Drain(row, len(healthy) / max(1e-6, last - first), cpu_ms)


def _check_dead_letters(row: Row, dlq: list[dict[str, Any]], expected: dict[str, str]) -> None:
    """Each poison message is in the DLQ with the reason of its kind."""
    got: dict[str, str] = {}
    for raw in dlq:
        attributes = raw.get("MessageAttributes", {})
        rid = attributes.get("request_id", {}).get("StringValue", "")
        got[rid] = verify.dlq_reason(raw)
    wrong = {
        rid: (got.get(rid), reason) for rid, reason in expected.items() if got.get(rid) != reason
    }
    row.check(
        not wrong,
        f"{len(wrong)} poison messages with a wrong or no DLQ reason: {list(wrong.values())[:3]}",
    )


def _check_refused(
    row: Row,
    effects: verify.Effects,
    refused: set[str],
    dlq: list[dict[str, Any]],
    states: dict[str, str],
) -> None:
    """A request the rejecting target refused (400): every other target delivered it, its
    status is ``failed``, and the rejecting target saw exactly one call per attempt (the
    receive count the DLQ copy records), never a retry of the refusal within an attempt."""
    others = [t for t, _ in TARGETS if t != REJECTING_TARGET]
    undelivered = {
        rid for rid in refused if not all(f"{rid}:{t}" in effects.key_counts(t) for t in others)
    }
    row.check(not undelivered, f"{len(undelivered)} refused requests not delivered to {others}")
    not_failed = {rid: states.get(rid) for rid in refused if states.get(rid) != "failed"}
    row.check(
        not not_failed,
        f"{len(not_failed)} refused requests with a status other than failed: "
        f"{sorted(Counter(map(str, not_failed.values())).items())}",
    )
    attempts = {}
    for raw in dlq:
        rid = raw.get("MessageAttributes", {}).get("request_id", {}).get("StringValue", "")
        info = DeadLetterInfo.of_sqs(raw)
        if rid in refused and info is not None:
            attempts[rid] = info.receive_count
    calls = effects.refused(REJECTING_TARGET)
    pairs = {rid: (calls.get(f"{rid}:{REJECTING_TARGET}", 0), attempts.get(rid)) for rid in refused}
    wrong = [pair for pair in pairs.values() if pair[0] != pair[1]]
    if pairs:
        row.notes["refused_calls_per_attempt"] = dict(
            Counter(f"{c}/{a}" for c, a in pairs.values())
        )
    row.check(
        not wrong,
        f"{len(wrong)} refused requests where {REJECTING_TARGET} was not called exactly once "
        f"per attempt (calls, attempts): {wrong[:3]}",
    )
    counted = [
        rid
        for rid in refused
        if f"{rid}:{REJECTING_TARGET}" in effects.key_counts(REJECTING_TARGET)
    ]
    row.check(not counted, f"{len(counted)} refused requests counted as delivered")


async def poison(rig: Rig, scale: Scale) -> list[Row]:
    """The same preloaded volume drained by one worker, clean and with 1% poison of 6 kinds.

    Poison must cost the healthy messages nothing: courier's CPU time per message drained (its
    own process, not the wall clock, which 2 busy cores make noisy) stays within
    ``cpu_tolerance`` of the clean runs'. Runs alternate clean, poison, poison, clean (ABBA), so
    a rig that slows down over the run biases neither side. Even CPU time per message moves
    with the machine's load (a starved process works in bigger batches), so the spread between
    runs of one kind is measured too: a difference within it is not evidence, and the bound is
    the larger of the two. Wall-clock throughput is reported only.
    """
    started = time.monotonic()
    order = (0, 100, 100, 0)
    clean: list[Drain] = []
    dirty: list[Drain] = []
    for every in order:
        label = "3b poison: 1% poison" if every else "3a poison: clean run"
        (dirty if every else clean).append(await _drain_preloaded(rig, scale, every, label))
    rows = [_merged([d.row for d in clean]), _merged([d.row for d in dirty])]
    compare_cost(rows, clean, dirty, scale.cpu_tolerance)
    for row in rows:
        row.seconds = (time.monotonic() - started) / len(rows)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def compare_cost(rows: list[Row], clean: list[Drain], dirty: list[Drain], tolerance: float) -> None:
    """Report CPU per message and throughput of each kind with their spreads; check that the
    poison runs' CPU per message is within ``tolerance`` (or the spread, if larger) of clean."""
    for row, runs in zip(rows, (clean, dirty), strict=True):
        cpu = [d.cpu_ms_per_message for d in runs]
        row.notes["cpu_ms_per_message"] = [round(c, 3) for c in cpu]
        row.notes["cpu_spread"] = round(_spread(cpu), 3)
        row.notes["throughput_msg_s"] = [round(d.throughput, 1) for d in runs]
        row.notes["throughput_spread"] = round(_spread([d.throughput for d in runs]), 3)
    clean_cpu = _mean([d.cpu_ms_per_message for d in clean])
    dirty_cpu = _mean([d.cpu_ms_per_message for d in dirty])
    ratio = dirty_cpu / clean_cpu if clean_cpu else float("inf")
    noise = max(_spread([d.cpu_ms_per_message for d in runs]) for runs in (clean, dirty))
    bound = max(tolerance, noise)
    rows[1].notes["cpu_vs_clean"] = round(ratio, 3)
    rows[1].notes["cpu_bound"] = round(1 + bound, 3)
    clean_rate = _mean([d.throughput for d in clean])
    rows[1].notes["throughput_vs_clean"] = round(
        _mean([d.throughput for d in dirty]) / max(1e-6, clean_rate), 3
    )
    rows[1].check(
        ratio <= 1 + bound,
        f"CPU per message {dirty_cpu:.2f} ms with poison is {100 * (ratio - 1):.0f}% above the "
        f"clean runs' {clean_cpu:.2f} ms (bound {100 * bound:.0f}%: tolerance "
        f"{100 * tolerance:.0f}%, spread between repeats {100 * noise:.0f}%)",
    )


def _spread(values: list[float]) -> float:
    """(max - min) / mean of repeated measurements; 0 for fewer than two."""
    if len(values) < 2 or not sum(values):
        return 0.0
    return (max(values) - min(values)) / (sum(values) / len(values))


def _merged(rows: list[Row]) -> Row:
    """One row for several runs of the same kind (counts add up, notes of the first)."""
    merged = rows[0]
    for row in rows[1:]:
        for name in (
            "requests",
            "accepted",
            "delivered",
            "lost",
            "duplicate_effects",
            "redeliveries",
            "dlq",
            "dlq_expected",
        ):
            setattr(merged, name, getattr(merged, name) + getattr(row, name))
        merged.violations += row.violations
        for note in ("dlq_reasons", "refused_calls_per_attempt"):
            for value, count in row.notes.get(note, {}).items():
                counts = merged.notes.setdefault(note, {})
                counts[value] = counts.get(value, 0) + count
    merged.notes["runs"] = len(rows)
    return merged


# -- 4. AWS outages --------------------------------------------------------------------------


async def _aws_phase(
    rig: Rig,
    scale: Scale,
    resources: Resources,
    apis: Fleet,
    workers: Fleet,
    dependency: str,
) -> Row:
    """Load through the API while ``dependency`` is cut; during the cut, messages sealed under a
    data key the worker has never seen are also put straight on the queue (KMS and DynamoDB
    phases), so the worker meets the outage with work of its own."""
    row = Row(f"4 {dependency} unreachable {scale.aws_cut_seconds:g}s")
    await rig.stubs.reset()
    run = run_id()
    lead = 1.0 if scale.name == "small" else 3.0
    count = int(scale.aws_rate * (lead * 2 + scale.aws_cut_seconds))
    api, worker = apis.alive()[0], workers.alive()[0]
    load = Load(
        [api.url],
        rig.token(),
        run=run,
        rate=scale.aws_rate,
        count=count,
        retry_seconds=scale.aws_cut_seconds + 30,
    )
    during: dict[str, int] = {}
    proxy = rig.proxies[dependency]

    def on_answer(_: Any, answer: str) -> None:
        if proxy.is_cut:
            during[answer] = during.get(answer, 0) + 1

    load.on_answer = on_answer
    planted: list[tuple[str, str, str]] = []
    if dependency != "sqs":
        planted, _ = await sealed_messages(
            rig, resources, f"p{run}", max(10, int(scale.aws_rate * scale.aws_cut_seconds / 2)), 0
        )
    processes = (api, worker)
    stale_before = sum(
        [await metric(p, "courier_secret_lookups_total", result="stale") for p in processes]
    )
    dlq_before = await verify.dlq_count(rig, resources)
    log_offset = len(worker.process.stderr())
    sending = asyncio.create_task(load.run_all())
    await asyncio.sleep(lead)
    await proxy.cut()
    cut_at = time.monotonic()
    if planted:
        await preload(rig, resources.queue_url, planted)
    await asyncio.sleep(max(0.0, scale.aws_cut_seconds - (time.monotonic() - cut_at)))
    await proxy.restore()
    restored_at = time.monotonic()
    result = await sending
    ids = {r.request_id for r in result.accepted} | {rid for rid, _, _ in planted}
    drained = await verify.wait_delivered(
        rig, resources, ids, timeout=scale.drain_timeout + 60, settle_seconds=1
    )
    stale = (
        sum([await metric(p, "courier_secret_lookups_total", result="stale") for p in processes])
        - stale_before
    )

    def explain(request: Request) -> str | None:
        # The client retries a 503 until well after the restore: a 503 that is its final
        # answer is explained by the cut only if that last attempt started while cut.
        cut = request.status == 503 and cut_at <= request.final_started <= restored_at
        return f"503 while {dependency} was cut" if cut else None

    summarize(row, result, drained, explain=explain)
    planted_ids = {rid for rid, _, _ in planted}
    planted_delivered = drained.effects.delivered_everywhere(planted_ids)
    row.requests += len(planted)
    row.accepted += len(planted)
    row.delivered += len(planted_delivered)
    row.lost += len(planted_ids - planted_delivered)
    row.redeliveries = drained.effects.redeliveries(ids)
    row.dlq = await verify.dlq_count(rig, resources) - dlq_before
    row.recover_s = (drained.delivered_at or drained.at) - restored_at
    worker_log = worker.process.stderr()[log_offset:]
    backoffs = [float(b) for b in re.findall(r"\"receive failed; backing off (\d+)s\"", worker_log)]
    after = [
        at
        for t, _ in TARGETS
        for at in drained.effects.by_target[t]["first_at"].values()
        if at > restored_at
    ]
    row.notes.update(
        answers_while_cut=during,
        planted_during_cut=len(planted),
        stale_secret_lookups=stale,
        worker_receive_failures=len(backoffs),
        worker_longest_backoff_s=max(backoffs, default=0.0),
        worker_first_effect_after_restore_s=round(min(after) - restored_at, 2) if after else None,
        worker_retried=worker_log.count('"delivery_retry"'),
        queue_empty_s_after_restore=round(drained.at - restored_at, 1),
        slowest_202_start_vs_cut_and_latency_s=[
            (round(r.final_started - cut_at, 2), round(r.latency, 2))
            for r in sorted(result.accepted, key=lambda r: -r.latency)[:4]
        ],
        recover="dependency back -> every accepted request delivered",
    )
    if dependency == "sqs":
        row.check(during.get("503", 0) > 0, "no 503 while SQS was unreachable")
    if dependency == "kms":
        row.check(stale > 0, "no stale secret was served while KMS was unreachable")
        row.check(set(during) <= {"202"}, f"the KMS outage reached clients: {during}")
    if dependency == "dynamodb":
        row.check(during.get("503", 0) > 0, "no 503 while the status table was unreachable")
        row.check(
            during.get("401", 0) == 0,
            "tokens refused while DynamoDB was down: secrets not served stale",
        )
    row.base_invariants()
    return row


async def aws(rig: Rig, scale: Scale) -> list[Row]:
    """SQS, then KMS, then DynamoDB unreachable (connection refused) for a window each."""
    started = time.monotonic()
    resources = await rig.fresh("aws")
    secrets = {
        "ttl_seconds": scale.aws_secret_ttl,
        "refresh_ahead_seconds": scale.aws_secret_ttl / 2,
    }
    api = rig.settings(resources, "api", secrets=secrets)
    worker = rig.settings(
        resources,
        "worker",
        secrets=secrets,
        worker={"wait_seconds": 2, "visibility_timeout_seconds": scale.visibility},
    )
    rows = []
    async with fleet(rig, api, "aws-api") as apis, fleet(rig, worker, "aws-worker") as workers:
        for dependency in ("sqs", "kms", "dynamodb"):
            phase_started = time.monotonic()
            row = await _aws_phase(rig, scale, resources, apis, workers, dependency)
            row.seconds = time.monotonic() - phase_started
            rows.append(row)
        dlq = await verify.dlq_messages(rig, resources)
    if dlq:
        rows[-1].notes["dlq_reasons"] = dict(verify.dlq_reasons(dlq))
    rows[0].seconds += time.monotonic() - started - sum(r.seconds for r in rows)
    return rows


# -- 5. graceful shutdown --------------------------------------------------------------------


async def graceful(rig: Rig, scale: Scale) -> list[Row]:
    """Two role=all processes share a port; one gets SIGTERM mid-load with messages in flight."""
    started = time.monotonic()
    row = Row("5 graceful SIGTERM")
    resources = await rig.fresh("graceful")
    await rig.stubs.reset()
    for name, _ in TARGETS:
        await rig.stubs.behave(name, latency_seconds=scale.graceful_latency)
    port = _free_port()
    drain = 10.0
    settings = rig.settings(
        resources,
        "all",
        http={"port": port, "drain_seconds": drain, "reuse_port": True},
        worker={
            "wait_seconds": 2,
            "max_in_flight": 200,
            "visibility_timeout_seconds": scale.visibility,
        },
        # Every message in flight is at the targets, not queued on a per-target semaphore
        # (default 32: at 1.6 s a call that is 20 msg/s per target and process).
        target={"concurrency": 128},
    )
    run = run_id()
    count = int(scale.graceful_rate * scale.graceful_seconds)
    url = f"http://127.0.0.1:{port}"
    load = Load([url], rig.token(), run=run, rate=scale.graceful_rate, count=count)
    after_term: dict[str, int] = {}
    term_at = [0.0]

    def on_answer(_: Any, answer: str) -> None:
        if term_at[0]:
            after_term[answer] = after_term.get(answer, 0) + 1

    load.on_answer = on_answer
    # Each process also serves /metrics on a port of its own (http.metrics_port + instance):
    # the shared API port reaches either of them.
    metrics_port = _free_port_pair()
    first = settings.replace(http=dataclasses.replace(settings.http, metrics_port=metrics_port))
    second = first.replace(instance=1)
    # Each process signs with an access key of its own, so the strict proxy's message ledger
    # tells which messages the victim received, deleted and released.
    async with (
        verify.message_ledger(rig),
        fleet(rig, first, "graceful-a", env={"AWS_ACCESS_KEY_ID": VICTIM_KEY}) as a,
        fleet(rig, second, "graceful-b", env={"AWS_ACCESS_KEY_ID": SURVIVOR_KEY}),
    ):
        victim = a.alive()[0]
        victim_metrics = f"http://127.0.0.1:{metrics_port}"
        sending = asyncio.create_task(load.run_all())
        await asyncio.sleep(scale.graceful_seconds / 2)
        in_flight = await metric(victim, "courier_messages_in_flight", url=victim_metrics)
        served_rate = await _rate(victim, "courier_http_requests_total", 1.0, victim_metrics)
        term_at[0] = time.monotonic()
        victim.process.signal(signal.SIGTERM)
        while victim.process.alive() and time.monotonic() - term_at[0] < drain * 3:
            await asyncio.sleep(0.02)
        exit_seconds = time.monotonic() - term_at[0]
        exit_code = victim.process.popen.returncode
        held = verify.holdings(await verify.message_events(rig), VICTIM_KEY, term_at[0])
        result = await sending
        ids = {r.request_id for r in result.accepted}
        drained = await verify.wait_delivered(
            rig, resources, ids, timeout=scale.drain_timeout, settle_seconds=1
        )
        dlq = await verify.dlq_messages(rig, resources)
        stopped = _consumer_stopped(victim.process.stderr())
    summarize(row, result, drained, dlq=dlq)
    row.base_invariants()
    row.recover_s = exit_seconds
    server_errors = sum(n for a, n in after_term.items() if a.isdigit() and int(a) >= 500)
    client_errors = result.client_errors()
    stop_bound = daemon.stop_bound_seconds(settings)
    row.notes.update(
        in_flight_at_sigterm=in_flight,
        victim_http_rate=round(served_rate, 1),
        exit_seconds=round(exit_seconds, 2),
        exit_code=exit_code,
        drain_bound=drain,
        released_at_stop=stopped,
        stop_bound=stop_bound,
        answers_after_sigterm=after_term,
        client_errors=dict(client_errors),
        recover="SIGTERM -> process exited",
    )
    row.check(exit_code == 0, f"exit code {exit_code}")
    # The drain (both halves, one deadline), then releasing and flushing, then the exit.
    row.check(
        exit_seconds <= stop_bound,
        f"exited after {exit_seconds:.1f}s, beyond the {stop_bound:g}s stop bound",
    )
    row.check(server_errors == 0, f"{server_errors} 5xx answers after SIGTERM")
    # Every request the victim read was answered, keep-alive connections were told
    # `Connection: close`, and the survivor shares the port: no attempt may go unanswered.
    row.check(
        not client_errors,
        f"{sum(client_errors.values())} client-side errors (no HTTP answer): {dict(client_errors)}",
    )
    _check_orphans(row, held, settings.worker.visibility_timeout_seconds)
    row.seconds = time.monotonic() - started
    return [row]


VICTIM_KEY = "chaos-graceful-victim"
SURVIVOR_KEY = "chaos-graceful-survivor"


def _check_orphans(row: Row, held: verify.Holdings, visibility: int) -> None:
    """Every message the stopping process received is deleted or visible again at its exit.

    By message id, from the proxy's ledger read right after the exit: one it received but
    neither finished nor released stays invisible for the visibility timeout (then the
    survivor delivers it: late, not lost).
    """
    row.notes.update(
        victim_received=len(held.received),
        victim_received_before_sigterm=len(held.received_before),
        victim_deleted=len(held.received & held.deleted),
        victim_released=len(held.released),
        orphaned_at_exit=len(held.orphaned),
    )
    row.check(
        bool(held.received_before),
        "the ledger saw no message received by the stopping process before SIGTERM",
    )
    if held.orphaned:
        row.notes["orphaned_sample"] = sorted(held.orphaned)[:5]
    row.check(
        not held.orphaned,
        f"{len(held.orphaned)} of the {len(held.received)} messages received by the stopping "
        f"process were neither deleted nor visible again when it exited: they wait out the "
        f"visibility timeout ({visibility}s)",
    )


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are both free now."""
    import socket

    for _ in range(100):
        first = _free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first
    raise RuntimeError("no two consecutive free ports")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _rate(process: harness.CourierProcess, name: str, seconds: float, url: str) -> float:
    before = await metric(process, name, url=url)
    await asyncio.sleep(seconds)
    return (await metric(process, name, url=url) - before) / seconds


def _consumer_stopped(log: str) -> int | None:
    for line in log.splitlines():
        if '"consumer_stopped"' in line:
            found = re.search(r'"released": (\d+)', line)
            return int(found[1]) if found else None
    return None


# -- 6. soak ---------------------------------------------------------------------------------


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


IDLE_SECONDS = 30.0
FD_SLACK = 16  # pooled connections to AWS that stay open between polls


def _peer_names(rig: Rig, process: harness.CourierProcess) -> dict[int, str]:
    ports = {int(url.rsplit(":", 1)[1]): name for name, url in rig.stubs.urls.items()}
    ports.update({int(p.url.rsplit(":", 1)[1]): f"aws-{n}" for n, p in rig.proxies.items()})
    ports[int(process.url.rsplit(":", 1)[1])] = "api-clients"
    return ports


def _sockets_by_peer(pid: int, names: dict[int, str]) -> dict[str, int]:
    """Open TCP sockets of ``pid`` by the service at the other end (Linux /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
                found[names.get(remote) or names.get(local) or "other"] += 1
    return dict(found)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


async def soak(rig: Rig, scale: Scale) -> list[Row]:
    """Sustained load on one role=all process; RSS, fds and loop lag sampled every 5 s."""
    if not scale.soak_seconds:
        return []
    started = time.monotonic()
    row = Row(f"6 soak {scale.soak_seconds:g}s")
    resources = await rig.fresh("soak")
    await rig.stubs.reset()
    settings = rig.settings(resources, "all", worker={"wait_seconds": 2})
    run = run_id()
    count = int(scale.soak_rate * scale.soak_seconds)
    samples: list[dict[str, float]] = []
    async with fleet(rig, settings, "soak") as processes, aiohttp.ClientSession() as http:
        (process,) = processes.alive()
        load = Load([process.url], rig.token(), run=run, rate=scale.soak_rate, count=count)
        sending = asyncio.create_task(load.run_all())
        while not sending.done():
            t0 = time.monotonic()
            async with http.get(process.url + "/healthz") as response:
                await response.read()
            lag = time.monotonic() - t0
            memory = process.memory()
            samples.append(
                {
                    "t": t0 - started,
                    "rss_mb": memory["rss"] / 2**20,
                    "fds": _fds(process.pid),
                    "healthz_ms": 1000 * lag,
                    "in_flight": await metric(process, "courier_messages_in_flight"),
                }
            )
            await asyncio.sleep(5)
        peak_sockets = _sockets_by_peer(process.pid, _peer_names(rig, process))
        result = await sending
        ids = {r.request_id for r in result.accepted}
        drained = await verify.wait_delivered(
            rig, resources, ids, timeout=scale.drain_timeout, settle_seconds=1
        )
        dlq = await verify.dlq_messages(rig, resources)
        # Pooled connections close once idle (aiohttp: 15 s): what stays open after is kept.
        await asyncio.sleep(IDLE_SECONDS)
        idle_fds = _fds(process.pid)
        idle_rss = process.memory()["rss"] / 2**20
        idle_sockets = _sockets_by_peer(process.pid, _peer_names(rig, process))
    summarize(row, result, drained, dlq=dlq)
    row.base_invariants()
    row.notes.update(
        fds_after_idle=idle_fds,
        rss_mb_after_idle=round(idle_rss, 1),
        sockets_at_last_sample=peak_sockets,
        sockets_after_idle=idle_sockets,
        in_flight_max=max((s["in_flight"] for s in samples), default=0),
    )
    second_half = samples[len(samples) // 2 :]
    rss_slope = _slope([(s["t"], s["rss_mb"]) for s in second_half]) * 60
    fd_slope = _slope([(s["t"], s["fds"]) for s in second_half]) * 60
    lags = [s["healthz_ms"] for s in samples]
    row.notes.update(
        samples=len(samples),
        rss_mb_first_last=[round(samples[0]["rss_mb"], 1), round(samples[-1]["rss_mb"], 1)]
        if samples
        else [],
        rss_slope_mb_per_min_2nd_half=round(rss_slope, 2),
        fds_first_last=[samples[0]["fds"], samples[-1]["fds"]] if samples else [],
        fd_slope_per_min_2nd_half=round(fd_slope, 2),
        healthz_ms_p50_p99=[
            round(verify.percentile(lags, 50), 1),
            round(verify.percentile(lags, 99), 1),
        ],
        achieved_rate=round(len(result.accepted) / max(1e-6, result.finished - result.started), 1),
    )
    row.check(rss_slope < 2.0, f"RSS grows {rss_slope:.1f} MB/min in the second half")
    baseline_fds = samples[0]["fds"] if samples else 0
    row.check(
        idle_fds <= baseline_fds + FD_SLACK,
        f"{idle_fds} fds open after {IDLE_SECONDS:g}s idle, {baseline_fds} at the start",
    )
    row.seconds = time.monotonic() - started
    return [row]


SCENARIOS: dict[str, Scenario] = {
    "crash": crash,
    "outage": outage,
    "poison": poison,
    "aws": aws,
    "graceful": graceful,
    "soak": soak,
}
