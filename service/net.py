"""Sockets aiohttp does not expose (the port a started site was bound to); side listeners;
a port another process holds, said in one line."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from .errors import PortInUseError


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


def port_in_use(host: str, port: int, setting: str) -> PortInUseError:
    """The error for ``host:port`` held by another process; ``setting`` says how to change it."""
    return PortInUseError(
        f"{host}:{port} is in use by another process: stop that process, or change {setting}"
    )


async def start_site(site: web.TCPSite, host: str, port: int, setting: str) -> None:
    """``site.start()``; a port another process holds raises PortInUseError naming ``setting``."""
    try:
        await site.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise port_in_use(host, port, setting) from exc


def ensure_free(host: str, port: int, setting: str) -> None:
    """Raise PortInUseError if ``host:port`` cannot be bound now, for a server that would
    not say so itself (moto's thread exits and leaves its caller waiting)."""
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise port_in_use(host, port, setting) from exc


@contextlib.asynccontextmanager
async def serving_app(
    app: web.Application, host: str, port: int, shutdown_timeout: float, *, setting: str
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0 = any free port) until exit; yields its base URL.

    For the side listeners (metrics, console): no access log, no drain beyond
    ``shutdown_timeout`` for requests still running at exit. ``setting`` names where the port
    comes from, for the error when another process holds it.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await start_site(site, host, port, setting)
        yield f"http://{host}:{bound_port(site)}"
    finally:
        await runner.cleanup()
