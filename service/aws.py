"""AWS clients (aiobotocore), opened once per process and shared by every component."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from . import metrics
from .settings import AwsSettings

SERVICES = ("sqs", "dynamodb", "kms")


@dataclass(frozen=True, slots=True)
class AwsClients:
    """The three AWS clients courier talks to."""

    sqs: Any
    dynamodb: Any
    kms: Any


def client_config(settings: AwsSettings) -> AioConfig:
    """Timeouts and pool size from settings; botocore's standard retry mode (3 attempts)."""
    return AioConfig(
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        max_pool_connections=settings.max_pool_connections,
        retries={"mode": "standard", "total_max_attempts": 3},
    )


def _count_request(event_name: str, **_: Any) -> None:
    # event_name is "before-send.<service>.<Operation>"; fires once per HTTP attempt.
    _event, service_name, operation = event_name.split(".", 2)
    metrics.aws_requests.labels(service_name, operation).inc()


@contextlib.asynccontextmanager
async def open_client(
    service: str,
    settings: AwsSettings,
    endpoint_url: str | None = None,
    session: AioSession | None = None,
) -> AsyncIterator[Any]:
    """One aiobotocore client for ``service``, counting every request it sends."""
    session = session or get_session()
    async with session.create_client(
        service,
        region_name=settings.region,
        endpoint_url=endpoint_url or settings.endpoint_for(service),
        config=client_config(settings),
    ) as client:
        client.meta.events.register("before-send", _count_request)
        yield client


@contextlib.asynccontextmanager
async def open_clients(
    settings: AwsSettings, session: AioSession | None = None
) -> AsyncIterator[AwsClients]:
    """Open the SQS, DynamoDB and KMS clients; close them on exit."""
    # One session: botocore loads its endpoint and model data once, and resolves credentials once.
    session = session or get_session()
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(name, settings, session=session))
            for name in SERVICES
        ]
        yield AwsClients(*clients)
