"""Overview: throughput chart (live, from the process's counters), queues, in-flight, API."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ...state import POLLER, SETTINGS
from ..keys import COURIER, DEAD_LETTERS, QUEUES, SAMPLER
from ..queues import QueueDepth
from ..sampler import CHARTED, CounterSampler, Sample, take_sample
from .common import duration, millis, page


async def overview(request: web.Request) -> web.Response:
    """GET /: the chart's first data is in the page, so it is drawn before any poll."""
    chart = _chart(request)
    return page(
        request,
        "overview.html",
        "overview",
        queues=await _queues(request),
        chart=chart,
        chart_json=json.dumps(chart, separators=(",", ":")),
        interval=request.app[SAMPLER].interval,
    )


async def overview_json(request: web.Request) -> web.Response:
    """GET /overview.json: what the chart's script polls (the app sets ``no-store``)."""
    return web.json_response(_chart(request))


def _chart(request: web.Request) -> dict[str, Any]:
    """The chart's series, its count of non-zero points, and the numbers beside it (``stats``:
    keyed by the ids of the page's elements, so the script can write them as they come)."""
    sampler = request.app[SAMPLER]
    now = take_sample()  # one live sample for the whole response
    series = sampler.series(now)
    points = sum(
        1 for index in range(len(series["t"])) if any(series[name][index] for name in CHARTED)
    )
    return {"series": series, "points": points, "stats": _stats(request, *sampler.recent(now))}


def _stats(request: web.Request, start: Sample, now: Sample) -> dict[str, Any]:
    courier = request.app[COURIER]
    settings = courier[SETTINGS]
    api = CounterSampler.api_rates(start, now)
    poller = courier.get(POLLER)
    return {
        "in_flight": poller.in_flight if poller is not None else None,
        "in_flight_bound": settings.worker.max_in_flight if poller is not None else None,
        "api_rps": round(api.per_second, 2),
        "api_p50": millis(api.p50),
        "api_p99": millis(api.p99),
        "api_window": duration(api.seconds),
    }


async def _queues(request: web.Request) -> list[QueueDepth]:
    stats = request.app.get(QUEUES)
    if stats is None:
        return []
    reader = request.app.get(DEAD_LETTERS)
    fallback: dict[str, float | None] = {}
    last = reader.last if reader is not None else None
    if reader is not None and last is not None:
        failed_at = last.oldest_failed_at()
        fallback[reader.dlq_url] = None if failed_at is None else max(0.0, time.time() - failed_at)
    return await stats.read(fallback)


def setup(app: web.Application) -> None:
    """The overview's routes."""
    app.router.add_get("/", overview)
    app.router.add_get("/overview.json", overview_json)
