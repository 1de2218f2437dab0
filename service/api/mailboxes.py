"""``POST /v1/mailboxes`` and ``GET /v1/requests/{id}``: from token to durable encrypted message.

Order of a create, and why:
1. authenticate, read and validate — nothing touched yet;
2. with an Idempotency-Key, claim the request: a conditional put of a ``pending`` record with
   a lease. Exactly one call per key wins; the others wait briefly for its answer and replay
   it, or get 409 + Retry-After while it is still in progress. A claimer that crashed is
   taken over once its lease ends, a failed attempt (``send_failed``) at once;
3. call the IdM with ``Idempotency-Key: <request id>`` (safe to repeat) — skipped when an
   earlier attempt of this request already recorded the identity;
4. without a key, write the record (accepted) now: its id is random, nobody can race it, so
   the write needs no condition and shares a BatchWriteItem with concurrent requests;
5. seal and send to SQS. When SQS refuses (or times out, which may still have queued it) the
   record becomes ``send_failed`` and the client gets 503: nothing is deleted, a retry with
   the same key is a fresh attempt of the same request, and the re-sent message carries
   attribute ``attempt`` (2, 3, ...) so the worker checks it and drops it when the request is
   already done (an unmarked first copy arriving after it is absorbed by the targets'
   Idempotency-Key; see service/worker/pipeline.py);
6. mark the claim ``accepted`` (conditional: never over a worker's state) and answer 202 only
   now, when the message is durable.
A replay answers from the record and never sends again.

DynamoDB calls per create: a share of a BatchWriteItem without a key; 2 with a key (claim put +
accepted update);
1 for a replay of a known key (the failed claim returns the record).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from typing import Any

from aiohttp import web

from .. import metrics
from ..idm import IdmError
from ..logs import bind_context
from ..operations import create_mailbox
from ..settings import Settings
from ..state import ENVELOPE, IDM, PRODUCER, SETTINGS, STATUS, VERIFIER
from ..status import (
    RequestState,
    StatusRecord,
    StatusRefusedError,
    StatusUnavailableError,
    carried_fields,
    now_iso,
)
from .body import read_json
from .problems import RETRY_AFTER_SECONDS, Problem, unavailable

log = logging.getLogger("courier.api")

ADMIN_SCOPE = "mailbox:admin"
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f0c2f55-8d43-4a9b-9d0b-8c1f5f3c2a11")
_VALID_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

# A duplicate waits this long for the claimer's answer before it gets 409 (the claimer's
# happy path is one IdM call and one send: well under a second).
CLAIM_WAIT_SECONDS = 2.0
IN_PROGRESS_RETRY_AFTER = "1"
# Part of a claim's lease for sealing (KMS) and sending (SQS) after the IdM answered.
CLAIM_SEND_ALLOWANCE_SECONDS = 10
_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 0.4
# States a replay answers with 202: the message is (or was) in the queue.
_QUEUED = frozenset(
    {RequestState.ACCEPTED, RequestState.PROCESSING, RequestState.COMPLETED, RequestState.FAILED}
)


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
    key = request.headers.get("Idempotency-Key")
    request_id = _request_id(principal.subject, key)
    bind_context(courier_request_id=request_id)
    record = StatusRecord(
        request_id=request_id,
        op=create_mailbox.NAME,
        state=RequestState.PENDING if key is not None else RequestState.ACCEPTED,
        created_at=now_iso(),
        updated_at=now_iso(),
        body_hash=_body_hash(payload),
        subject=principal.subject,
        claim=secrets.token_hex(8),
    )
    if key is None:
        return await _create_unkeyed(request, record, payload)
    claimed = await _claim(request, record)
    if isinstance(claimed, web.Response):
        return claimed
    return await _attempt(request, claimed, payload)


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
    # Someone else's request, or one without an owner (a record a worker had to recreate):
    # admins only. Others get 404 as if it did not exist, so ids cannot be probed.
    if record is not None and record.subject != principal.subject:
        record = record if ADMIN_SCOPE in principal.scopes else None
    if record is None:
        raise Problem(
            404, "request-not-found", "Not Found", f"no request with id {request_id[:64]!r}"
        )
    return web.json_response(record.to_public())


def _body_hash(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _request_id(subject: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return uuid.uuid4().hex
    if not _VALID_IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Bad Request",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    # Same caller + same key ⇒ same request id, so racing duplicates collide on one record.
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{subject}\n{idempotency_key}").hex


async def _create_unkeyed(
    request: web.Request, record: StatusRecord, payload: dict[str, Any]
) -> web.Response:
    """Without a key the id is random: no claim, the record is written once, as accepted."""
    identity_id = await _create_identity(request, record.request_id, payload)
    record = dataclasses.replace(record, identity_id=identity_id)
    await request.app[STATUS].create(record)
    return await _send(request, record, payload)


async def _claim(request: web.Request, record: StatusRecord) -> StatusRecord | web.Response:
    """Make this call the one that works on ``record``'s request, or answer as a duplicate.

    Returns the claimed record (``pending`` under our claim token), or the answer for a
    duplicate: a replay (202), 409 + Retry-After while the claimer is still at work, or 503
    when the attempt it waited for failed (a retry then starts a fresh attempt).
    """
    store = request.app[STATUS]
    mine = dataclasses.replace(record, lease_until=_lease_end(request.app[SETTINGS]))
    seen = await store.claim(mine)
    if seen is None:
        return mine
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    delay, waited = _POLL_FIRST_SECONDS, False
    while True:
        answer = _duplicate_answer(seen, record.body_hash, waited)
        if answer is not None:
            return answer
        if _may_take_over(seen):
            seen, won = await store.take_over(seen, mine.claim, mine.lease_until)
            if won:
                log.info(
                    "taking over a request",
                    extra={"fields": {"event": "idempotency_takeover", "attempt": seen.attempt}},
                )
                return seen
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _in_progress(record.request_id)
        await asyncio.sleep(min(delay, remaining))
        delay, waited = min(delay * 2, _POLL_MAX_SECONDS), True
        current = await store.get(record.request_id)
        if current is None:  # the record expired meanwhile (TTL): claim it afresh
            current = await store.claim(mine)
            if current is None:
                return mine
        seen = current


def _duplicate_answer(seen: StatusRecord, body_hash: str, waited: bool) -> web.Response | None:
    """The answer to a duplicate from the record it found, or None while there is none yet."""
    if seen.body_hash and seen.body_hash != body_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Unprocessable Content",
            "this Idempotency-Key was already used with a different request body",
        )
    if seen.state in _QUEUED:
        metrics.idempotent_replays.inc()
        return _accepted(seen.request_id, seen.state)
    if seen.state is RequestState.SEND_FAILED and waited:
        # The attempt we waited for failed and answered 503: so do we. The client's retry
        # finds send_failed at once and starts a fresh attempt.
        raise unavailable("a service courier depends on is unavailable; retry later")
    return None


def _may_take_over(seen: StatusRecord) -> bool:
    if seen.state is RequestState.SEND_FAILED:
        return True
    return seen.state is RequestState.PENDING and 0 < seen.lease_until < int(time.time())


def _lease_end(settings: Settings) -> int:
    """When a claim may be taken over: after the IdM's worst case plus time to seal and send.

    Short enough that the clients of a crashed instance are not refused for long. A claimer
    still alive after it (SQS very slow) costs at most a second copy: the IdM call repeats
    under the same key, the taker's copy carries a higher ``attempt``, the loser's accept
    write fails, and the targets' Idempotency-Key absorbs the loser's copy if it arrives last.
    """
    idm = settings.idm.timeout_seconds * (settings.idm.retries + 1)
    return int(time.time() + idm + CLAIM_SEND_ALLOWANCE_SECONDS)


def _in_progress(request_id: str) -> Problem:
    return Problem(
        409,
        "request-in-progress",
        "Conflict",
        "a request with this Idempotency-Key is still in progress; retry after Retry-After seconds",
        headers={"Retry-After": IN_PROGRESS_RETRY_AFTER, "Location": _location(request_id)},
    )


async def _attempt(
    request: web.Request, record: StatusRecord, payload: dict[str, Any]
) -> web.Response:
    """The claimed attempt: the IdM unless an earlier attempt has the identity, then the send."""
    if not record.identity_id:
        try:
            identity_id = await _create_identity(request, record.request_id, payload)
        except Exception:
            await _mark_send_failed(request, record)
            raise
        record = dataclasses.replace(record, identity_id=identity_id)
    return await _send(request, record, payload)


async def _send(
    request: web.Request, record: StatusRecord, payload: dict[str, Any]
) -> web.Response:
    """Queue the message; on failure mark the record ``send_failed`` (never delete it)."""
    try:
        await _enqueue(request, record, payload)
    except Exception:
        current = await _mark_send_failed(request, record)
        if current is not None and current.state in _QUEUED:
            # The request was queued after all: a worker has a copy (an ambiguous timeout, or
            # an earlier attempt's), or a retry that took over our expired claim sent it.
            return _accepted(record.request_id, current.state)
        raise
    if record.state is not RequestState.PENDING:
        return _accepted(record.request_id, RequestState.ACCEPTED)
    try:
        current = await request.app[STATUS].accept(
            record.request_id, record.claim, record.identity_id
        )
    except (StatusUnavailableError, StatusRefusedError):
        # The message is durable, so 202 is true; the claim stays pending until a worker
        # finishes it, or its lease ends and a retry re-sends (the worker drops that copy).
        log.warning("queued, but could not mark the request accepted")
        current = None
    state = current.state if current is not None and current.state in _QUEUED else None
    return _accepted(record.request_id, state or RequestState.ACCEPTED)


async def _mark_send_failed(request: web.Request, record: StatusRecord) -> StatusRecord | None:
    """Best effort: the record as it is when it could not be marked (None otherwise)."""
    try:
        return await request.app[STATUS].mark_send_failed(
            record.request_id, record.claim, record.identity_id
        )
    except (StatusUnavailableError, StatusRefusedError):
        log.warning("could not mark the status record send_failed")
        return None


async def _create_identity(request: web.Request, request_id: str, payload: dict[str, Any]) -> str:
    try:
        return await request.app[IDM].create_identity(
            request_id, create_mailbox.identity_request(payload)
        )
    except IdmError as exc:
        raise _idm_problem(exc) from None


def _idm_problem(exc: IdmError) -> Problem:
    """What the client sees once the IdM's own retries are spent (see service/errors.py).

    409 when the identity exists (the client's request decides it); 504 / 502 with Retry-After
    when the IdM timed out or was unavailable (a later retry may succeed); 502 without it when
    the IdM refused what courier sent (retrying the same request cannot help).
    """
    if exc.kind == "conflict":
        return Problem(
            409, "identity-exists", "Conflict", "an identity with this username already exists"
        )
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if exc.retryable else {}
    if exc.kind == "timeout":
        return Problem(
            504,
            "idm-timeout",
            "Gateway Timeout",
            "the identity back-end did not answer in time",
            headers=headers,
        )
    return Problem(
        502, "idm-failed", "Bad Gateway", f"the identity back-end failed: {exc}", headers=headers
    )


async def _enqueue(request: web.Request, record: StatusRecord, payload: dict[str, Any]) -> None:
    event = create_mailbox.event(payload, record.identity_id, record.subject, record.created_at)
    event["record"] = carried_fields(record)  # for the worker's final write
    body = await request.app[ENVELOPE].seal(create_mailbox.NAME, record.request_id, event)
    attributes = {
        "op": create_mailbox.NAME,
        "request_id": record.request_id,
        "traceparent": _traceparent(request.headers.get("traceparent")),
    }
    if record.attempt > 1:
        attributes["attempt"] = str(record.attempt)
    await request.app[PRODUCER].send(
        body,
        attributes,
        group_id=create_mailbox.group_id(payload),
        deduplication_id=record.request_id,
    )


def _traceparent(incoming: str | None) -> str:
    if incoming and _TRACEPARENT.fullmatch(incoming):
        return incoming
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _location(request_id: str) -> str:
    return f"/v1/requests/{request_id}"


def _accepted(request_id: str, state: RequestState) -> web.Response:
    return web.json_response(
        {"request_id": request_id, "status": state.value},
        status=202,
        headers={"Location": _location(request_id)},
    )


def setup(app: web.Application) -> None:
    """Add the create-mailbox routes."""
    app.router.add_post("/v1/mailboxes", create)
    app.router.add_get("/v1/requests/{request_id}", status)
