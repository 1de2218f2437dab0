"""The hot path's DynamoDB client: aiodynamo's signing and HTTP, botocore's credentials and errors.

Every status-table call (one per API request, one per finished message) went through
aiobotocore at about 1 ms of CPU: botocore's generic request pipeline (model lookup,
validation, serialisation, event hooks, response parsing) dominates a call whose payload is a
few hundred bytes. aiodynamo signs and posts the same JSON in about 0.4 ms (README, "Where the
CPU goes"). aiobotocore stays for SQS, KMS and every cold path (CredStash, bootstrap, the
readiness probe), as the brief mandates.

What is kept from botocore on purpose:
- credentials: the aiobotocore session's own provider chain (environment, profile, IMDSv2 with
  its refresh), adapted to aiodynamo's ``Credentials`` interface, so every AWS call courier
  makes is signed with the same, refreshed keys;
- errors: a failed call raises botocore's ``ClientError`` with the shape botocore gives it
  (``Error.Code``, ``ResponseMetadata.HTTPStatusCode``, and the ``Item`` a failed condition
  returns), so ``service/errors.py`` classifies DynamoDB the same way whichever client made
  the call. A transport failure raises ``aiohttp.ClientError`` or ``TimeoutError``, both
  retryable there.

``DynamoDB`` offers the wire-format methods the status store uses (``put_item``,
``get_item``, ``update_item``, ``batch_write_item``) with botocore's keyword arguments, so
the store runs unchanged on an aiobotocore client too (the tests use both).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiobotocore.session import AioSession, get_session
from aiodynamo.client import Client
from aiodynamo.credentials import Credentials, Key
from aiodynamo.errors import AIODynamoError, UnknownError
from aiodynamo.http.types import HttpImplementation, Request, RequestFailed, Response
from aiodynamo.models import RetryConfig
from aiodynamo.sign import make_default_endpoint
from botocore.exceptions import ClientError
from yarl import URL

from . import metrics
from .egress import AwsHttp, open_http
from .settings import AwsSettings

_TARGET_PREFIX = "DynamoDB_20120810."
READ_TIMEOUT_SECONDS = 3.0


class BotocoreCredentials(Credentials):
    """aiodynamo's credentials interface over an aiobotocore session's provider chain."""

    def __init__(self, session: AioSession) -> None:
        self._session = session

    async def get_key(self, http: HttpImplementation) -> Key | None:
        """The current keys (botocore refreshes temporary ones before they expire)."""
        credentials = await self._session.get_credentials()
        if credentials is None:
            return None
        frozen = await credentials.get_frozen_credentials()
        return Key(frozen.access_key, frozen.secret_key, frozen.token)

    def invalidate(self) -> bool:
        """Nothing to invalidate: botocore refreshes temporary keys before they expire.

        False makes aiodynamo raise the ExpiredToken at once (classified in service/errors.py).
        """
        return False

    def is_disabled(self) -> bool:
        """Never: the chain may find keys later (e.g. IMDS not up yet)."""
        return False


@dataclass(frozen=True)
class _StandardRetry(RetryConfig):
    """How long aiodynamo keeps retrying what it retries: 1 s, full-jitter backoff.

    aiodynamo retries throttling (ThrottlingException, ProvisionedThroughputExceeded), 500,
    503, timeouts and connection errors, and raises anything else at once; once the budget is
    spent it raises the last error, and the caller decides as ``service/errors.py`` says (the
    API answers 503, the worker backs the message off). Shorter than botocore's standard mode
    on purpose: a batch of writers waits on each call.
    """

    time_limit_secs: float = 1.0
    base_delay_secs: float = 0.025
    max_delay_secs: float = 0.4

    def delays(self) -> Iterable[float]:
        """Full-jitter exponential backoff."""
        ceiling = self.base_delay_secs
        while True:
            yield random.uniform(0, ceiling)
            ceiling = min(self.max_delay_secs, ceiling * 2)


class _Transport:
    """aiodynamo's aiohttp transport, counting each attempt as botocore's clients do.

    aiodynamo signs the endpoint's host without its port, while aiohttp sends ``host:port``
    for a non-default port, so a server that checks signatures (moto with IAM enforcement, any
    endpoint on a port of its own) refuses the request. Sending the ``Host`` that was signed
    makes the two agree; for AWS's own endpoints (port 443) nothing changes.
    """

    def __init__(self, http: AwsHttp, signed_host: str) -> None:
        self._http = http
        self._signed_host = signed_host

    async def __call__(self, request: Request) -> Response:
        headers = dict(request.headers or {})
        target = headers.get("X-Amz-Target", "")
        metrics.aws_requests.labels("dynamodb", target.removeprefix(_TARGET_PREFIX)).inc()
        headers["Host"] = self._signed_host
        # aiodynamo's AIOHTTP transport, with the route's proxy (service/egress.py).
        try:
            async with self._http.request(
                request.method, request.url, headers=headers, data=request.body
            ) as response:
                return Response(response.status, await response.read())
        except aiohttp.ClientError as exc:
            raise RequestFailed(exc) from exc


class DynamoDB:
    """The DynamoDB calls of the hot path, in botocore's wire format and keyword style."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def put_item(self, **params: Any) -> dict[str, Any]:
        """PutItem."""
        return await self.call("PutItem", params)

    async def get_item(self, **params: Any) -> dict[str, Any]:
        """GetItem."""
        return await self.call("GetItem", params)

    async def update_item(self, **params: Any) -> dict[str, Any]:
        """UpdateItem."""
        return await self.call("UpdateItem", params)

    async def batch_write_item(self, **params: Any) -> dict[str, Any]:
        """BatchWriteItem."""
        return await self.call("BatchWriteItem", params)

    async def call(self, action: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``action``; a refusal raises ``ClientError`` as botocore would raise it."""
        try:
            return await self._client.send_request(action=action, payload=payload)
        except AIODynamoError as exc:
            raise _client_error(exc, action) from exc


def _client_error(exc: AIODynamoError, action: str) -> ClientError:
    """botocore's ClientError for an error DynamoDB answered (the body aiodynamo kept)."""
    body = _error_body(exc)
    code = str(body.get("__type", "")).rsplit("#", 1)[-1] or _CODES.get(type(exc).__name__, "")
    # DynamoDB answers 400 for every error but these two; aiodynamo keeps the status only of
    # errors it has no class for.
    status = exc.status if isinstance(exc, UnknownError) else _STATUSES.get(code, 400)
    response: dict[str, Any] = {
        "Error": {
            "Code": code or type(exc).__name__,
            "Message": str(body.get("message", body.get("Message", ""))),
        },
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    if "Item" in body:  # a failed condition with ReturnValuesOnConditionCheckFailure=ALL_OLD
        response["Item"] = body["Item"]
    return ClientError(response, action)


def _error_body(exc: AIODynamoError) -> Mapping[str, Any]:
    if isinstance(exc, UnknownError):
        try:
            parsed = json.loads(exc.body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}


# Errors aiodynamo raises without keeping DynamoDB's body: it answered with this status.
_CODES = {
    "InternalDynamoError": "InternalServerError",
    "ServiceUnavailable": "ServiceUnavailable",
    "NoCredentialsFound": "UnrecognizedClientException",
}
_STATUSES = {"InternalServerError": 500, "ServiceUnavailable": 503}


@contextlib.asynccontextmanager
async def open_dynamodb(
    settings: AwsSettings, endpoint_url: str | None = None, session: AioSession | None = None
) -> AsyncIterator[DynamoDB]:
    """A DynamoDB client on its own connection pool, with the AWS settings' connect timeout.

    ``endpoint_url`` is best the one the aiobotocore client resolved (``client.meta``: it
    knows partitions, FIPS and dual-stack); by default the configured one or aiodynamo's
    standard endpoint. It must be ``scheme://host[:port]``: aiodynamo signs the path ``/``.
    Requests go through the proxy botocore would use (``service/egress.py``). Credentials come
    from ``session``'s provider chain (a new session's by default).
    """
    configured = endpoint_url or settings.endpoint_for("dynamodb")
    endpoint = URL(configured) if configured else make_default_endpoint(settings.region)
    session = session or get_session()
    # DynamoDB answers in milliseconds: a read stalled longer than this is retried (within
    # _StandardRetry's budget) or fails, instead of holding a whole batch of writers for the
    # 25 s that SQS's long polls need.
    read_timeout = min(settings.read_timeout_seconds, READ_TIMEOUT_SECONDS)
    async with open_http(settings, str(endpoint), session, read_timeout) as http:
        client = Client(
            _Transport(http, endpoint.host or ""),
            BotocoreCredentials(session),
            settings.region,
            endpoint=endpoint,
            throttle_config=_StandardRetry(),
        )
        yield DynamoDB(client)
