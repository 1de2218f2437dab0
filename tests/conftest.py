"""Shared fixtures: one moto server per session, bootstrapped resources, fresh queues per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from service.aws import AwsClients, open_clients
from service.bootstrap import ResourceNames, Resources, bootstrap
from service.local import EmbeddedAws, use_fake_credentials
from service.settings import AwsSettings, Settings, load_settings

DEMO_SECRETS = {
    "courier.jwt.hs256": "test-hs256-key-0123456789abcdef0123456789abcdef",
    "courier.idm.api_key": "test-idm-api-key",
}
_counter = itertools.count()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server on 127.0.0.1, shared by the whole session."""
    use_fake_credentials()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with EmbeddedAws() as server:
        yield server.endpoint_url


@pytest.fixture(scope="session")
def aws_settings(moto_endpoint: str) -> AwsSettings:
    return AwsSettings(region="us-east-1", endpoint_url=moto_endpoint, read_timeout_seconds=25)


@pytest.fixture(scope="session")
async def aws(aws_settings: AwsSettings) -> AsyncIterator[AwsClients]:
    """Shared aiobotocore clients talking to moto over HTTP."""
    async with open_clients(aws_settings) as clients:
        yield clients


@pytest.fixture(scope="session")
async def resources(aws: AwsClients) -> Resources:
    """The session's bootstrapped queues, tables, keys and demo secrets."""
    return await bootstrap(aws, ResourceNames(prefix="session"), DEMO_SECRETS)


@pytest.fixture
async def fresh(aws: AwsClients) -> Resources:
    """Resources with a fresh queue pair for one test (moto slows as a queue fills up)."""
    names = ResourceNames(prefix=f"t{os.getpid()}-{next(_counter)}")
    return await bootstrap(aws, names, DEMO_SECRETS)


@pytest.fixture
def settings(aws_settings: AwsSettings, fresh: Resources) -> Settings:
    """Settings pointed at moto and this test's fresh resources."""
    base = load_settings(environ={}).replace(aws=aws_settings)
    return fresh.apply_to(base)


@pytest.fixture(autouse=True)
def _release_stopped_apps() -> Iterator[None]:
    """aiohttp memoises middleware chains per app in a module-level LRU (1024 entries) that
    keeps every stopped app, and its AWS clients, alive; with an app per test the heap grows
    until full GC pauses take seconds. Production runs one app, so this is test-only."""
    yield
    from aiohttp import web_app

    web_app._cached_build_middleware.cache_clear()
