"""Client of the identity back-end (IdM): the synchronous step of create-mailbox.

A timeout per attempt and a bounded number of retries for the answers ``service/errors.py``'s
HTTP table calls RETRY (5xx, 408, 425, 429), timeouts and connection errors. Every attempt
carries the same ``Idempotency-Key`` (the courier request id), so a retry never creates a
second identity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from . import metrics
from .errors import RETRY, CourierError, Decision, classify_http
from .settings import IdmSettings

log = logging.getLogger("courier.idm")

RETRY_DELAY_SECONDS = 0.05
_calls = metrics.LabelCache(metrics.idm_calls)


class IdmError(CourierError):
    """The IdM did not create the identity; ``kind`` says why: conflict, rejected, unavailable, timeout.

    ``decision`` comes from the table in ``service/errors.py``: RETRY for unavailable and timeout
    (retried here, then 502 / 504 + Retry-After), REFUSE for conflict (409) and rejected (502).
    """

    def __init__(self, kind: str, detail: str, decision: Decision = RETRY) -> None:
        super().__init__(detail)
        self.kind = kind
        self.decision = decision

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later."""
        return self.decision.retryable


class IdmClient:
    """Creates identities in the IdM over HTTP."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: IdmSettings,
        api_key: Callable[[], Awaitable[str]],
    ) -> None:
        self._session = session
        self._settings = settings
        self._api_key = api_key
        self._url = settings.url.rstrip("/") + "/identities"
        # Built once, not per call: the same for every attempt.
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)

    async def create_identity(self, request_id: str, identity: Mapping[str, Any]) -> str:
        """Create the identity; returns its IdM id or raises IdmError."""
        last: IdmError | None = None
        for attempt in range(self._settings.retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAY_SECONDS * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                identity_id = await self._attempt(request_id, identity)
            except IdmError as exc:
                _calls(exc.kind).inc()
                metrics.idm_latency.observe(time.perf_counter() - started)
                if not exc.retryable:
                    raise
                last = exc
                continue
            _calls("ok").inc()
            metrics.idm_latency.observe(time.perf_counter() - started)
            return identity_id
        assert last is not None
        raise last

    async def _attempt(self, request_id: str, identity: Mapping[str, Any]) -> str:
        headers = {"X-Api-Key": await self._api_key(), "Idempotency-Key": request_id}
        try:
            async with self._session.post(
                self._url, json=identity, headers=headers, timeout=self._timeout
            ) as response:
                document = await response.json(content_type=None) if response.status < 300 else None
                status = response.status
        except TimeoutError:
            raise IdmError(
                "timeout", f"the IdM did not answer within {self._settings.timeout_seconds}s"
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise IdmError(
                "unavailable", f"the IdM could not be reached ({type(exc).__name__})"
            ) from None
        return _identity_id(status, document)


def _identity_id(status: int, document: Any) -> str:
    if status >= 300:
        raise _answer_error(status)
    if not isinstance(document, dict) or not isinstance(document.get("id"), str):
        raise IdmError("unavailable", "the IdM answered without an identity id")
    return str(document["id"])


def _answer_error(status: int) -> IdmError:
    """The IdmError for a non-2xx answer, as the HTTP table decides."""
    decision = classify_http(status)
    if decision.retryable:
        return IdmError("unavailable", f"the IdM answered {status}", decision)
    if status == 409:
        return IdmError("conflict", "an identity with this username already exists", decision)
    # Any other refusal: courier sent something the IdM will never accept.
    return IdmError("rejected", f"the IdM rejected the identity ({status})", decision)
