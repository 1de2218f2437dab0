"""The long-lived process: serve the app until SIGTERM/SIGINT, then drain in order.

Shutdown, against one deadline (``http.drain_seconds`` from SIGTERM) shared by both halves:

1. Readiness turns false and the worker stops polling; its in-flight messages get until the
   deadline, in parallel with the API's in-flight requests (``app.begin_shutdown``).
2. Every response from now on carries ``Connection: close``, so a keep-alive client learns
   from an answer, never from a dropped connection, that it must reconnect.
3. A keep-alive connection is closed only once it has been idle for
   ``http.close_grace_seconds``. Closing an idle connection always races with a client that
   starts sending on it at that instant (no HTTP/1.1 server can avoid that); a connection in
   use keeps being answered instead, and the race is left to connections nobody used lately.
4. The listener stays open until no connection is left or ``close_grace_seconds`` have
   passed. It then closes without resetting what the kernel already accepted: connections
   waiting in the accept queue are taken over and answered first.
5. In-flight requests are answered, the worker releases what it could not finish and
   flushes its deletes (``worker.release_seconds`` after the deadline at most), then the
   resources close (cleanup contexts, in reverse). ``stop_bound_seconds`` is the whole bound,
   which must stay below systemd's ``TimeoutStopSec``.

A worker-role process serves /healthz, /readyz and /metrics on ``http.health_port`` (plus
``instance``) and never binds the API port, which it would otherwise share (SO_REUSEPORT)
with API processes and answer their clients with 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

from .api import health_routes
from .api.middleware import ProblemAppRunner
from .app import begin_shutdown, create_app, serves_api
from .net import bound_port, serving_app, start_site
from .settings import Settings
from .state import POLLER, READINESS, SETTINGS
from .systemd import Notifier, watchdog_running

log = logging.getLogger("courier.daemon")

READY_POLL_SECONDS = 0.1
MAX_HEADER_FIELD_BYTES = 16384
STATUS_INTERVAL_SECONDS = 10.0
DRAIN_POLL_SECONDS = 0.05
# A connection accepted just before the listener closed gets at least this long to send its
# request before it counts as idle, whatever close_grace_seconds says.
MIN_IDLE_SECONDS = 0.25
# Past the deadline, a request still running gets this long to end once cancelled, twice
# (aiohttp waits for the handler, then for its task).
CANCEL_SECONDS = 0.5
# Closing AWS clients, the HTTP session and the caches once both drains are over: an estimate
# (measured well under it; nothing cuts the close short), kept in stop_bound_seconds' margin.
EXIT_SECONDS = 2.0
MAX_QUEUED_ACCEPTS = 4096


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a running daemon can be reached (``url``: the API, or a worker's health port)."""

    app: web.Application
    url: str
    metrics_url: str | None
    console_url: str | None = None  # the operator console, when console.enabled


def stop_bound_seconds(settings: Settings) -> float:
    """The longest a stop can take from SIGTERM to exit: keep it below ``TimeoutStopSec``."""
    cancel = 2 * CANCEL_SECONDS
    drain = settings.http.drain_seconds
    if settings.console.enabled:  # its jobs are waited for alongside the drains
        from .console.actions import CLOSE_SECONDS  # imported only where a console runs

        drain = max(drain, CLOSE_SECONDS)
    return drain + max(settings.worker.release_seconds, cancel) + EXIT_SECONDS


# Where each port comes from, for the one line a port another process holds gets.
API_PORT_SETTING = "[http] port (COURIER_HTTP_PORT, or courier local --port; 0 = any free port)"
HEALTH_PORT_SETTING = "[http] health_port + instance (COURIER_HTTP_HEALTH_PORT)"
METRICS_PORT_SETTING = "[http] metrics_port + instance (COURIER_HTTP_METRICS_PORT)"


def _port_setting(settings: Settings) -> str:
    return API_PORT_SETTING if serves_api(settings) else HEALTH_PORT_SETTING


def serving_port(settings: Settings) -> int:
    """The API port, or for a worker-role process its own health port (never the API's)."""
    if serves_api(settings):
        return settings.http.port
    if settings.http.health_port == 0:
        return 0
    return settings.http.health_port + settings.instance


@dataclass
class _Closing:
    """Turned on at SIGTERM: from then on every response ends its connection."""

    on: bool = False

    async def mark(self, _: web.Request, response: web.StreamResponse) -> None:
        if self.on:
            # The headers are already computed when this signal runs: set both.
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"


def _runner(app: web.Application, settings: Settings) -> web.AppRunner:
    # What aiohttp's parser refuses never reaches the middlewares: problem+json all the same.
    return ProblemAppRunner(
        app,
        access_log=None,
        # Only what is still running at the shared deadline meets this: see _drain_http.
        shutdown_timeout=CANCEL_SECONDS,
        keepalive_timeout=settings.http.keepalive_timeout_seconds,
        # Room for courier's own 8 KiB token limit to answer with a 401 problem first.
        max_field_size=MAX_HEADER_FIELD_BYTES,
    )


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Listening]:
    """Start the app (and the metrics-only port, if set); drain and stop on exit."""
    app = create_app(settings)
    closing = _Closing()
    app.on_response_prepare.append(closing.mark)
    runner = _runner(app, settings)
    await runner.setup()
    site: web.TCPSite | None = None
    metrics = contextlib.AsyncExitStack()
    console = contextlib.AsyncExitStack()
    try:
        # Only API processes share a port; a worker's health port is its own.
        reuse_port = settings.http.reuse_port if serves_api(settings) else False
        port = serving_port(settings)
        site = web.TCPSite(runner, settings.http.host, port, reuse_port=reuse_port)
        await start_site(site, settings.http.host, port, _port_setting(settings))
        url = f"http://{settings.http.host}:{bound_port(site)}"
        metrics_url = await _start_metrics(metrics, settings)
        console_url = await _start_console(console, app, settings)
        log.info(
            "listening",
            extra={
                "fields": {
                    "event": "listening",
                    "url": url,
                    "metrics_url": metrics_url,
                    "role": settings.role,
                }
            },
        )
        yield Listening(app, url, metrics_url, console_url)
    finally:
        deadline = begin_shutdown(app)  # the worker drains in a task of its own from now
        # An Auto Scaling lifecycle drain may have set the worker's deadline long before this
        # SIGTERM; requests (normally none by then: the target was deregistered first) still
        # get the bound from now, which keeps the stop within stop_bound_seconds.
        deadline = max(deadline, asyncio.get_running_loop().time() + settings.http.drain_seconds)
        # The console closes alongside both drains (its jobs' wait is bounded:
        # console/actions.CLOSE_SECONDS), and before the clients it uses close.
        closing_console = asyncio.ensure_future(console.aclose())
        try:
            if site is not None:
                await _drain_http(
                    runner, site, closing, deadline, settings.http.close_grace_seconds
                )
        finally:
            await closing_console
        await runner.cleanup()
        await metrics.aclose()
        log.info("stopped", extra={"fields": {"event": "stopped"}})


async def _drain_http(
    runner: web.AppRunner, site: web.TCPSite, closing: _Closing, deadline: float, grace: float
) -> None:
    """Answer every request already read, end keep-alive connections cleanly, then stop."""
    loop = asyncio.get_running_loop()
    server = runner.server
    assert server is not None
    closing.on = True
    listen_until = min(loop.time() + grace, deadline)
    listening = True
    while loop.time() < deadline:
        _close_idle(server.connections, loop.time(), max(grace, MIN_IDLE_SECONDS))
        if listening and (not server.connections or loop.time() >= listen_until):
            listening = False
            await _stop_listening(runner, site)
            continue
        if not listening and not server.connections:
            return
        await asyncio.sleep(DRAIN_POLL_SECONDS)
    if listening:
        await _stop_listening(runner, site)
    if not server.connections:
        return
    log.warning(
        "connections still open at the drain deadline are closed, their requests cancelled",
        extra={"fields": {"event": "http_drain_cut_short", "connections": len(server.connections)}},
    )


def _close_idle(connections: list[RequestHandler], now: float, idle_seconds: float) -> None:
    for handler in connections:
        since = _idle_since(handler)
        if since is not None and now - since >= idle_seconds:
            handler.force_close()


def _idle_since(handler: RequestHandler) -> float | None:
    """When the connection last finished a response (or was accepted), while it waits for a
    request; None while a request is being read or answered.

    This is aiohttp's own test of idleness (what its keep-alive timer closes), on attributes
    it does not expose: a parsed request resolves the waiter, so a connection whose request
    has been read is never idle here.
    """
    waiter = handler._waiter
    if waiter is None or waiter.done():
        return None
    return handler._next_keepalive_close_time - handler.keepalive_timeout


async def _stop_listening(runner: web.AppRunner, site: web.TCPSite) -> None:
    """Close the listening sockets without resetting connections the kernel already accepted.

    Closing a listening socket resets every connection still in its accept queue, though the
    client completed its handshake and may have sent its request. So the event loop stops
    accepting first while a duplicate descriptor keeps the socket listening, the queue is
    emptied, and the socket closes right after, with no await in between. Those connections
    are then served like any other (and told ``Connection: close``).
    """
    server = site._server  # the asyncio server: aiohttp does not expose its sockets
    if server is None:
        return
    listeners = [
        socket.socket(fileno=os.dup(sock.fileno()))
        for sock in (getattr(server, "sockets", None) or [])
    ]
    server.close()
    accepted: list[socket.socket] = []
    for listener in listeners:
        accepted += _accept_queued(listener)
        listener.close()
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    for connection in accepted:
        await loop.connect_accepted_socket(runner.server, connection)
    log.info(
        "listener closed",
        extra={"fields": {"event": "listener_closed", "taken_from_queue": len(accepted)}},
    )


def _accept_queued(listener: socket.socket) -> list[socket.socket]:
    listener.setblocking(False)
    accepted = []
    for _ in range(MAX_QUEUED_ACCEPTS):
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            break
        accepted.append(connection)
    return accepted


async def _start_metrics(stack: contextlib.AsyncExitStack, settings: Settings) -> str | None:
    """The metrics-only port, when ``http.metrics_port`` is set; its /metrics URL."""
    if not settings.http.metrics_port:
        return None
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", health_routes.metrics_handler)
    port = settings.http.metrics_port + settings.instance
    host = settings.http.host
    served = serving_app(metrics_app, host, port, CANCEL_SECONDS, setting=METRICS_PORT_SETTING)
    return f"{await stack.enter_async_context(served)}/metrics"


async def _start_console(
    stack: contextlib.AsyncExitStack, app: web.Application, settings: Settings
) -> str | None:
    """The operator console on its own port, when enabled; its URL."""
    if not settings.console.enabled:
        return None
    from .console import serving_console  # jinja2 and the pages load only when enabled

    return await stack.enter_async_context(serving_console(app, settings))


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
            notifier.stopping(f"draining (at most {stop_bound_seconds(settings):g}s)")
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
    app = listening.app
    where = "API" if serves_api(app[SETTINGS]) else "health"
    parts = [f"{where} on {listening.url}"]
    if POLLER in app:
        parts.append(f"{app[POLLER].in_flight} messages in flight")
    return ", ".join(parts)
