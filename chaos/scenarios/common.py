"""What several scenarios share: the sizes (``Scale``), the five-step ``Scenario`` base, courier
fleets that can be killed and restarted, metric reads, and the accounting of a load run
(``summarize``) every scenario that sends through the API checks itself with."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chaos import verify
from chaos.load import LoadResult, Request
from chaos.report import Row
from chaos.rig import Rig
from courier_testkit.courier import CourierProcess
from service.bootstrap import Resources
from service.settings import Settings


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
    # A cached secret lives up to 1.5 TTLs after its read (a timer refreshes it half a TTL
    # before expiry, and the refreshed value's expiry follows the previous one): keep 1.5 TTLs
    # well under aws_cut_seconds, or the KMS cut may end before any value goes stale.
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
    aws_secret_ttl=1,
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

Run = Callable[[Rig, Scale], Awaitable[list[Row]]]
"""A scenario as ``python -m chaos`` runs it: the rig and the sizes in, checked rows out."""


class Scenario(abc.ABC):
    """One scenario in five steps, run in this order by ``steps``; state passes on ``self``.

    ``setup`` starts what the scenario needs (processes enter ``self.stack``), ``load`` starts
    sending, ``fault`` waits for its moment and breaks something, ``recover`` undoes the fault
    and waits for every accepted request to arrive, and ``check`` fills and checks the rows,
    after the processes stopped.
    """

    row: Row
    resources: Resources
    sending: asyncio.Task[LoadResult]  # the load, started by ``load``
    result: LoadResult
    ids: set[str]  # the request ids accepted
    drained: verify.Drained
    dlq: list[dict[str, Any]]

    def __init__(self, rig: Rig, scale: Scale) -> None:
        self.rig = rig
        self.scale = scale
        self.started = time.monotonic()
        self.stack = contextlib.AsyncExitStack()

    async def steps(self) -> list[Row]:
        """Run the five steps; the processes ``setup`` started stop before ``check``."""
        async with self.stack:
            await self.setup()
            await self.load()
            await self.fault()
            await self.recover()
        return await self.check()

    async def wait_delivered(self, timeout: float) -> None:
        """Wait for the load to end and each request it got accepted to reach every target."""
        self.result = await self.sending
        self.ids = {r.request_id for r in self.result.accepted}
        self.drained = await verify.wait_delivered(
            self.rig, self.resources, self.ids, timeout=timeout, settle_seconds=1
        )
        self.dlq = await verify.dlq_messages(self.rig, self.resources)

    @abc.abstractmethod
    async def setup(self) -> None: ...

    @abc.abstractmethod
    async def load(self) -> None: ...

    @abc.abstractmethod
    async def fault(self) -> None: ...

    @abc.abstractmethod
    async def recover(self) -> None: ...

    @abc.abstractmethod
    async def check(self) -> list[Row]: ...


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
        self.processes: list[CourierProcess | None] = [None] * size

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

    def alive(self) -> list[CourierProcess]:
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


async def metric(process: CourierProcess, name: str, *, url: str = "", **labels: str) -> float:
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
