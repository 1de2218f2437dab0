"""Wires the aiohttp application: routes, middlewares, and one cleanup context per resource.

``create_app`` only wires; every resource (AWS clients, HTTP session, secret cache, ...) is
opened in its own cleanup context and stored under a typed ``AppKey`` (``state.py``), so
startup order is the order of ``_contexts`` and shutdown is its reverse. No globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
from aiobotocore.session import get_session
from aiohttp import web

from . import __version__, metrics
from .api import health_routes, mailboxes, openapi
from .api.auth import Jwks, TokenVerifier
from .api.middleware import ACCESS_LOG_KEY, observe
from .aws import AwsClients, open_client, open_clients
from .dynamo import open_dynamodb
from .ec2 import Imds, LifecycleWatcher, identify
from .envelope import EnvelopeCipher
from .errors import SettingsError
from .health import Probe, Readiness
from .idm import IdmClient
from .logs import set_process_fields
from .queue import Producer
from .secrets.cache import SecretCache
from .secrets.credstash import CredStash
from .settings import Settings, WorkerSettings
from .sqs import open_lean_sqs
from .state import (
    AWS,
    ENVELOPE,
    HOT_DYNAMODB,
    HOT_SQS,
    HTTP,
    IDM,
    POLLER,
    PRODUCER,
    READINESS,
    SECRETS,
    SETTINGS,
    STATUS,
    TARGETS,
    VERIFIER,
)
from .status import StatusStore
from .worker.dlq import DeadLetterQueue
from .worker.fleet import membership_for
from .worker.pipeline import Pipeline
from .worker.poller import Poller
from .worker.redrive import RedriveLimit
from .worker.targets import TargetClient

log = logging.getLogger("courier.app")

PREFETCH_RETRY_SECONDS = 2.0
STATUS_DRAIN_SECONDS = 5.0
WORKER_SETTLE_POLL_SECONDS = 0.05
Context = Callable[[web.Application], AsyncIterator[None]]


@dataclass
class Shutdown:
    """The one deadline both halves drain against, and the worker's drain once started."""

    deadline: float | None = None  # event-loop time
    worker: asyncio.Task[None] | None = None


SHUTDOWN = web.AppKey("shutdown", Shutdown)


def serves_api(settings: Settings) -> bool:
    """Whether this process runs the API half."""
    return settings.role in ("all", "api")


def runs_worker(settings: Settings) -> bool:
    """Whether this process runs the worker half."""
    return settings.role in ("all", "worker")


def check_runnable(settings: Settings) -> None:
    """Cross-setting requirements of the daemon (per role), as one-line SettingsErrors."""
    if not settings.queue.url:
        raise SettingsError(
            "queue.url (COURIER_QUEUE_URL) is required to run the API or the worker"
        )
    if runs_worker(settings) and not settings.queue.dlq_url:
        raise SettingsError("queue.dlq_url (COURIER_QUEUE_DLQ_URL) is required to run the worker")
    if runs_worker(settings) and not settings.targets:
        raise SettingsError("targets: the worker needs at least one [[targets]] entry")
    health = settings.http.health_port + settings.instance
    if settings.role == "worker" and settings.http.health_port and health == settings.http.port:
        raise SettingsError(
            f"http.health_port ({health} with instance {settings.instance}) is the API port: a"
            " worker-role process must not bind the port API processes share"
        )


def required_secrets(settings: Settings) -> tuple[str, ...]:
    """Secret names this process cannot serve without: prefetched before it reports ready."""
    names = list(settings.secrets.prefetch)
    if serves_api(settings):
        names += [settings.auth.hs256_secret, settings.idm.api_key_secret]
    if runs_worker(settings):
        names += [target.secret for target in settings.targets]
    return tuple(dict.fromkeys(name for name in names if name))


def create_app(settings: Settings) -> web.Application:
    """The courier application for ``settings``; resources open when it starts."""
    check_runnable(settings)
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[observe])
    app[SETTINGS] = settings
    app[READINESS] = Readiness()
    app[ACCESS_LOG_KEY] = settings.log.access_log
    app[SHUTDOWN] = Shutdown()
    contexts: list[Context] = [_aws_context, _http_context, _secrets_context, _data_context]
    if serves_api(settings):
        contexts += [_producer_context, _api_context]
        mailboxes.setup(app)
        openapi.setup(app)
    if runs_worker(settings):
        contexts.append(_worker_context)
    if settings.ec2.enabled != "off":
        contexts.append(_ec2_context)
    app.cleanup_ctx.extend(contexts)
    health_routes.setup(app)
    metrics.build_info.labels(__version__, settings.role).set(1)
    return app


async def _aws_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # One session for every client: one credential chain (and IMDS refresh) per process. The
    # hot-path clients use the endpoints botocore resolved (partitions, FIPS, dual-stack).
    session = get_session()
    async with (
        open_clients(settings.aws, session) as clients,
        open_lean_sqs(settings.aws, clients.sqs.meta.endpoint_url, session) as hot_sqs,
        open_dynamodb(settings.aws, clients.dynamodb.meta.endpoint_url, session) as hot_dynamodb,
    ):
        app[AWS] = clients
        app[HOT_SQS] = hot_sqs
        app[HOT_DYNAMODB] = hot_dynamodb
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


async def _http_context(app: web.Application) -> AsyncIterator[None]:
    # One pooled session for every outbound HTTP call (IdM, JWKS, legacy targets).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[HTTP] = session
        yield


async def _secrets_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    clients = app[AWS]
    store = CredStash.from_settings(clients.dynamodb, clients.kms, settings.secrets)
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


async def _data_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    status = StatusStore(app[HOT_DYNAMODB], settings.status.table, settings.status.ttl_days)
    app[STATUS] = status
    app[ENVELOPE] = EnvelopeCipher(app[AWS].kms, settings.envelope)
    yield
    await app[ENVELOPE].aclose()
    try:
        # Every writer awaits its own write, and the worker has stopped by now: this only
        # finishes a write whose caller went away. Bounded, so DynamoDB cannot hold the exit.
        await asyncio.wait_for(status.drain(), STATUS_DRAIN_SECONDS)
    except TimeoutError:
        log.warning(
            "status writes still in flight at exit",
            extra={"fields": {"event": "status_drain_timeout"}},
        )


async def _producer_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    producer = Producer(
        app[HOT_SQS],
        settings.queue.url,
        batching=settings.queue.batch_sends,
        linger_seconds=settings.queue.send_linger_seconds,
    )
    app[PRODUCER] = producer
    yield
    await producer.aclose()


def _secret_getter(cache: SecretCache, name: str) -> Callable[[], Awaitable[str]]:
    return partial(cache.get, name)


def token_verifier(app: web.Application) -> TokenVerifier:
    """A verifier of this deployment's tokens (the API's, and the console's on its own port)."""
    settings, cache, session = app[SETTINGS], app[SECRETS], app[HTTP]
    hs256 = (
        _secret_getter(cache, settings.auth.hs256_secret) if settings.auth.hs256_secret else None
    )
    jwks = (
        Jwks(
            session,
            settings.auth.jwks_url,
            settings.auth.jwks_refresh_seconds,
            max_age_seconds=settings.auth.jwks_max_age_seconds,
        )
        if settings.auth.jwks_url
        else None
    )
    return TokenVerifier(settings.auth, hs256, jwks)


async def _api_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache, session = app[SECRETS], app[HTTP]
    app[VERIFIER] = token_verifier(app)
    app[IDM] = IdmClient(session, settings.idm, _secret_getter(cache, settings.idm.api_key_secret))
    yield


async def _worker_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    targets = [TargetClient(target, app[HTTP], app[SECRETS].get) for target in settings.targets]
    app[TARGETS] = tuple(targets)
    pipeline = Pipeline(app[ENVELOPE], app[STATUS], targets, settings.worker)
    # Receives and acks per message batch go the lean way; DLQ moves are rare, aiobotocore's.
    dlq = DeadLetterQueue(app[AWS].sqs, settings.queue.dlq_url, settings.queue.url)
    redrive = RedriveLimit(app[AWS].sqs, settings.queue.url)
    poller = Poller(
        app[HOT_SQS],
        settings.queue.url,
        pipeline.handle,
        settings.worker,
        dlq.move,
        redrive=redrive,
    )
    app[POLLER] = poller
    # Fleet-wide caps (worker/fleet.py): joined before the first message, left once drained.
    fleet = membership_for(app[AWS].dynamodb, settings.status.table, targets)
    if fleet is not None:
        fleet.start()
    poller.start()
    yield
    # Under the daemon the drain began at SIGTERM and ran alongside the API's (begin_shutdown).
    # An app stopped another way (a test's runner.cleanup) starts it only now: aiohttp has
    # already drained the API by then, so there the two drains run one after the other.
    begin_shutdown(app)
    worker = app[SHUTDOWN].worker
    assert worker is not None
    try:
        await worker
    finally:
        if fleet is not None:
            await fleet.stop()


def begin_shutdown(app: web.Application) -> float:
    """Start draining now, if not already begun; the shared deadline (event-loop time).

    Readiness turns false and the worker stops polling at once, then finishes its in-flight
    messages by the deadline in a task of its own. The daemon calls this at SIGTERM and only
    then drains the API's requests (``daemon._drain_http``) against the same deadline, so the
    two drains overlap and never add up (``tests/test_shutdown.py`` checks it). The earliest
    caller (SIGTERM, or the Auto Scaling lifecycle hook) sets the deadline,
    ``http.drain_seconds`` from then: that setting bounds both halves, not only HTTP.
    """
    state, settings = app[SHUTDOWN], app[SETTINGS]
    if state.deadline is None:
        state.deadline = asyncio.get_running_loop().time() + settings.http.drain_seconds
        app[READINESS].draining = True
        log.info(
            "draining",
            extra={"fields": {"event": "draining", "bound_seconds": settings.http.drain_seconds}},
        )
    if POLLER in app and state.worker is None:
        state.worker = asyncio.create_task(
            _drain_worker(app[POLLER], state.deadline, settings.worker), name="worker-drain"
        )
    return state.deadline


async def _drain_worker(poller: Poller, deadline: float, settings: WorkerSettings) -> None:
    """In-flight messages get until ``deadline``; releasing the rest and flushing deletes get
    ``release_seconds`` more. Past that, systemd's SIGKILL would cut them anyway: better to
    stop here and let the visibility timeout hand the unreleased messages back."""
    loop = asyncio.get_running_loop()
    poller.stop_polling()
    # A receive cut short stays a long poll at SQS, which can still hand it messages until its
    # WaitTimeSeconds end; stop() can release them only if the receive is back by then. While
    # in-flight work keeps the process here anyway, let those receives come back first.
    settle = min(loop.time() + settings.wait_seconds, deadline)
    while poller.in_flight and loop.time() < settle:  # noqa: ASYNC110 - a count, no event
        await asyncio.sleep(WORKER_SETTLE_POLL_SECONDS)
    remaining = max(0.0, deadline - loop.time())
    try:
        await asyncio.wait_for(poller.stop(remaining), remaining + settings.release_seconds)
    except TimeoutError:
        log.error(
            "releasing messages and flushing deletes did not finish in time",
            extra={
                "fields": {
                    "event": "worker_drain_cut_short",
                    "bound_seconds": settings.release_seconds,
                }
            },
        )


async def _ec2_context(app: web.Application) -> AsyncIterator[None]:
    # In the background: off EC2 the IMDS probe would otherwise delay startup by its timeout.
    task = asyncio.create_task(_ec2_integration(app), name="ec2")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _ec2_integration(app: web.Application) -> None:
    settings = app[SETTINGS]
    imds = Imds(app[HTTP], settings.ec2)
    identity = await identify(imds, settings.ec2)
    if identity is None:
        if settings.ec2.enabled == "on":
            log.error("ec2.enabled is on but IMDS is unreachable: no lifecycle draining")
        return
    set_process_fields(
        instance_id=identity.instance_id, availability_zone=identity.availability_zone
    )
    metrics.instance_info.labels(identity.instance_id, identity.availability_zone).set(1)
    endpoint = settings.ec2.autoscaling_endpoint_url or None
    async with open_client("autoscaling", settings.aws, endpoint) as autoscaling:
        watcher = LifecycleWatcher(
            imds, autoscaling, identity, settings.ec2, partial(_drain_for_termination, app)
        )
        await watcher.run()


async def _drain_for_termination(app: web.Application) -> None:
    begin_shutdown(app)
    worker = app[SHUTDOWN].worker
    if worker is not None:
        await asyncio.shield(worker)  # the lifecycle watcher's cancellation must not cut it
