"""``POST /v1/mailboxes`` and ``GET /v1/requests/{id}``: from token to durable encrypted message.

Order of a create, and why:
1. authenticate, read and validate — nothing touched yet;
2. call the IdM with ``Idempotency-Key: <request id>`` — safe to repeat;
3. write the status record (accepted) with a conditional put — the only API write; a
   racing duplicate (same Idempotency-Key ⇒ same request id) loses the condition here;
4. seal and send to SQS — when SQS refuses, the record is removed and the client gets 503
   (nobody was told the request id yet, so nothing claimed acceptance);
5. answer 202 only now, when the message is durable.
A replayed Idempotency-Key whose record is still ``accepted`` re-sends its message before
answering (the worker drops duplicates), so a 202 always means "in the queue".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import uuid
from typing import Any

from aiohttp import web

from .. import metrics
from ..errors import CourierError
from ..idm import IdmError
from ..logs import bind_context
from ..operations import create_mailbox
from ..state import ENVELOPE, IDM, PRODUCER, STATUS, VERIFIER
from ..status import RequestState, StatusRecord, now_iso
from .body import read_json
from .problems import Problem

log = logging.getLogger("courier.api")

ADMIN_SCOPE = "mailbox:admin"
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f0c2f55-8d43-4a9b-9d0b-8c1f5f3c2a11")
_VALID_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


async def create(request: web.Request) -> web.Response:
    """Create a mailbox: 202 + Location once the event is queued."""
    principal = await request.app[VERIFIER].verify(
        request.headers.get("Authorization"), "mailbox:create"
    )
    payload = await read_json(request)
    errors = create_mailbox.validation_errors(payload)
    if errors:
        raise Problem(
            422,
            "validation-failed",
            "Unprocessable Content",
            f"the request body does not match the CreateMailboxRequest schema ({len(errors)} errors)",
            errors=errors,
        )
    body_hash = hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    request_id = _request_id(principal.subject, request.headers.get("Idempotency-Key"))
    bind_context(courier_request_id=request_id)
    existing = (
        await request.app[STATUS].get(request_id)
        if request.headers.get("Idempotency-Key")
        else None
    )
    if existing is not None:
        return await _replay(request, existing, body_hash, payload)
    identity_id = await _create_identity(request, request_id, payload)
    record = StatusRecord(
        request_id=request_id,
        op=create_mailbox.NAME,
        state=RequestState.ACCEPTED,
        created_at=now_iso(),
        updated_at=now_iso(),
        body_hash=body_hash,
        subject=principal.subject,
        identity_id=identity_id,
    )
    raced = await request.app[STATUS].create(record)
    if raced is not None:
        return await _replay(request, raced, body_hash, payload)
    try:
        await _enqueue(request, record, payload)
    except CourierError:
        await _forget(request, request_id)
        raise
    return _accepted(request_id, RequestState.ACCEPTED)


async def status(request: web.Request) -> web.Response:
    """The status record of a request: the caller's own, or any with scope ``mailbox:admin``."""
    principal = await request.app[VERIFIER].verify(
        request.headers.get("Authorization"), "mailbox:read"
    )
    request_id = request.match_info["request_id"]
    record = (
        await request.app[STATUS].get(request_id)
        if re.fullmatch(r"[0-9a-f]{32}", request_id)
        else None
    )
    if record is not None and record.subject and record.subject != principal.subject:
        # Someone else's request: answer as if it did not exist, so ids cannot be probed.
        record = record if ADMIN_SCOPE in principal.scopes else None
    if record is None:
        raise Problem(
            404, "request-not-found", "Not Found", f"no request with id {request_id[:64]!r}"
        )
    return web.json_response(record.to_public())


def _request_id(subject: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return uuid.uuid4().hex
    if not _VALID_IDEMPOTENCY_KEY.match(idempotency_key):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Bad Request",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    # Same caller + same key ⇒ same request id, so racing duplicates collide on one record.
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{subject}\n{idempotency_key}").hex


async def _replay(
    request: web.Request, existing: StatusRecord, body_hash: str, payload: dict[str, Any]
) -> web.Response:
    if existing.body_hash != body_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Unprocessable Content",
            "this Idempotency-Key was already used with a different request body",
        )
    if existing.state is RequestState.ACCEPTED:
        # The first attempt may still be sending (or have failed to send): make sure it is queued.
        await _enqueue(request, existing, payload)
    metrics.idempotent_replays.inc()
    return _accepted(existing.request_id, existing.state)


async def _create_identity(request: web.Request, request_id: str, payload: dict[str, Any]) -> str:
    try:
        return await request.app[IDM].create_identity(
            request_id, create_mailbox.identity_request(payload)
        )
    except IdmError as exc:
        raise _idm_problem(exc) from None


def _idm_problem(exc: IdmError) -> Problem:
    if exc.kind == "conflict":
        return Problem(
            409, "identity-exists", "Conflict", "an identity with this username already exists"
        )
    if exc.kind == "timeout":
        return Problem(
            504, "idm-timeout", "Gateway Timeout", "the identity back-end did not answer in time"
        )
    return Problem(502, "idm-failed", "Bad Gateway", f"the identity back-end failed: {exc}")


async def _enqueue(request: web.Request, record: StatusRecord, payload: dict[str, Any]) -> None:
    event = create_mailbox.event(payload, record.identity_id, record.subject, record.created_at)
    body = await request.app[ENVELOPE].seal(create_mailbox.NAME, record.request_id, event)
    attributes = {
        "op": create_mailbox.NAME,
        "request_id": record.request_id,
        "traceparent": _traceparent(request.headers.get("traceparent")),
    }
    await request.app[PRODUCER].send(
        body,
        attributes,
        group_id=create_mailbox.group_id(payload),
        deduplication_id=record.request_id,
    )


async def _forget(request: web.Request, request_id: str) -> None:
    try:
        await request.app[STATUS].delete(request_id)
    except CourierError:
        # Nobody was given this id; the record expires through the table's TTL.
        log.warning("could not remove the status record of an unqueued request")


def _traceparent(incoming: str | None) -> str:
    if incoming and _TRACEPARENT.match(incoming):
        return incoming
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _accepted(request_id: str, state: RequestState) -> web.Response:
    location = f"/v1/requests/{request_id}"
    return web.json_response(
        {"request_id": request_id, "status": state.value},
        status=202,
        headers={"Location": location},
    )


def setup(app: web.Application) -> None:
    """Add the create-mailbox routes."""
    app.router.add_post("/v1/mailboxes", create)
    app.router.add_get("/v1/requests/{request_id}", status)
