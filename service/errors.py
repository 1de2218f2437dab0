"""courier's error hierarchy and the one table that decides retry vs. refuse.

Every adapter (SQS, DynamoDB status and secrets, KMS envelope and secrets, the IdM, the legacy
targets) asks this module what a failure means; none keeps its own list. To answer "what
happens when X returns Y", read ``AWS_CODES`` (by source, then error code) and
``HTTP_STATUSES`` (any HTTP peer courier calls: the IdM and the targets) below. Codes a table
does not name fall back on the HTTP status: 5xx and 429 retry, 403 is a misconfiguration,
any other 4xx refuses. Network failures (connection refused or reset, timeouts) always retry.

What each ``Decision`` leads to:

============== ============================================ =====================================
decision       worker (the message)                         API (the client)
============== ============================================ =====================================
RETRY          back to the queue with exponential backoff   503 + Retry-After
MISCONFIGURED  back to the queue with backoff; courier does  503 + Retry-After
               not dead-letter it (see below)
REFUSE         DLQ at once when the message decides the     a 4xx problem when the client's
               call (its envelope, a target's 4xx);         request decides the call (IdM 409);
               a refusal of courier's own call (status      else 5xx: the IdM refusing what
               table) is a bug: logged ``handler_error``    courier sent is 502, a refusal of
               and retried with backoff (see below)         courier's own AWS call is 500
============== ============================================ =====================================

MISCONFIGURED is courier's deployment refusing the call (IAM, a disabled key, a queue or table
that does not exist, a skewed clock). It is never the input's fault, so courier neither
dead-letters nor refuses for it, and it is not retried in the same call either: it clears when
an operator fixes the deployment, and the backed-off retries then go through. ``is_retryable``
is true for it. What courier keeps retrying (MISCONFIGURED, a refused status write, a target
down) is still bounded by the queue: on its ``maxReceiveCount``-th receive (20 by default, hours
with the default backoff) a message that fails again is dead-lettered by courier as
``retries_exhausted``, with the last failure as its detail (``service/worker/redrive.py``),
rather than redriven by SQS without a reason. The request is then recorded ``failed``, except
after a refused status write (the write would be refused too).

The IdM is called synchronously, with its own immediate retries for RETRY answers; its
answers map to 409 (conflict), 502 + Retry-After (unavailable), 504 + Retry-After (timeout) or
502 (rejected: a 4xx other than 409, courier's request is wrong) in ``service/api/mailboxes.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError


class Decision(StrEnum):
    """What to do about a failure: see the module docstring for what each leads to."""

    RETRY = "retry"
    """Transient (an outage, throttling, a timeout): it goes away by itself."""
    MISCONFIGURED = "misconfigured"
    """courier's own deployment refuses the call: retried with backoff until an operator acts."""
    REFUSE = "refuse"
    """The call will never succeed as it is, however often it is made."""

    @property
    def retryable(self) -> bool:
        """True when coming back later may succeed (RETRY, and MISCONFIGURED once fixed)."""
        return self is not Decision.REFUSE


RETRY, MISCONFIGURED, REFUSE = Decision.RETRY, Decision.MISCONFIGURED, Decision.REFUSE

# --- The table -------------------------------------------------------------------------------
# AWS error codes by source, as botocore reports them in ``ClientError.response["Error"]["Code"]``.
# "any" holds the codes every AWS service uses alike; a source's own row wins over it.
AWS_CODES: Mapping[str, Mapping[str, Decision]] = MappingProxyType(
    {
        "any": MappingProxyType(
            {
                # throttling
                "Throttling": RETRY,
                "ThrottlingException": RETRY,
                "ThrottledException": RETRY,
                "RequestThrottled": RETRY,
                "RequestThrottledException": RETRY,
                "TooManyRequestsException": RETRY,
                "RequestLimitExceeded": RETRY,
                # AWS's side failed or timed out
                "InternalError": RETRY,
                "InternalFailure": RETRY,
                "InternalServerError": RETRY,
                "ServiceUnavailable": RETRY,
                "ServiceUnavailableException": RETRY,
                "RequestTimeout": RETRY,
                "RequestTimeoutException": RETRY,
                # Refreshable credentials (the instance role) are renewed by botocore for the
                # next call; static ones never are, and the backoff only delays the alarm.
                "ExpiredToken": RETRY,
                "ExpiredTokenException": RETRY,
                # courier's IAM role or credentials, or the host's clock (a signature too old)
                "AccessDenied": MISCONFIGURED,
                "AccessDeniedException": MISCONFIGURED,
                "UnrecognizedClientException": MISCONFIGURED,
                "InvalidClientTokenId": MISCONFIGURED,
                "SignatureDoesNotMatch": MISCONFIGURED,
                "InvalidSignatureException": MISCONFIGURED,
                "IncompleteSignature": MISCONFIGURED,
                "RequestExpired": MISCONFIGURED,
                # the call as built is invalid
                "ValidationException": REFUSE,
                "SerializationException": REFUSE,
                "MissingParameter": REFUSE,
                "InvalidParameterValue": REFUSE,
                "InvalidParameterCombination": REFUSE,
            }
        ),
        "sqs": MappingProxyType(
            {
                "AWS.SimpleQueueService.ServiceUnavailable": RETRY,
                "KmsThrottled": RETRY,  # an SSE-KMS queue's data key: KMS throttled SQS
                "KMS.ThrottlingException": RETRY,
                "OverLimit": RETRY,  # too many messages in flight: room comes back
                "QueueDoesNotExist": MISCONFIGURED,
                "AWS.SimpleQueueService.NonExistentQueue": MISCONFIGURED,
                "AWS.SimpleQueueService.QueueDeletedRecently": MISCONFIGURED,
                "KmsAccessDenied": MISCONFIGURED,
                "KMS.AccessDeniedException": MISCONFIGURED,
                "KmsDisabled": MISCONFIGURED,
                "KMS.DisabledException": MISCONFIGURED,
                "KmsNotFound": MISCONFIGURED,
                "KMS.NotFoundException": MISCONFIGURED,
                "KmsInvalidState": MISCONFIGURED,  # the queue's key is pending deletion
                "KMS.InvalidStateException": MISCONFIGURED,
                "KmsInvalidKeyUsage": MISCONFIGURED,
                "KMS.InvalidKeyUsageException": MISCONFIGURED,
                "KmsOptInRequired": MISCONFIGURED,
                "KMS.OptInRequired": MISCONFIGURED,
                "InvalidMessageContents": REFUSE,
                "InvalidAttributeValue": REFUSE,
                "ReceiptHandleIsInvalid": REFUSE,
                "AWS.SimpleQueueService.BatchEntryIdsNotDistinct": REFUSE,
                "AWS.SimpleQueueService.TooManyEntriesInBatchRequest": REFUSE,
                "AWS.SimpleQueueService.BatchRequestTooLong": REFUSE,
            }
        ),
        "dynamodb": MappingProxyType(
            {
                "ProvisionedThroughputExceededException": RETRY,
                "TransactionInProgressException": RETRY,
                "TransactionConflictException": RETRY,
                "LimitExceededException": RETRY,
                "ResourceNotFoundException": MISCONFIGURED,  # the table does not exist
                # A failed condition is an answer, not an outage: the caller reads it (a claim
                # lost to another request, a record already completed, a version that exists).
                "ConditionalCheckFailedException": REFUSE,
                "ItemCollectionSizeLimitExceededException": REFUSE,
            }
        ),
        "kms": MappingProxyType(
            {
                "KMSInternalException": RETRY,
                "DependencyTimeoutException": RETRY,
                "KeyUnavailableException": RETRY,
                # A resource quota (keys, aliases, grants), not the request rate (that is
                # ThrottlingException): it clears when the quota is raised.
                "LimitExceededException": MISCONFIGURED,
                "DisabledException": MISCONFIGURED,
                "KMSInvalidStateException": MISCONFIGURED,  # e.g. pending deletion
                "NotFoundException": MISCONFIGURED,  # a key or alias courier is configured with
                "InvalidKeyUsageException": MISCONFIGURED,
                # KMS parameters are courier's (key id, encryption context); a ciphertext's
                # length is checked before any call, so this is the deployment, not the input.
                "ValidationException": MISCONFIGURED,
                # The ciphertext cannot be opened (garbage, another key or another context):
                # the input decides it, so the envelope is dead-lettered as undecryptable.
                "InvalidCiphertextException": REFUSE,
                "IncorrectKeyException": REFUSE,
            }
        ),
    }
)

# HTTP statuses of the IdM and of the legacy targets, other than 5xx (RETRY) and 2xx (success).
# A 4xx not named here refuses: courier sent something the peer will never accept (the IdM's
# 409 means the identity exists: the client is told 409).
HTTP_STATUSES: Mapping[int, Decision] = MappingProxyType(
    {
        408: RETRY,  # Request Timeout
        425: RETRY,  # Too Early
        429: RETRY,  # Too Many Requests
    }
)


def classify_http(status: int) -> Decision:
    """The decision for an HTTP status answered by the IdM or a target (not for 2xx)."""
    if status in HTTP_STATUSES:
        return HTTP_STATUSES[status]
    return RETRY if status >= 500 else REFUSE


def classify_code(source: str, code: str, status: int = 0) -> Decision:
    """The decision for AWS error ``code`` from ``source`` ("sqs", "dynamodb", "kms", or "any"
    when unknown); by the HTTP ``status`` when no table names the code."""
    decision = AWS_CODES.get(source, {}).get(code) or AWS_CODES["any"].get(code)
    if decision is not None:
        return decision
    if source == "any":  # the service is unknown: a code whose sources all agree still counts
        found = {table[code] for table in AWS_CODES.values() if code in table}
        if len(found) == 1:
            return found.pop()
    if status >= 500 or status == 429:
        return RETRY
    return MISCONFIGURED if status == 403 else REFUSE


def aws_error_code(exc: ClientError) -> str:
    """The AWS error code of a botocore ``ClientError`` ("" when it has none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_name(exc: BaseException) -> str:
    """What a log line names a failure by: its AWS error code, or its type's name."""
    if isinstance(exc, ClientError):
        return aws_error_code(exc) or type(exc).__name__
    return type(exc).__name__


def classify_aws(exc: ClientError, source: str = "any") -> Decision:
    """The decision for a botocore ``ClientError`` raised by a call to ``source``."""
    code = aws_error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return classify_code(source, code, status)


def classify(exc: BaseException, source: str = "any") -> Decision:
    """The decision for any failure: courier's own errors carry theirs, the rest go by the table.

    ``source`` names the AWS service a raw ``ClientError`` came from. Failures nobody
    classified (a bug) refuse: they are never retried as if they were an outage.
    """
    decision = getattr(exc, "decision", None)
    if isinstance(decision, Decision):
        return decision
    if isinstance(exc, ClientError):
        return classify_aws(exc, source)
    if isinstance(exc, aiohttp.ClientResponseError):
        return classify_http(exc.status)
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | asyncio.TimeoutError | OSError):
        return RETRY  # the network, a timeout, or botocore's own connection errors
    return REFUSE


def is_retryable(exc: BaseException) -> bool:
    """True when coming back later may succeed (backoff, 503), False when it never will.

    Callers route on the answer (backoff vs DLQ, 503 vs 4xx, stale secret vs hard error);
    the answer comes from ``classify`` and so from the tables above.
    """
    return classify(exc).retryable


# --- Errors courier raises --------------------------------------------------------------------


class CourierError(Exception):
    """Base class of every error courier raises on purpose."""


class SettingsError(CourierError):
    """A setting has a value courier cannot run with; the message is one line for the operator."""


class ListenError(SettingsError):
    """courier cannot listen where its settings say: another process holds the port, or the
    address is not this machine's, or a port below 1024 needs privileges courier lacks."""


class TransientError(CourierError):
    """A failure that may succeed if tried again later (timeouts, 5xx, throttling, outages).

    The API answers it with 503 + Retry-After. ``decision`` is RETRY, or MISCONFIGURED when an
    adapter says so (``MisconfiguredError``, or an instance given that decision).
    """

    decision: Decision = RETRY

    def __init__(self, message: str = "", *, decision: Decision | None = None) -> None:
        super().__init__(message)
        if decision is not None:
            self.decision = decision


class MisconfiguredError(TransientError):
    """courier's deployment refuses the call (IAM, a disabled key, a missing queue or table).

    Transient for the fleet, never the input's fault: the worker retries with backoff and the
    API answers 503 until an operator fixes it.
    """

    decision = MISCONFIGURED


class PermanentError(CourierError):
    """A failure that will never succeed however often it is retried."""

    reason: str = "permanent"
    decision: Decision = REFUSE


class EnvelopeError(PermanentError):
    """An envelope cannot be opened: malformed, unknown version, wrong key or tampered."""

    reason = "undecryptable"

    def __init__(self, message: str, reason: str = "undecryptable") -> None:
        super().__init__(message)
        self.reason = reason


class TargetHttpError(CourierError):
    """A legacy target answered with a non-2xx status; ``decision`` comes from ``HTTP_STATUSES``."""

    def __init__(self, target: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"target {target!r} answered {status}")
        self.target = target
        self.status = status
        self.decision = classify_http(status)
        self.retry_after = retry_after  # seconds the target asked for (Retry-After), if any


class TargetMisconfiguredError(MisconfiguredError):
    """A target cannot be called as configured (e.g. its credential secret is missing).

    Transient for the fleet, not poison for the message: once an operator fixes the
    configuration, the retried message goes through. The target was never called.
    """

    reason = "target_misconfigured"

    def __init__(self, target: str, cause: str) -> None:
        super().__init__(f"target {target!r} is misconfigured: {cause}")
        self.target = target


class TargetPausedError(TransientError):
    """No call made: the target asked for a pause (Retry-After) that still holds, or this
    process holds no share of the target's fleet-wide cap for now."""

    def __init__(self, target: str, retry_after: float, why: str = "") -> None:
        why = why or f"asked to wait {retry_after:.1f} s more"
        super().__init__(f"target {target!r} {why}")
        self.target = target
        self.retry_after = retry_after


class CircuitOpenError(TransientError):
    """The target's circuit is open: the call was not made."""

    def __init__(self, target: str, retry_after: float) -> None:
        super().__init__(f"target {target!r} circuit is open")
        self.target = target
        self.retry_after = retry_after


def told_wait(exc: BaseException) -> float | None:
    """The seconds a failure says to wait before calling again, or None when it says nothing.

    An open circuit's cool-down, a pause the target asked for (or no fleet share), and a
    retryable answer carrying Retry-After.
    """
    if isinstance(exc, CircuitOpenError | TargetPausedError):
        return exc.retry_after
    if isinstance(exc, TargetHttpError) and exc.retry_after is not None and is_retryable(exc):
        return exc.retry_after
    return None
