"""The hot path's SQS client: botocore's signer and credentials, one aiohttp POST per call.

The worker receives and deletes, and the API sends, through SQS's JSON protocol. aiobotocore
spends most of a call's CPU in its generic pipeline (model lookup, validation, serialisation,
event hooks, endpoint rules, parsing) for requests whose shape never changes; ``LeanSqs``
builds the same JSON, signs it with botocore's own ``SigV4Auth`` and the aiobotocore session's
credential chain (nothing hand-written about either), and posts it on a pooled aiohttp session
(README, "Where the CPU goes").

It is a drop-in for the calls the hot path makes (``receive_message``, ``send_message``,
``send_message_batch``, ``delete_message_batch``, ``change_message_visibility_batch``), with
botocore's keyword arguments and response shapes, and botocore's errors: ``ClientError``
parsed as botocore parses SQS's query-compatible JSON errors (the legacy code from
``x-amzn-query-error``), ``HTTPClientError`` / ``ReadTimeoutError`` for the transport. So
``service/errors.py`` classifies them as before. Like botocore's standard retry mode it tries
a call up to 3 times when the failure may pass by itself (throttling, 5xx, the network). The cold
paths (DLQ moves, replay, bootstrap, the CLI) keep the aiobotocore client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiobotocore.session import AioSession, get_session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ReadTimeoutError,
)

from . import metrics
from .egress import AwsHttp, open_http
from .errors import RETRY, classify
from .settings import AwsSettings

ATTEMPTS = 3  # as botocore's standard retry mode
_CONTENT_TYPE = "application/x-amz-json-1.0"


class LeanSqs:
    """SQS's hot-path operations in botocore's call style, without botocore's request pipeline."""

    def __init__(self, http: AwsHttp, endpoint_url: str, region: str, session: AioSession) -> None:
        self._http = http
        self._url = endpoint_url.rstrip("/") + "/"
        self._region = region
        self._session = session

    async def receive_message(self, **params: Any) -> dict[str, Any]:
        """ReceiveMessage."""
        return await self.call("ReceiveMessage", params)

    async def send_message(self, **params: Any) -> dict[str, Any]:
        """SendMessage."""
        return await self.call("SendMessage", params)

    async def send_message_batch(self, **params: Any) -> dict[str, Any]:
        """SendMessageBatch."""
        return await self.call("SendMessageBatch", params)

    async def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        """DeleteMessageBatch."""
        return await self.call("DeleteMessageBatch", params)

    async def change_message_visibility_batch(self, **params: Any) -> dict[str, Any]:
        """ChangeMessageVisibilityBatch."""
        return await self.call("ChangeMessageVisibilityBatch", params)

    async def call(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """``action`` with ``params``; retried like botocore's standard mode when retryable."""
        body = json.dumps(params, separators=(",", ":")).encode()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._send(action, body)
            except (ClientError, HTTPClientError) as exc:
                # Only what may pass by itself (throttling, 5xx, the network), as botocore: a
                # misconfiguration (IAM, a missing queue) fails at once and is not tripled.
                if attempt == ATTEMPTS or classify(exc, "sqs") is not RETRY:
                    raise
            # Full jitter, as botocore's standard mode (base 50 ms here: the callers back off too).
            await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, action: str, body: bytes) -> dict[str, Any]:
        headers = await self._signed_headers(action, body)
        metrics.aws_requests.labels("sqs", action).inc()
        try:
            async with self._http.post(self._url, data=body, headers=headers) as response:
                payload = await response.read()
                status, response_headers = response.status, response.headers
        except TimeoutError as exc:  # connect or read: botocore's name for either will do
            raise ReadTimeoutError(endpoint_url=self._url, error=exc) from exc
        except aiohttp.ClientError as exc:
            raise HTTPClientError(error=exc) from exc
        try:
            document = json.loads(payload) if payload else {}
        except ValueError as exc:  # e.g. a proxy's HTML error page
            if status < 300:  # nothing to parse: the transport failed as far as we can tell
                raise HTTPClientError(error=exc) from exc
            document = {}
        if status >= 300:
            raise ClientError(_error(status, response_headers, document), action)
        return document if isinstance(document, dict) else {}

    async def _signed_headers(self, action: str, body: bytes) -> dict[str, str]:
        credentials = await self._session.get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={
                "Content-Type": _CONTENT_TYPE,
                "X-Amz-Target": f"AmazonSQS.{action}",
                # Errors then carry the query protocol's codes, as botocore asks for them.
                "x-amzn-query-mode": "true",
            },
        )
        SigV4Auth(await credentials.get_frozen_credentials(), "sqs", self._region).add_auth(request)
        return dict(request.headers.items())


def _error(status: int, headers: Mapping[str, str], body: Any) -> dict[str, Any]:
    """The error response botocore's JSON parser makes of this answer."""
    document = body if isinstance(body, dict) else {}
    code = str(document.get("__type", status)).split(":", 1)[0].rsplit("#", 1)[-1]
    error: dict[str, Any] = {
        "Code": code,
        "Message": str(document.get("message", document.get("Message", ""))),
    }
    legacy, _, fault = headers.get("x-amzn-query-error", "").partition(";")
    if legacy and fault:
        error.update(Code=legacy, QueryErrorCode=code, Type=fault)
    metadata: dict[str, Any] = {"HTTPStatusCode": status}
    if "x-amzn-requestid" in headers:
        metadata["RequestId"] = headers["x-amzn-requestid"]
    return {"Error": error, "ResponseMetadata": metadata}


@contextlib.asynccontextmanager
async def open_lean_sqs(
    settings: AwsSettings, endpoint_url: str, session: AioSession | None = None
) -> AsyncIterator[LeanSqs]:
    """A LeanSqs on its own connection pool, with the AWS settings' timeouts.

    ``endpoint_url`` is the one the aiobotocore SQS client resolved (``client.meta``), so both
    clients talk to the same endpoint, through the same proxy (``service/egress.py``).
    Credentials come from ``session``'s provider chain (a new session's by default).
    """
    session = session or get_session()
    async with open_http(settings, endpoint_url, session, settings.read_timeout_seconds) as http:
        yield LeanSqs(http, endpoint_url, settings.region, session)
