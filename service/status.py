"""Request status records in DynamoDB: what ``GET /v1/requests/{id}`` shows and retries consult.

One item per request, ``pk = "req#<request id>"``, expiring through the table's TTL
attribute ``expires_at``. Nothing ever deletes a record (the role has no DeleteItem).

The API writes it before queueing the message: once (accepted) for a request without an
Idempotency-Key, twice for a keyed one (a ``pending`` claim, then accepted once SQS has the
message), or ``send_failed`` when the message could not be queued. Every API write after the
first is conditional on the API's own claim token and on the state it left, so it never
overwrites what a worker wrote. The worker writes once more when the request ends (completed
or failed), and in between only when an attempt leaves some targets delivered and others
pending, so a redelivery skips the delivered ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeGuard

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from .batch_writes import PutBatcher, UnprocessedError
from .errors import (
    CourierError,
    PermanentError,
    TransientError,
    aws_error_code,
    classify,
    error_name,
)

TTL_ATTRIBUTE = "expires_at"
# What a status-table call raises when it fails: DynamoDB answered an error (ClientError), or
# the transport failed (botocore's, aiohttp's, or a timeout: TimeoutError is an OSError).
FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError, OSError)


class RequestState(StrEnum):
    """Lifecycle of a request.

    ``pending``: one API call has claimed the request and is calling the IdM / queueing it.
    ``send_failed``: that attempt did not queue the message (or cannot tell); a retry with the
    same Idempotency-Key starts a fresh attempt, and a worker that does get a copy overwrites it.
    Neither is terminal.
    """

    PENDING = "pending"
    SEND_FAILED = "send_failed"
    ACCEPTED = "accepted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class StatusUnavailableError(TransientError):
    """The status table could not be read or written, and a later try may succeed.

    ``decision`` is RETRY (outage, throttling) or MISCONFIGURED (IAM, no such table), as the
    table in ``service/errors.py`` says: the API answers 503, the worker retries with backoff.
    """


class StatusRefusedError(PermanentError):
    """The status table refused a call courier built (e.g. ValidationException): a bug.

    Retrying the same call cannot help. The API answers 500; in the worker it escapes the
    pipeline, the poller logs ``handler_error`` and retries the message with backoff (the
    message is not at fault, so courier does not dead-letter it until the queue's last
    receive, as ``retries_exhausted``: ``service/worker/redrive.py``).
    """


class RequestCompletedError(CourierError):
    """A worker's write was refused: another delivery of the request already completed it."""


def iso(unix: float) -> str:
    """A Unix time as UTC ISO 8601 with milliseconds (the status records' format)."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """Current UTC time, ISO 8601 with milliseconds."""
    return iso(time.time())


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One request as stored."""

    request_id: str
    op: str
    state: RequestState
    created_at: str
    updated_at: str
    body_hash: str = ""
    subject: str = ""
    identity_id: str = ""
    targets: Mapping[str, str] = field(default_factory=dict)
    error: str = ""
    claim: str = ""  # token of the API call that owns the current attempt
    lease_until: int = 0  # epoch seconds; a pending claim older than this may be taken over
    attempt: int = 1  # the current attempt; a re-send carries it as message attribute "attempt"

    def to_public(self) -> dict[str, Any]:
        """The representation clients see (no body hash, no subject)."""
        document: dict[str, Any] = {
            "request_id": self.request_id,
            "operation": self.op,
            "status": self.state.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "targets": dict(self.targets),
        }
        if self.identity_id:
            document["identity_id"] = self.identity_id
        if self.error:
            document["error"] = self.error
        return document


def _to_item(record: StatusRecord, expires_at: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": f"req#{record.request_id}"},
        "op": {"S": record.op},
        "state": {"S": record.state.value},
        "created_at": {"S": record.created_at},
        "updated_at": {"S": record.updated_at},
        TTL_ATTRIBUTE: {"N": str(expires_at)},
        "targets": {"M": {name: {"S": state} for name, state in record.targets.items()}},
        "attempt": {"N": str(record.attempt)},
    }
    for name in ("body_hash", "subject", "identity_id", "error", "claim"):
        value = getattr(record, name)
        if value:
            item[name] = {"S": value}
    if record.lease_until:
        item["lease_until"] = {"N": str(record.lease_until)}
    return item


def _from_item(item: Mapping[str, Any]) -> StatusRecord:
    def text(name: str) -> str:
        return str(item.get(name, {}).get("S", ""))

    def number(name: str, default: int) -> int:
        return int(item.get(name, {}).get("N", default))

    targets = {
        name: str(value.get("S", ""))
        for name, value in item.get("targets", {}).get("M", {}).items()
    }
    return StatusRecord(
        request_id=text("pk").removeprefix("req#"),
        op=text("op"),
        state=RequestState(text("state")),
        created_at=text("created_at"),
        updated_at=text("updated_at"),
        body_hash=text("body_hash"),
        subject=text("subject"),
        identity_id=text("identity_id"),
        targets=targets,
        error=text("error"),
        claim=text("claim"),
        lease_until=number("lease_until", 0),
        attempt=number("attempt", 1),
    )


# What a worker's whole-record ``completed`` write must keep of the API's record. The API seals
# these into the event (member ``record``: ``carried_fields``), so the worker writes the final
# record without reading it first (``completed_record``). None of them is personal data beyond
# the token subject, which the record holds anyway.
CARRIED_FIELDS = ("created_at", "body_hash", "subject", "identity_id")


def carried_fields(record: StatusRecord) -> dict[str, str]:
    """The fields of ``record`` the API seals into the event, for the worker's final write."""
    return {name: getattr(record, name) for name in CARRIED_FIELDS}


def completed_record(
    request_id: str, op: str, targets: Mapping[str, str], carried: object
) -> StatusRecord | None:
    """The final record of a request whose event carried ``carried``; None when it did not.

    An event sealed before the API carried the fields (or by anything else) has none: its
    completion is written field by field instead (``StatusStore.update``).
    """
    if not isinstance(carried, Mapping) or not all(
        isinstance(carried.get(name), str) for name in CARRIED_FIELDS
    ):
        return None
    now = now_iso()
    return StatusRecord(
        request_id=request_id,
        op=op,
        state=RequestState.COMPLETED,
        created_at=carried["created_at"] or now,
        updated_at=now,
        body_hash=carried["body_hash"],
        subject=carried["subject"],
        identity_id=carried["identity_id"],
        targets=dict(targets),
    )


def _key(request_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"req#{request_id}"}}


class StatusStore:
    """Reads and writes status records.

    A failed call raises StatusUnavailableError (retryable) or StatusRefusedError (not), as
    ``service/errors.py`` classifies its error code; failed conditions are answers, read here.
    """

    def __init__(
        self, dynamodb: Any, table: str, ttl_days: int, *, linger_seconds: float = 0.002
    ) -> None:
        self._dynamodb = dynamodb
        self.table = table
        self._ttl_seconds = ttl_days * 86400
        self._puts = PutBatcher(dynamodb, table, "pk", linger_seconds)

    async def create(self, record: StatusRecord) -> None:
        """Write the first record of a request nobody else can know yet (a random id).

        Unconditional, so it shares a BatchWriteItem with concurrent writes
        (``service/batch_writes.py``); raises once the write failed.
        """
        await self._put(record)

    async def complete(self, record: StatusRecord) -> None:
        """Write a request's final ``completed`` record whole, batched with concurrent writes.

        No condition is needed: ``completed`` is final and every copy of the request writes
        the same record, so writing it twice changes nothing a reader sees but ``updated_at``;
        every other write stays conditional on the record not being completed. The expiry
        restarts from now.
        """
        await self._put(record)

    async def drain(self) -> None:
        """Finish the batched writes still waiting or in flight (at shutdown)."""
        await self._puts.drain()

    async def _put(self, record: StatusRecord) -> None:
        try:
            await self._puts.put(_to_item(record, int(time.time()) + self._ttl_seconds))
        except UnprocessedError as exc:
            raise StatusUnavailableError(f"status table unavailable: {exc}") from exc
        except FAILURES as exc:
            raise _status_error(exc) from exc

    async def claim(self, record: StatusRecord) -> StatusRecord | None:
        """Write ``record`` unless one exists: None when written, else the existing record.

        One PutItem either way: a failed condition returns the existing item with it.
        """
        try:
            await self._dynamodb.put_item(
                TableName=self.table,
                Item=_to_item(record, int(time.time()) + self._ttl_seconds),
                ConditionExpression="attribute_not_exists(pk)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except FAILURES as exc:
            return await self._current(record.request_id, exc)
        return None

    async def get(self, request_id: str) -> StatusRecord | None:
        """The record of ``request_id``, or None."""
        response = await self._call(
            self._dynamodb.get_item,
            TableName=self.table,
            Key={"pk": {"S": f"req#{request_id}"}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        return _from_item(item) if item else None

    async def take_over(
        self, seen: StatusRecord, claim: str, lease_until: int
    ) -> tuple[StatusRecord, bool]:
        """Claim a request whose attempt failed (``send_failed``) or whose claimer's lease ran out.

        Conditional on the record still carrying the claim that was ``seen``, so of several
        takers exactly one wins. Returns (the record as it is now, whether we won it); a won
        record is ``pending`` under ``claim`` with its attempt counted up.
        """
        condition = "claim = :old" if seen.claim else "attribute_not_exists(claim)"
        values: dict[str, Any] = {
            ":pending": {"S": RequestState.PENDING.value},
            ":send_failed": {"S": RequestState.SEND_FAILED.value},
            ":now": {"N": str(int(time.time()))},
            ":claim": {"S": claim},
            ":lease": {"N": str(lease_until)},
            ":u": {"S": now_iso()},
            ":one": {"N": "1"},
        }
        if seen.claim:
            values[":old"] = {"S": seen.claim}
        try:
            response = await self._dynamodb.update_item(
                TableName=self.table,
                Key=_key(seen.request_id),
                UpdateExpression=(
                    "SET #s = :pending, claim = :claim, lease_until = :lease, updated_at = :u"
                    " ADD attempt :one"
                ),
                ConditionExpression=(
                    f"{condition} AND (#s = :send_failed OR (#s = :pending AND lease_until < :now))"
                ),
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except FAILURES as exc:
            return await self._current(seen.request_id, exc), False
        return _from_item(response["Attributes"]), True

    async def accept(self, request_id: str, claim: str, identity_id: str) -> StatusRecord | None:
        """``pending`` → ``accepted`` once SQS has the message, if the claim is still ours.

        Returns None when written, else the record as it is (e.g. a worker already finished it).
        """
        return await self._settle(request_id, claim, RequestState.ACCEPTED, identity_id)

    async def mark_send_failed(
        self, request_id: str, claim: str, identity_id: str = ""
    ) -> StatusRecord | None:
        """Our attempt did not queue the message: ``send_failed``, keeping the identity for a retry.

        Only over our own ``pending`` / ``accepted`` write, never over a worker's state (after an
        ambiguous SQS timeout the message may have been queued and processed after all).
        Returns None when written, else the record as it is.
        """
        return await self._settle(request_id, claim, RequestState.SEND_FAILED, identity_id)

    async def _settle(
        self, request_id: str, claim: str, state: RequestState, identity_id: str
    ) -> StatusRecord | None:
        values: dict[str, Any] = {
            ":claim": {"S": claim},
            ":state": {"S": state.value},
            ":pending": {"S": RequestState.PENDING.value},
            ":accepted": {"S": RequestState.ACCEPTED.value},
            ":u": {"S": now_iso()},
        }
        sets = "#s = :state, updated_at = :u"
        if identity_id:
            values[":id"] = {"S": identity_id}
            sets += ", identity_id = :id"
        try:
            await self._dynamodb.update_item(
                TableName=self.table,
                Key=_key(request_id),
                UpdateExpression=f"SET {sets} REMOVE lease_until",
                ConditionExpression="claim = :claim AND #s IN (:pending, :accepted)",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except FAILURES as exc:
            return await self._current(request_id, exc)
        return None

    async def _current(self, request_id: str, exc: Exception) -> StatusRecord:
        """After a failed conditional write: the record that failed it; other errors raise."""
        if not condition_failed(exc):
            raise _status_error(exc) from exc
        item = exc.response.get("Item")
        record = _from_item(item) if item else await self.get(request_id)
        if record is None:
            # The condition failed on a record that has gone since (its TTL expired): rare
            # enough that the client retrying is the simplest answer.
            raise StatusUnavailableError("status record changed during a conditional write")
        return record

    async def update(
        self,
        request_id: str,
        *,
        state: RequestState | None = None,
        targets: Mapping[str, str] | None = None,
        error: str | None = None,
        op: str | None = None,
    ) -> None:
        """Set state / per-target states / error; creates the record if the API's write is missing.

        ``completed`` is final: a second copy of the request (an SQS duplicate, an API re-send)
        that ends later must not turn it back into processing or failed, so the write is
        conditional and raises RequestCompletedError when the record is already completed.
        """
        names: dict[str, str] = {"#u": "updated_at", "#e": TTL_ATTRIBUTE, "#cs": "state"}
        values: dict[str, Any] = {
            ":u": {"S": now_iso()},
            ":e": {"N": str(int(time.time()) + self._ttl_seconds)},
            ":completed": {"S": RequestState.COMPLETED.value},
        }
        sets = [
            "#u = :u",
            "#e = if_not_exists(#e, :e)",
            "created_at = if_not_exists(created_at, :u)",
        ]
        for attribute, value in (("state", state), ("error", error), ("op", op)):
            if value is not None:
                names[f"#{attribute}"] = attribute
                values[f":{attribute}"] = {"S": str(value)}
                sets.append(f"#{attribute} = :{attribute}")
        if targets:
            values[":t"] = {"M": {name: {"S": value} for name, value in targets.items()}}
            sets.append("targets = :t")
        try:
            await self._dynamodb.update_item(
                TableName=self.table,
                Key=_key(request_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="attribute_not_exists(#cs) OR #cs <> :completed",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except FAILURES as exc:
            if condition_failed(exc):
                raise RequestCompletedError(f"request {request_id} is already completed") from None
            raise _status_error(exc) from exc

    async def _call(self, method: Any, **kwargs: Any) -> Any:
        try:
            return await method(**kwargs)
        except FAILURES as exc:
            raise _status_error(exc) from exc


def condition_failed(exc: BaseException) -> TypeGuard[ClientError]:
    """A conditional write lost: an answer the caller reads, never an error to retry."""
    return isinstance(exc, ClientError) and aws_error_code(exc) == "ConditionalCheckFailedException"


def _status_error(exc: BaseException) -> StatusUnavailableError | StatusRefusedError:
    """What a failed status-table call raises, as the table in ``service/errors.py`` decides."""
    decision = classify(exc, "dynamodb")
    if not decision.retryable:
        return StatusRefusedError(f"status table refused the call: {error_name(exc)}")
    return StatusUnavailableError(f"status table unavailable: {error_name(exc)}", decision=decision)
