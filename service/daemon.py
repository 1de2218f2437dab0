"""The long-lived process: serve the app until SIGTERM/SIGINT, then drain in order.

Shutdown order: report not-ready (draining) → stop listening → let in-flight requests
finish within ``http.drain_seconds`` → close resources (cleanup contexts, in reverse).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .api import health_routes
from .app import create_app
from .settings import Settings
from .state import READINESS

log = logging.getLogger("courier.daemon")


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a running daemon can be reached."""

    app: web.Application
    url: str
    metrics_url: str | None


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp exposes no public accessor for the bound socket
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Listening]:
    """Start the app (and the metrics-only port, if set); drain and stop on exit."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.http.drain_seconds)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(
            runner, settings.http.host, settings.http.port, reuse_port=settings.http.reuse_port
        )
        await site.start()
        url = f"http://{settings.http.host}:{_bound_port(site)}"
        metrics_url = None
        if settings.http.metrics_port:
            metrics_runner, metrics_url = await _start_metrics(settings)
        log.info(
            "listening",
            extra={"fields": {"event": "listening", "url": url, "metrics_url": metrics_url}},
        )
        yield Listening(app, url, metrics_url)
    finally:
        app[READINESS].draining = True
        log.info(
            "draining",
            extra={"fields": {"event": "draining", "bound_seconds": settings.http.drain_seconds}},
        )
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        log.info("stopped", extra={"fields": {"event": "stopped"}})


async def _start_metrics(settings: Settings) -> tuple[web.AppRunner, str]:
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", health_routes.metrics_handler)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    port = settings.http.metrics_port + settings.instance
    site = web.TCPSite(runner, settings.http.host, port)
    await site.start()
    return runner, f"http://{settings.http.host}:{port}/metrics"


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serving(settings):
            await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
