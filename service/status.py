"""Request status records in DynamoDB: what ``GET /v1/requests/{id}`` shows and retries consult.

One item per request, ``pk = "req#<request id>"``, expiring through the table's TTL
attribute ``expires_at``. The API writes it once (accepted); the worker writes it once more
when the request ends (completed or failed), and in between only when an attempt leaves
some targets delivered and others pending, so a redelivery skips the delivered ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .errors import TransientError

TTL_ATTRIBUTE = "expires_at"


class RequestState(StrEnum):
    """Lifecycle of a request."""

    ACCEPTED = "accepted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class StatusUnavailableError(TransientError):
    """The status table could not be read or written."""


def now_iso() -> str:
    """Current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    }
    for name in ("body_hash", "subject", "identity_id", "error"):
        value = getattr(record, name)
        if value:
            item[name] = {"S": value}
    return item


def _from_item(item: Mapping[str, Any]) -> StatusRecord:
    def text(name: str) -> str:
        return str(item.get(name, {}).get("S", ""))

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
    )


class StatusStore:
    """Reads and writes status records; every failure is a StatusUnavailableError (retryable)."""

    def __init__(self, dynamodb: Any, table: str, ttl_days: int) -> None:
        self._dynamodb = dynamodb
        self.table = table
        self._ttl_seconds = ttl_days * 86400

    async def create(self, record: StatusRecord) -> StatusRecord | None:
        """Write ``record`` unless one exists; returns the existing record on conflict, else None."""
        try:
            await self._dynamodb.put_item(
                TableName=self.table,
                Item=_to_item(record, int(time.time()) + self._ttl_seconds),
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise StatusUnavailableError(f"status table: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StatusUnavailableError(f"status table unreachable: {type(exc).__name__}") from exc
        else:
            return None
        existing = await self.get(record.request_id)
        return existing or record

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

    async def delete(self, request_id: str) -> None:
        """Remove a record (the API undoing its write when SQS refused the message)."""
        await self._call(
            self._dynamodb.delete_item, TableName=self.table, Key={"pk": {"S": f"req#{request_id}"}}
        )

    async def update(
        self,
        request_id: str,
        *,
        state: RequestState | None = None,
        targets: Mapping[str, str] | None = None,
        error: str | None = None,
        op: str | None = None,
    ) -> None:
        """Set state / per-target states / error; creates the record if the API's write is missing."""
        names: dict[str, str] = {"#u": "updated_at", "#e": TTL_ATTRIBUTE}
        values: dict[str, Any] = {
            ":u": {"S": now_iso()},
            ":e": {"N": str(int(time.time()) + self._ttl_seconds)},
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
        await self._call(
            self._dynamodb.update_item,
            TableName=self.table,
            Key={"pk": {"S": f"req#{request_id}"}},
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    async def _call(self, method: Any, **kwargs: Any) -> Any:
        try:
            return await method(**kwargs)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StatusUnavailableError(f"status table unavailable: {type(exc).__name__}") from exc
