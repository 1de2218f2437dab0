"""Clients of the legacy systems: timeout, retries, circuit breaker, concurrency limit, idempotency.

Every call carries ``Idempotency-Key: <request id>:<target>`` so a redelivered message is
applied once by a target that honours it, and only targets not yet delivered are called.

What a failure means comes from the table in ``service/errors.py``: a status it calls RETRY
(5xx, 408, 425, 429), a timeout or a connection error is retried here, then with backoff; any
other 4xx is the target refusing the message (``TargetHttpError``, dead-lettered). A target
whose credential cannot be produced (no such secret, one that fails its integrity check, or
one IAM refuses) is misconfigured: ``TargetMisconfiguredError``, so the message waits with
backoff for an operator instead of being dead-lettered for a call that was never made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from .. import metrics
from ..errors import (
    RETRY,
    CircuitOpenError,
    TargetHttpError,
    TargetMisconfiguredError,
    TransientError,
    classify,
    is_retryable,
)
from ..secrets.errors import SecretError
from ..settings import TargetSettings
from .circuit import CircuitBreaker

log = logging.getLogger("courier.targets")

RETRY_DELAY_SECONDS = 0.1
SecretGetter = Callable[[str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One rendered call to a target."""

    request_id: str
    body: bytes
    content_type: str
    traceparent: str = ""


class TargetClient:
    """Delivers rendered events to one legacy system."""

    def __init__(
        self, settings: TargetSettings, session: aiohttp.ClientSession, secret: SecretGetter
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._session = session
        self._secret = secret
        self._limit = asyncio.Semaphore(settings.concurrency)
        # Built once, not per call: the same for every call to this target.
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._calls = metrics.LabelCache(metrics.target_calls)
        self._latency = metrics.target_latency.labels(settings.name)
        self.breaker = CircuitBreaker(
            settings.name, settings.breaker_failures, settings.breaker_cooldown_seconds
        )

    async def deliver(self, delivery: Delivery) -> None:
        """Deliver once (with immediate retries).

        Raises TargetHttpError, CircuitOpenError, TargetMisconfiguredError or TransientError.
        """
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)
            try:
                await self._attempt(delivery)
                return
            except (CircuitOpenError, TargetMisconfiguredError):
                raise  # an immediate retry cannot help: the call would not be made either
            except Exception as exc:
                if classify(exc) is not RETRY or attempt == self.settings.retries:
                    raise

    async def _attempt(self, delivery: Delivery) -> None:
        if not self.breaker.allow():
            self._calls(self.name, "circuit_open").inc()
            raise CircuitOpenError(self.name, self.breaker.retry_after())
        try:
            authorization = await self._authorization()
        except BaseException:
            self.breaker.abandon()  # e.g. the secret could not be read: the target said nothing
            raise
        started = time.perf_counter()
        try:
            async with self._limit:
                status = await self._call(delivery, authorization)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The network or a timeout: RETRY in service/errors.py, whatever the exception.
            self._record(
                started,
                "timeout" if isinstance(exc, TimeoutError) else "connection_error",
                ok=False,
            )
            raise TransientError(f"target {self.name!r}: {type(exc).__name__}") from exc
        except BaseException:
            self.breaker.abandon()  # cancelled: the target's answer was not seen
            raise
        if 200 <= status < 300:
            self._record(started, "ok", ok=True)
            return
        error = TargetHttpError(self.name, status)  # its decision comes from HTTP_STATUSES
        # A refusal (a 4xx other than 408/425/429) proves the target is up: it must not trip
        # the breaker.
        self._record(started, f"http_{status // 100}xx", ok=not is_retryable(error))
        raise error

    async def _authorization(self) -> str:
        """The Authorization header ("" when the target has no secret)."""
        if not self.settings.secret:
            return ""
        try:
            return f"Bearer {await self._secret(self.settings.secret)}"
        except SecretError as exc:
            if classify(exc) is RETRY:  # the store is down: an outage, retried like one
                raise
            # Missing, tampered, under another key or context, or refused by IAM (on AWS a
            # context the policy does not allow is AccessDenied): configuration, not poison.
            reason = getattr(exc, "reason", "secret_refused")
            self._calls(self.name, "misconfigured").inc()
            log.warning(
                "target %s is misconfigured: its secret cannot be read",
                self.name,
                extra={
                    "fields": {
                        "event": "target_misconfigured",
                        "reason": TargetMisconfiguredError.reason,
                        "target": self.name,
                        "secret": self.settings.secret,
                        "error": reason,
                    }
                },
            )
            cause = f"secret {self.settings.secret!r}: {reason}"
            raise TargetMisconfiguredError(self.name, cause) from exc

    async def _call(self, delivery: Delivery, authorization: str) -> int:
        headers = {
            "Content-Type": delivery.content_type,
            "Idempotency-Key": f"{delivery.request_id}:{self.name}",
        }
        if delivery.traceparent:
            headers["traceparent"] = delivery.traceparent
        if authorization:
            headers["Authorization"] = authorization
        async with self._session.request(
            self.settings.method,
            self.settings.url,
            data=delivery.body,
            headers=headers,
            timeout=self._timeout,
        ) as response:
            await response.read()  # drain so the connection returns to the pool
            return response.status

    def _record(self, started: float, outcome: str, *, ok: bool) -> None:
        self._calls(self.name, outcome).inc()
        self._latency.observe(time.perf_counter() - started)
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
