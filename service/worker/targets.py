"""Clients of the legacy systems: timeout, retries, circuit breaker, concurrency limit, idempotency.

Every call carries ``Idempotency-Key: <request id>:<target>`` so a redelivered message is
applied once by a target that honours it, and only targets not yet delivered are called.

What a failure means comes from the table in ``service/errors.py``: a status it calls RETRY
(5xx, 408, 425, 429), a timeout or a connection error is retried here, then with backoff; any
other 4xx is the target refusing the message (``TargetHttpError``, dead-lettered). A target
whose credential cannot be produced (no such secret, one that fails its integrity check, or
one IAM refuses) is misconfigured: ``TargetMisconfiguredError``, so the message waits with
backoff for an operator instead of being dead-lettered for a call that was never made.

How many calls are open at once is ``ConcurrencyLimit``'s business (``limiter.py``): it adapts
to the target's latency and drops. A 429 or 503 carrying ``Retry-After`` pauses every call to
the target from this process for that long (``TargetPausedError``): the messages concerned
come back once the pause ends, not after the usual exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import aiohttp

from .. import metrics
from ..errors import (
    RETRY,
    CircuitOpenError,
    TargetHttpError,
    TargetMisconfiguredError,
    TargetPausedError,
    TransientError,
    classify,
    is_retryable,
    told_wait,
)
from ..http_headers import delta_seconds, http_date
from ..secrets.errors import SecretError
from ..settings import TargetSettings
from .circuit import CircuitBreaker, CircuitState
from .limiter import CallOutcome, ConcurrencyLimit, NoSlotsError

log = logging.getLogger("courier.targets")

RETRY_DELAY_SECONDS = 0.1
# How long one delivery may wait in the process for a pause (Retry-After) or a fleet share to
# end, before its message goes back to the queue to wait there instead.
HOLD_SECONDS = 30.0
# A process holding no share of a target's fleet-wide cap looks again after this long: the
# shares are dealt every heartbeat (service/worker/fleet.py).
NO_SHARE_RETRY_SECONDS = 1.0
# What a target says when it is overloaded, or that we overloaded it: the limit shrinks.
OVERLOAD_STATUSES = frozenset({429, 502, 503, 504})
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
        self,
        settings: TargetSettings,
        session: aiohttp.ClientSession,
        secret: SecretGetter,
        hold_seconds: float = HOLD_SECONDS,
    ) -> None:
        self.settings = settings
        self._hold_seconds = hold_seconds
        self.name = settings.name
        self._session = session
        self._secret = secret
        self.limiter = ConcurrencyLimit(
            settings.name,
            floor=settings.concurrency_min,
            ceiling=settings.concurrency,
            adaptive=settings.limit == "adaptive",
        )
        self._paused_until = 0.0
        # Built once, not per call: the same for every call to this target.
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._calls = metrics.LabelCache(metrics.target_calls)
        self._latency = metrics.target_latency.labels(settings.name)
        self.breaker = CircuitBreaker(
            settings.name, settings.breaker_failures, settings.breaker_cooldown_seconds
        )
        metrics.target_paused.labels(self.name).set_function(lambda: self.paused_for() > 0)
        metrics.target_constrained.labels(self.name).set_function(lambda: self.constrained)

    def paused_for(self) -> float:
        """Seconds left of the pause the target asked for with Retry-After (0.0: none)."""
        return max(0.0, self._paused_until - time.monotonic())

    @property
    def constrained(self) -> bool:
        """Whether this target, not courier, is what bounds delivery now.

        Its circuit is open, it asked for a pause, or its limit has held calls back for
        minutes. Scaling out must not follow such a backlog: more processes would deliver no
        more, and could only add pressure (``courier_target_constrained``, terraform/).
        """
        return (
            self.breaker.state is CircuitState.OPEN
            or self.paused_for() > 0
            or self.limiter.constrained
        )

    async def deliver(self, delivery: Delivery) -> None:
        """Deliver once (with immediate retries, and holds while the target asks to wait).

        A pause the target asked for (Retry-After) or a fleet share of 0 (a join wait) ends
        within seconds as a rule: the call waits it out here, up to ``hold_seconds`` in all,
        with the message in flight (the heartbeat keeps it invisible). Sending it back instead
        would spend one of its receives per pause, and SQS dead-letters a message after
        ``maxReceiveCount``.

        Raises TargetHttpError, CircuitOpenError, TargetPausedError (a wait longer than the
        hold), TargetMisconfiguredError or TransientError.
        """
        held_until = time.monotonic() + self._hold_seconds
        attempt = 0
        while True:
            try:
                await self._attempt(delivery)
                return
            except (CircuitOpenError, TargetMisconfiguredError):
                raise  # an immediate retry cannot help: the call would not be made either
            except Exception as exc:
                wait = told_wait(exc)
                if wait is not None:
                    if time.monotonic() + wait > held_until:
                        raise
                    # The target said when (a Retry-After of 0 still waits a moment).
                    await asyncio.sleep(max(wait, RETRY_DELAY_SECONDS))
                    continue
                if classify(exc) is not RETRY or attempt == self.settings.retries:
                    raise
            attempt += 1
            await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)

    async def _attempt(self, delivery: Delivery) -> None:
        self._check_pause()
        if self.breaker.retry_after() > 0:  # open and cooling: no wait for a slot in vain
            self._refuse_open_circuit()
        authorization = await self._authorization()
        started = await self._slot()
        outcome = CallOutcome.IGNORED
        try:
            self._check_pause()  # a pause may have begun while this call waited for a slot
            if not self.breaker.allow():  # asked with the slot: it may have opened meanwhile
                self._refuse_open_circuit()
            try:
                status, retry_after = await self._call(delivery, authorization)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # The network or a timeout: RETRY in service/errors.py, whatever the exception.
                outcome = CallOutcome.DROPPED
                failure = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
                self._record(started, failure, ok=False)
                raise TransientError(f"target {self.name!r}: {type(exc).__name__}") from exc
            except BaseException:
                self.breaker.abandon()  # cancelled: the target's answer was not seen
                raise
            outcome = call_outcome(status)
        finally:
            self.limiter.release(started, outcome)
        self._answered(started, status, retry_after)

    async def _slot(self) -> float:
        """A slot under the concurrency limit; its start time."""
        try:
            return await self.limiter.acquire()
        except NoSlotsError:
            self._calls(self.name, "no_share").inc()
            raise TargetPausedError(
                self.name, NO_SHARE_RETRY_SECONDS, "holds no share of its fleet-wide cap"
            ) from None

    def _refuse_open_circuit(self) -> NoReturn:
        self._calls(self.name, "circuit_open").inc()
        raise CircuitOpenError(self.name, self.breaker.retry_after())

    def _answered(self, started: float, status: int, retry_after: float | None) -> None:
        if 200 <= status < 300:
            was_open = self.breaker.state is not CircuitState.CLOSED
            self._record(started, "ok", ok=True)
            if was_open:  # the probe got through: the outage is over
                self.limiter.recovered()
            return
        error = TargetHttpError(self.name, status, retry_after)  # decision: HTTP_STATUSES
        if retry_after is not None and is_retryable(error):
            # Flow control, not failure: the target is up and said when to come back. The
            # pause holds the calls; opening the circuit too would hold them for its whole
            # cool-down instead of the time the target asked for.
            self._record(started, f"http_{status // 100}xx", ok=None)
            self._pause(retry_after, status)
            raise error
        # A refusal (a 4xx other than 408/425/429) proves the target is up: it must not trip
        # the breaker.
        self._record(started, f"http_{status // 100}xx", ok=not is_retryable(error))
        raise error

    def _check_pause(self) -> None:
        left = self.paused_for()
        if left > 0:
            self._calls(self.name, "paused").inc()
            raise TargetPausedError(self.name, left)

    def _pause(self, seconds: float, status: int) -> None:
        """Hold every call to this target for ``seconds``, as its Retry-After asked."""
        until = time.monotonic() + seconds
        if until <= self._paused_until:
            return
        if self.paused_for() == 0:
            metrics.target_pauses.labels(self.name).inc()
            log.info(
                "target %s asked for a pause of %.1f s",
                self.name,
                seconds,
                extra={
                    "fields": {
                        "event": "target_paused",
                        "target": self.name,
                        "status": status,
                        "seconds": seconds,
                    }
                },
            )
        self._paused_until = until

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

    async def _call(self, delivery: Delivery, authorization: str) -> tuple[int, float | None]:
        """The status, and the pause asked for by a 429 or 503's Retry-After."""
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
            status = response.status
            if status in (429, 503) and "Retry-After" in response.headers:
                return status, self._retry_after(response.headers["Retry-After"])
            return status, None

    def _retry_after(self, value: str) -> float | None:
        """The pause asked for, bounded; None for none (0 or a date past: an ordinary 429/503,
        retried and counted by the breaker, rather than a pause of nothing, again and again)."""
        seconds = parse_retry_after(value, time.time())
        if seconds is None:
            return None
        seconds = min(seconds, self.settings.retry_after_max_seconds)
        return seconds if seconds > 0 else None

    def _record(self, started: float, outcome: str, *, ok: bool | None) -> None:
        """Count the call; ``ok`` tells the breaker (None: news of neither health nor failure)."""
        self._calls(self.name, outcome).inc()
        self._latency.observe(time.monotonic() - started)
        if ok is None:
            self.breaker.abandon()
        elif ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110: delay-seconds or an HTTP-date).

    ``now`` is the Unix time to measure a date against. None when the value is neither.
    """
    seconds = delta_seconds(value)
    if seconds is not None:
        return seconds
    when = http_date(value)
    if when is None:
        return None
    return max(0.0, math.ceil((when - now) * 10) / 10)


def call_outcome(status: int) -> CallOutcome:
    """What an answer says about the target's capacity (its latency is a sample only on 2xx).

    A refusal (400, 404, ...) or an error says nothing: it often comes back in milliseconds,
    before any work, and would pass for the target's unloaded latency.
    """
    if 200 <= status < 300:
        return CallOutcome.OK
    if status in OVERLOAD_STATUSES:
        return CallOutcome.DROPPED
    return CallOutcome.IGNORED
