"""What every page's template gets: who is signed in, the CSRF token, the active nav entry."""

from __future__ import annotations

import datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from ...state import STATUS
from ...status import StatusRecord
from ..keys import COURIER, CSRF, PRINCIPAL


def page(
    request: web.Request, template: str, active: str, status: int = 200, **context: Any
) -> web.Response:
    """Render ``template`` inside the console's layout."""
    return aiohttp_jinja2.render_template(
        template,
        request,
        {
            "who": request[PRINCIPAL].subject,
            "csrf": request[CSRF],
            "active": active,
            **context,
        },
        status=status,
    )


async def read_record(request: web.Request, request_id: str) -> tuple[StatusRecord | None, str]:
    """``request_id``'s status record (None when there is none) and "", or (None, why the
    status table cannot be read now)."""
    try:
        return await request.app[COURIER][STATUS].get(request_id), ""
    except Exception as exc:
        return None, f"the status table cannot be read now: {type(exc).__name__}"


def when(unix: float | None) -> str:
    """A Unix time as UTC ISO 8601 to the second ("" for none)."""
    if not unix:
        return ""
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: float | None) -> str:
    """``seconds`` as a short human duration ("—" for unknown)."""
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h {seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d {seconds % 86400 // 3600:.0f}h"


def millis(seconds: float | None) -> str:
    """A latency in ms ("—" for none)."""
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"
