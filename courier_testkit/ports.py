"""Ports on 127.0.0.1: a free one to hand a child process, an aiohttp app served on one;
``bound_port`` is ``service.net``'s."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from service.net import bound_port

__all__ = ["LOOPBACK", "bound_port", "free_port", "free_port_pair", "serving"]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's choice; free until someone binds it).

    Also what a test wants for "a port that refuses connections".
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_port_pair(host: str = LOOPBACK) -> int:
    """A port p such that p and p + 1 are both free now (a daemon's HTTP and metrics ports)."""
    for _ in range(100):
        first = free_port(host)
        with socket.socket() as probe:
            try:
                probe.bind((host, first + 1))
            except OSError:
                continue
        return first
    raise RuntimeError("no two consecutive free ports")


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str = LOOPBACK) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop on a free port of ``host``; yields its base URL.

    For a stand-in a test talks to in-process (an AWS endpoint that answers errors, a JWKS
    server); cleaned up on exit, also after a failure.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        yield f"http://{host}:{bound_port(site)}"
    finally:
        await runner.cleanup()
