"""The HTTP sessions of the hot AWS clients, reaching AWS the way botocore does.

courier's own SQS and DynamoDB clients (``service/sqs.py``, ``service/dynamo.py``) post on
aiohttp sessions of their own, next to aiobotocore's. botocore takes a proxy from
``HTTP_PROXY`` / ``HTTPS_PROXY`` unless ``NO_PROXY`` names the host, and verifies TLS against
``AWS_CA_BUNDLE`` (or ``ca_bundle`` in the AWS config file) when one is set, else against
certifi's bundle. A session that ignored them would leave an instance behind an egress proxy,
or a TLS-inspecting one, with a cold path that works and a hot path that times out.
``open_http`` makes the same choices with botocore's own functions, so both paths reach AWS or
neither does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiobotocore.session import AioSession
from botocore.httpsession import ProxyConfiguration, get_cert_path
from botocore.utils import get_environ_proxies
from yarl import URL

from .errors import SettingsError
from .settings import AwsSettings


@dataclass(frozen=True, slots=True)
class Route:
    """How requests to one endpoint leave this host."""

    # Without credentials: they travel as Proxy-Authorization, never in a URL that an
    # exception (and so a log line) would quote.
    proxy: URL | None
    proxy_headers: Mapping[str, str] | None = field(repr=False)
    ca_bundle: str | None  # trusted instead of certifi's bundle, as botocore does

    def request_options(self) -> dict[str, Any]:
        """The keyword arguments that send one aiohttp request this way."""
        if self.proxy is None:
            return {}
        return {"proxy": self.proxy, "proxy_headers": self.proxy_headers}


def route(endpoint_url: str, session: AioSession) -> Route:
    """The proxy and CA bundle botocore would use for ``endpoint_url``."""
    proxies = ProxyConfiguration(get_environ_proxies(endpoint_url))
    proxy_url = proxies.proxy_url_for(endpoint_url)
    ca_bundle = session.get_config_variable("ca_bundle")
    bundle = str(ca_bundle) if ca_bundle else None
    if not proxy_url:
        return Route(None, None, bundle)
    return Route(URL(proxy_url).with_user(None), proxies.proxy_headers_for(proxy_url), bundle)


class AwsHttp:
    """A pooled aiohttp session whose every request takes the endpoint's ``Route``."""

    def __init__(self, session: aiohttp.ClientSession, way: Route) -> None:
        self.session = session
        self.route = way

    def request(
        self, method: str, url: str, **kwargs: Any
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """``session.request`` through the route's proxy, if any."""
        return self.session.request(method, url, **self.route.request_options(), **kwargs)

    def post(self, url: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """``request("POST", ...)``."""
        return self.request("POST", url, **kwargs)


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    # As aiobotocore's sessions: only the configured bundle, else certifi's (get_cert_path).
    try:
        return ssl.create_default_context(cafile=get_cert_path(ca_bundle or True))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise SettingsError(
            f"AWS_CA_BUNDLE (ca_bundle) {ca_bundle}: cannot load it as PEM certificates: {reason}"
        ) from exc


@contextlib.asynccontextmanager
async def open_http(
    settings: AwsSettings, endpoint_url: str, session: AioSession, read_timeout: float
) -> AsyncIterator[AwsHttp]:
    """A pooled session for the calls to ``endpoint_url``, routed as botocore routes them."""
    way = route(endpoint_url, session)
    context = await asyncio.to_thread(_ssl_context, way.ca_bundle)  # reads a file
    connector = aiohttp.TCPConnector(
        limit=settings.max_pool_connections, ttl_dns_cache=300, ssl=context
    )
    timeout = aiohttp.ClientTimeout(
        sock_connect=settings.connect_timeout_seconds, sock_read=read_timeout
    )
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        yield AwsHttp(http, way)
