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
from .state import CONSUMER, READINESS
from .systemd import Notifier, watchdog_running

log = logging.getLogger("courier.daemon")

READY_POLL_SECONDS = 0.1
MAX_HEADER_FIELD_BYTES = 16384
STATUS_INTERVAL_SECONDS = 10.0


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
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.http.drain_seconds,
        keepalive_timeout=settings.http.keepalive_timeout_seconds,
        # Room for courier's own 8 KiB token limit to answer with a 401 problem first.
        max_field_size=MAX_HEADER_FIELD_BYTES,
    )
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


async def run(
    settings: Settings, stop: asyncio.Event | None = None, notifier: Notifier | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down cleanly.

    Under systemd (Type=notify): READY=1 once /readyz would say ready, STATUS= lines while
    running, WATCHDOG=1 from the event loop, STOPPING=1 when the drain starts.
    """
    stop = stop or asyncio.Event()
    notifier = notifier or Notifier.from_env()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier.status("starting")
    try:
        async with watchdog_running(notifier), serving(settings) as listening:
            reporter = asyncio.create_task(_report(listening, notifier), name="systemd-status")
            await stop.wait()
            reporter.cancel()
            notifier.stopping(f"draining (at most {settings.http.drain_seconds:g}s)")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _report(listening: Listening, notifier: Notifier) -> None:
    readiness = listening.app[READINESS]
    # Readiness mixes flags and cached I/O probes; polling it is what /readyz callers do too.
    while not (await readiness.report())[0]:  # noqa: ASYNC110
        await asyncio.sleep(READY_POLL_SECONDS)
    notifier.ready(f"ready: {_activity(listening)}")
    log.info("ready", extra={"fields": {"event": "ready"}})
    while True:
        await asyncio.sleep(STATUS_INTERVAL_SECONDS)
        ready, checks = await readiness.report()
        failing = ", ".join(name for name, value in checks.items() if value != "ok")
        notifier.status(
            f"{'ready' if ready else 'NOT READY (' + failing + ')'}: {_activity(listening)}"
        )


def _activity(listening: Listening) -> str:
    parts = [f"API on {listening.url}"]
    if CONSUMER in listening.app:
        parts.append(f"{listening.app[CONSUMER].in_flight} messages in flight")
    return ", ".join(parts)
