"""Targets: one row per legacy system: calls/s, errors, latency, concurrency, circuit."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ...state import TARGETS as COURIER_TARGETS
from ...worker.targets import TargetClient
from ..keys import COURIER, SAMPLER
from ..sampler import CounterSampler, Sample, take_sample
from .common import duration, millis, page


@dataclass(frozen=True, slots=True)
class TargetRow:
    """One target as the page shows it."""

    name: str
    url: str
    calls_per_second: float
    error_rate: str
    p50: str
    p99: str
    in_use: str
    limit: str
    waiting: str
    constrained: bool
    circuit: str
    half_open_in: str
    paused_for: str


def _row(client: TargetClient, start: Sample, end: Sample) -> TargetRow:
    rates = CounterSampler.target_rates(client.name, start, end)
    limiter = client.limiter
    paused = client.paused_for()
    half_open_in = client.breaker.retry_after()
    return TargetRow(
        name=client.name,
        url=client.settings.url,
        calls_per_second=round(rates.per_second, 2),
        error_rate="—" if rates.error_rate is None else f"{rates.error_rate:.1%}",
        p50=millis(rates.p50),
        p99=millis(rates.p99),
        in_use=str(limiter.in_use),
        limit=str(limiter.limit),
        waiting=str(limiter.waiting),
        # The target's own flag: an open circuit or a pause holds delivery back as well.
        constrained=client.constrained,
        circuit=client.breaker.state.name.lower().replace("_", "-"),
        half_open_in=duration(half_open_in) if half_open_in else "",
        paused_for=duration(paused) if paused else "",
    )


async def targets(request: web.Request) -> web.Response:
    """GET /targets."""
    clients = request.app[COURIER].get(COURIER_TARGETS, ())
    # One live sample for the page: every row's rates cover the same span.
    start, end = request.app[SAMPLER].recent(take_sample())
    return page(
        request,
        "targets.html",
        "targets",
        rows=[_row(client, start, end) for client in clients],
        window=duration(end.at - start.at),
    )


def setup(app: web.Application) -> None:
    """The targets page's route."""
    app.router.add_get("/targets", targets)
