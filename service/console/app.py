"""Wires the console's aiohttp application: pages, sign-in, headers, and its resources.

The console is a second application on its own port, reading the courier application's state
(``COURIER``): the AWS clients, the envelope cipher, the status store, the poller, the
targets and the secret cache are the process's own, nothing is opened twice but a CloudWatch
client for the queues' oldest ages.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Middleware

from ..app import required_secrets, token_verifier
from ..aws import open_client
from ..secrets.credstash import CredStash
from ..state import AWS, SECRETS, SETTINGS
from ..state import VERIFIER as API_VERIFIER
from . import auth
from .actions import Jobs
from .deadletters import DeadLetterReader
from .keys import (
    COURIER,
    CSRF_KEY,
    DEAD_LETTERS,
    JOBS,
    QUEUES,
    SAMPLER,
    SECRET_INFO,
    SESSIONS,
    VERIFIER,
)
from .queues import QueueStats
from .sampler import CounterSampler
from .secretinfo import SecretInfo
from .views import PAGES
from .views.common import duration, millis, when

STATIC = Path(__file__).parent / "static"
# Scripts, styles, images and fetches from this console only; no inline script or style, no
# frames, no plugins, forms posting only here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def create_console_app(courier: web.Application) -> web.Application:
    """The console for a started courier application (its resources are open)."""
    app = web.Application(
        middlewares=[_own_host_only(courier[SETTINGS].console.host), auth.require_admin],
        client_max_size=64 * 1024,
    )
    app[COURIER] = courier
    app[CSRF_KEY] = secrets.token_bytes(32)
    app[SESSIONS] = auth.Sessions()
    app[VERIFIER] = courier[API_VERIFIER] if API_VERIFIER in courier else token_verifier(courier)
    environment = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("service.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(when=when, duration=duration, millis=millis)
    app.on_response_prepare.append(_security_headers)
    app.router.add_static("/static/", STATIC, name="static")
    auth.setup(app)
    for view in PAGES:
        view.setup(app)
    app.cleanup_ctx.append(_resources)
    return app


def _own_host_only(bind_host: str) -> Middleware:
    """Refuse (421) a request whose Host names another machine: DNS rebinding.

    A page on evil.example can point its name at 127.0.0.1 and reach this port; its Host
    header still says evil.example. Only the host name is checked, not the port: an SSM
    forward may listen on another local port. Bound to every address, any name is ours.
    """
    names = {"127.0.0.1", "localhost", "::1", bind_host.lower()}
    open_to_all = bind_host in ("", "0.0.0.0", "::")  # noqa: S104 (a check, not a bind)

    @web.middleware
    async def own_host(request: web.Request, handler: auth.Handler) -> web.StreamResponse:
        host = (request.host or "").lower()
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if open_to_all or name in names:
            return await handler(request)
        return web.Response(status=421, text="this console answers only to its own address")

    return own_host


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith("/static/"):
        headers["Cache-Control"] = "no-store"  # pages carry DLQ contents and status records


async def _resources(app: web.Application) -> AsyncIterator[None]:
    courier = app[COURIER]
    settings, clients = courier[SETTINGS], courier[AWS]
    queue = settings.queue
    async with contextlib.AsyncExitStack() as stack:
        sampler = CounterSampler(settings.console.sample_seconds)
        app[SAMPLER] = await stack.enter_async_context(sampler.running())
        cloudwatch = await stack.enter_async_context(open_client("cloudwatch", settings.aws))
        named = [("work queue", queue.url), ("dead-letter queue", queue.dlq_url)]
        named += [("extra queue", url) for url in settings.console.extra_queues]
        app[QUEUES] = QueueStats(clients.sqs, cloudwatch, named)
        if queue.dlq_url:
            reader = DeadLetterReader(clients.sqs, queue.dlq_url, queue.url)
            app[DEAD_LETTERS] = reader
            app[JOBS] = Jobs(reader)
            stack.push_async_callback(app[JOBS].aclose)
        store = CredStash.from_settings(clients.dynamodb, clients.kms, settings.secrets)
        app[SECRET_INFO] = SecretInfo(store, courier[SECRETS], required_secrets(settings))
        yield
