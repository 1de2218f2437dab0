"""Sockets aiohttp does not expose (the port a started site was bound to); side listeners."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


def bound_port(site: web.TCPSite) -> int:
    """The port a started ``site`` listens on: the kernel's choice when it was given port 0.

    ``runner.addresses`` (public) lists the addresses of every site of a runner, in no
    per-site order, so a runner with two sites (the daemon's API and metrics ports) cannot tell
    which is which; ``site.name`` repeats the port that was asked for (0). Only the site's own
    asyncio server (the private ``site._server``) knows.
    Raises RuntimeError if the site has not been started.
    """
    server = site._server
    sockets = getattr(server, "sockets", None)  # asyncio.Server has them; the base type does not
    if not sockets:
        raise RuntimeError("the site is not listening: start it first")
    return int(sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def serving_app(
    app: web.Application, host: str, port: int, shutdown_timeout: float
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0 = any free port) until exit; yields its base URL.

    For the side listeners (metrics, console): no access log, no drain beyond
    ``shutdown_timeout`` for requests still running at exit.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield f"http://{host}:{bound_port(site)}"
    finally:
        await runner.cleanup()
