"""Secrets: names, versions, age and next refresh; never a value."""

from __future__ import annotations

from aiohttp import web

from ..keys import SECRET_INFO
from .common import page


async def secrets(request: web.Request) -> web.Response:
    """GET /secrets."""
    rows = await request.app[SECRET_INFO].rows()
    return page(request, "secrets.html", "secrets", rows=rows)


def setup(app: web.Application) -> None:
    """The secrets page's route."""
    app.router.add_get("/secrets", secrets)
