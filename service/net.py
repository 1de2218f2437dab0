"""Sockets aiohttp does not expose: the port a started site was bound to."""

from __future__ import annotations

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
