"""Wires the aiohttp application: routes, middlewares, and one cleanup context per resource.

``create_app`` only wires; every resource (AWS clients, secret cache, ...) is opened in its
own cleanup context and stored under a typed ``AppKey``, so startup and shutdown order is the
order of this file and nothing lives in a global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from . import __version__, metrics
from .api import health_routes
from .api.middleware import ACCESS_LOG_KEY, observe
from .aws import AwsClients, open_clients
from .credstash import CredStash
from .health import Probe, Readiness
from .secrets import SecretCache
from .settings import Settings
from .state import AWS, READINESS, SECRETS, SETTINGS

log = logging.getLogger("courier.app")

PREFETCH_RETRY_SECONDS = 2.0


def required_secrets(settings: Settings) -> tuple[str, ...]:
    """Secret names this process cannot serve without: prefetched before it reports ready."""
    names = list(settings.secrets.prefetch)
    if settings.role in ("all", "api"):
        names += [settings.auth.hs256_secret, settings.idm.api_key_secret]
    if settings.role in ("all", "worker"):
        names += [target.secret for target in settings.targets]
    return tuple(dict.fromkeys(name for name in names if name))


def create_app(settings: Settings) -> web.Application:
    """The courier application for ``settings``; resources open when it starts."""
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[observe])
    app[SETTINGS] = settings
    app[READINESS] = Readiness()
    app[ACCESS_LOG_KEY] = settings.log.access_log
    app.cleanup_ctx.append(_aws_context)
    app.cleanup_ctx.append(_secrets_context)
    health_routes.setup(app)
    metrics.build_info.labels(__version__, settings.role).set(1)
    return app


async def _aws_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_clients(settings.aws) as clients:
        app[AWS] = clients
        app[READINESS].add_probe("aws", _aws_probe(clients, settings))
        yield


def _aws_probe(clients: AwsClients, settings: Settings) -> Probe:
    async def probe() -> None:
        if settings.queue.url:
            await clients.sqs.get_queue_attributes(
                QueueUrl=settings.queue.url, AttributeNames=["QueueArn"]
            )
        else:
            await clients.dynamodb.describe_table(TableName=settings.status.table)

    return probe


async def _secrets_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    clients = app[AWS]
    store = CredStash(clients.dynamodb, clients.kms, settings.secrets.table)
    async with SecretCache(store, settings.secrets) as cache:
        app[SECRETS] = cache
        names = required_secrets(settings)
        app[READINESS].add_check("secrets", lambda: cache.loaded(names))
        task = asyncio.create_task(_prefetch_until_loaded(cache, names), name="secrets-prefetch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _prefetch_until_loaded(cache: SecretCache, names: tuple[str, ...]) -> None:
    # Startup must not fail because the store blips; readiness stays false until this succeeds.
    while True:
        try:
            await cache.prefetch(names)
        except Exception as exc:
            log.warning(
                "secrets not loaded yet, retrying in %.0fs",
                PREFETCH_RETRY_SECONDS,
                extra={"fields": {"event": "secrets_prefetch_failed", "error": str(exc)}},
            )
            await asyncio.sleep(PREFETCH_RETRY_SECONDS)
        else:
            log.info(
                "secrets loaded", extra={"fields": {"event": "secrets_loaded", "count": len(names)}}
            )
            return
