"""courier's error hierarchy and the one function that says whether a failure is worth retrying."""

from __future__ import annotations

import asyncio

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError


class CourierError(Exception):
    """Base class of every error courier raises on purpose."""


class SettingsError(CourierError):
    """A setting has a value courier cannot run with; the message is one line for the operator."""


class TransientError(CourierError):
    """A failure that may succeed if tried again later (timeouts, 5xx, throttling, outages)."""


class PermanentError(CourierError):
    """A failure that will never succeed however often it is retried."""

    reason: str = "permanent"


class EnvelopeError(PermanentError):
    """An envelope cannot be opened: malformed, unknown version, wrong key or tampered."""

    reason = "undecryptable"

    def __init__(self, message: str, reason: str = "undecryptable") -> None:
        super().__init__(message)
        self.reason = reason


class TargetHttpError(CourierError):
    """A legacy target answered with a non-2xx status."""

    def __init__(self, target: str, status: int) -> None:
        super().__init__(f"target {target!r} answered {status}")
        self.target = target
        self.status = status


class TargetMisconfiguredError(TransientError):
    """A target cannot be called as configured (e.g. its credential secret is missing).

    Transient for the fleet, not poison for the message: once an operator fixes the
    configuration, the retried message goes through. The target was never called.
    """

    reason = "target_misconfigured"

    def __init__(self, target: str, cause: str) -> None:
        super().__init__(f"target {target!r} is misconfigured: {cause}")
        self.target = target


class CircuitOpenError(TransientError):
    """The target's circuit is open: the call was not made."""

    def __init__(self, target: str, retry_after: float) -> None:
        super().__init__(f"target {target!r} circuit is open")
        self.target = target
        self.retry_after = retry_after


# HTTP statuses that mean "try later"; every other 4xx will never succeed.
RETRYABLE_STATUSES = frozenset({408, 425, 429})

# AWS error codes that mean "try later" rather than "this request is wrong".
_RETRYABLE_AWS_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "AWS.SimpleQueueService.ServiceUnavailable",
        "TransactionInProgressException",
    }
)


def is_retryable(exc: BaseException) -> bool:
    """Classify a failure: True when retrying later may succeed, False when it never will.

    This is the single place that decides; callers route on the answer (backoff vs DLQ,
    503 vs 4xx, stale secret vs hard error).
    """
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code", "") in _RETRYABLE_AWS_CODES or status >= 500 or status == 429
    if isinstance(exc, TargetHttpError | aiohttp.ClientResponseError):
        return exc.status >= 500 or exc.status in RETRYABLE_STATUSES
    return isinstance(exc, BotoCoreError | aiohttp.ClientError | asyncio.TimeoutError | OSError)
