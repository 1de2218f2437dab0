"""Sockets aiohttp does not expose (the port a started site was bound to); side listeners;
a port courier cannot listen on, said in one line."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from typing import NoReturn

from aiohttp import web

from .errors import ListenError


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


def cannot_listen(host: str, port: int, setting: str, error: OSError) -> ListenError | None:
    """The one-line error for a failed bind of ``host:port`` (None for an error a setting
    does not cause); ``setting`` says where the port comes from."""
    if error.errno == errno.EADDRINUSE:
        why = f"is in use by another process: stop that process, or change {setting}"
    elif error.errno == errno.EACCES:
        why = f"needs privileges courier lacks (a port below 1024?): change {setting}"
    elif error.errno == errno.EADDRNOTAVAIL:
        why = f"is not an address of this machine: change the host beside {setting}"
    else:
        return None
    return ListenError(f"{host}:{port} {why}")


def _raise_listen_error(host: str, port: int, setting: str, error: OSError) -> NoReturn:
    refused = cannot_listen(host, port, setting, error)
    if refused is None:
        raise error
    raise refused from error


async def start_site(site: web.TCPSite, host: str, port: int, setting: str) -> None:
    """``site.start()``; a bind refused because of a setting raises ListenError naming it."""
    try:
        await site.start()
    except OSError as exc:
        _raise_listen_error(host, port, setting, exc)


def ensure_free(host: str, port: int, setting: str) -> None:
    """Raise ListenError if ``host:port`` cannot be bound now, for a server that would not
    say so itself (moto's thread exits and leaves its caller waiting). 0 passes."""
    if not port:
        return
    # SO_REUSEADDR as werkzeug and asyncio bind: a port in TIME_WAIT is free for them too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            _raise_listen_error(host, port, setting, exc)


@contextlib.asynccontextmanager
async def serving_app(
    app: web.Application, host: str, port: int, shutdown_timeout: float, *, setting: str
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0 = any free port) until exit; yields its base URL.

    For the side listeners (metrics, console): no access log, no drain beyond
    ``shutdown_timeout`` for requests still running at exit. ``setting`` names where the port
    comes from, for the error when it cannot be listened on.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await start_site(site, host, port, setting)
        yield f"http://{host}:{bound_port(site)}"
    finally:
        await runner.cleanup()
