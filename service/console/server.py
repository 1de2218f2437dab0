"""The console's listener: its own port (``console.port`` plus ``instance``), 127.0.0.1 by default."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..net import serving_app
from ..settings import Settings
from .app import create_console_app

log = logging.getLogger("courier.console")

SHUTDOWN_SECONDS = 1.0
CONSOLE_PORT_SETTING = "[console] port + instance (COURIER_CONSOLE_PORT; 0 = any free port)"


def console_port(settings: Settings) -> int:
    """The port to bind: ``console.port`` plus ``instance``, or any free port for 0."""
    port = settings.console.port
    return port + settings.instance if port else 0


@contextlib.asynccontextmanager
async def serving_console(courier: web.Application, settings: Settings) -> AsyncIterator[str]:
    """Serve the console for the started ``courier`` app; yields its URL."""
    console = create_console_app(courier)
    host = settings.console.host
    port = console_port(settings)
    async with serving_app(
        console, host, port, SHUTDOWN_SECONDS, setting=CONSOLE_PORT_SETTING
    ) as url:
        log.info(
            "console listening",
            extra={"fields": {"event": "console_listening", "url": url}},
        )
        yield url
