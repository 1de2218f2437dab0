"""The HTTP session of the hot AWS clients, reaching AWS the way botocore does.

courier's own SQS and DynamoDB clients (``service/sqs.py``, ``service/dynamo.py``) post on
aiohttp sessions of their own, next to aiobotocore's. botocore takes a proxy from
``HTTP_PROXY`` / ``HTTPS_PROXY`` unless ``NO_PROXY`` names the host, and trusts the CA bundle
of ``AWS_CA_BUNDLE`` (or ``ca_bundle`` in the AWS config file) besides the system's. A session
that ignored them would leave an instance behind an egress proxy, or a TLS-inspecting one,
with a cold path that works and a hot path that times out. ``open_http`` makes the same
choices with botocore's own functions, so both paths reach AWS or neither does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiobotocore.session import AioSession
from botocore.httpsession import ProxyConfiguration
from botocore.utils import get_environ_proxies
from yarl import URL

from .errors import SettingsError
from .settings import AwsSettings


@dataclass(frozen=True, slots=True)
class Route:
    """How requests to one endpoint leave this host."""

    # With the proxy's credentials, if any: aiohttp sends them as Proxy-Authorization.
    proxy: URL | None
    ca_bundle: str | None  # trusted besides the system's CAs


def route(endpoint_url: str, session: AioSession) -> Route:
    """The proxy and CA bundle botocore would use for ``endpoint_url``."""
    proxy_url = ProxyConfiguration(get_environ_proxies(endpoint_url)).proxy_url_for(endpoint_url)
    ca_bundle = session.get_config_variable("ca_bundle")
    return Route(URL(proxy_url) if proxy_url else None, str(ca_bundle) if ca_bundle else None)


def _ssl_context(ca_bundle: str) -> ssl.SSLContext:
    # As aiobotocore's own sessions: the system's CAs, and the bundle's on top.
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise SettingsError(
            f"AWS_CA_BUNDLE (ca_bundle) {ca_bundle}: cannot load it as PEM certificates: {reason}"
        ) from exc
    return context


@contextlib.asynccontextmanager
async def open_http(
    settings: AwsSettings, endpoint_url: str, session: AioSession, read_timeout: float
) -> AsyncIterator[aiohttp.ClientSession]:
    """A pooled session for the calls to ``endpoint_url``, routed as botocore routes them."""
    way = route(endpoint_url, session)
    context: ssl.SSLContext | bool = True
    if way.ca_bundle:
        context = await asyncio.to_thread(_ssl_context, way.ca_bundle)  # reads a file
    connector = aiohttp.TCPConnector(
        limit=settings.max_pool_connections, ttl_dns_cache=300, ssl=context
    )
    timeout = aiohttp.ClientTimeout(
        sock_connect=settings.connect_timeout_seconds, sock_read=read_timeout
    )
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, proxy=way.proxy) as http:
        yield http
