"""Dead letters: groups, a filtered list, one message's page, and replay / discard / unmask."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from ...api.auth import AuthError
from ...envelope import EnvelopeCipher
from ...errors import EnvelopeError
from ...state import ENVELOPE, STATUS
from ...status import StatusRecord
from ..actions import Kind
from ..auth import COOKIE, UNMASK_SCOPE, audit, see_other, verify
from ..deadletters import DeadLetterReader, DeadLetterView, Snapshot, selection
from ..keys import COURIER, DEAD_LETTERS, JOBS, PRINCIPAL
from ..masking import masked_event
from .common import page

DEFAULT_RATE = 10.0
# An action's POST answers once the job ends, or after this long with a page that follows it.
ACTION_WAIT_SECONDS = 15.0
LISTED = 500  # rows of the filtered list


def _reader(request: web.Request) -> DeadLetterReader:
    reader = request.app.get(DEAD_LETTERS)
    if reader is None:
        raise web.HTTPNotFound(text="this process has no DLQ configured (queue.dlq_url)")
    return reader


def _filter(source: Any) -> dict[str, str]:
    return {name: str(source.get(name, "")).strip() for name in ("reason", "target", "op")}


async def groups(request: web.Request) -> web.Response:
    """GET /dead-letters."""
    snapshot = await _reader(request).snapshot()
    return page(
        request, "dead_letters.html", "dead-letters", snapshot=snapshot, groups=snapshot.groups()
    )


async def listing(request: web.Request) -> web.Response:
    """GET /dead-letters/messages?reason=&target=&op=."""
    snapshot = await _reader(request).snapshot()
    chosen = _filter(request.query)
    letters = snapshot.matching(**chosen)
    return page(
        request,
        "dead_letter_list.html",
        "dead-letters",
        snapshot=snapshot,
        letters=letters[:LISTED],
        total=len(letters),
        chosen=chosen,
        rate=DEFAULT_RATE,
    )


async def _letter(request: web.Request) -> tuple[DeadLetterView, Snapshot]:
    reader = _reader(request)
    message_id = request.match_info["message_id"]
    snapshot = await reader.snapshot()
    letter = snapshot.find(message_id)
    if letter is None and not reader.passes.locked():
        reader.invalidate()  # perhaps newer than the last read
        snapshot = await reader.snapshot()
        letter = snapshot.find(message_id)
    if letter is None:
        raise web.HTTPNotFound(
            text=f"no message {message_id!r} in the DLQ (replayed or discarded?)"
        )
    return letter, snapshot


async def message(request: web.Request) -> web.Response:
    """GET /dead-letters/messages/{message_id}: the masked event."""
    letter, _ = await _letter(request)
    return await _message_page(request, letter, unmasked=False)


async def unmask(request: web.Request) -> web.Response:
    """POST /dead-letters/messages/{message_id}/unmask: the event as sent (audit-logged)."""
    letter, _ = await _letter(request)
    where = {"filter": {"message_ids": [letter.message_id]}, "request_id": letter.request_id}
    try:
        principal = await verify(request, request.cookies.get(COOKIE, ""), UNMASK_SCOPE)
    except AuthError:
        audit(request[PRINCIPAL], "unmask", **where, count=0, outcome="refused: no scope")
        detail = f"showing personal fields needs a token with the scope {UNMASK_SCOPE}"
        return _refused(request, 403, detail)
    audit(principal, "unmask", **where, count=1, outcome="done")
    return await _message_page(request, letter, unmasked=True)


async def _message_page(
    request: web.Request, letter: DeadLetterView, *, unmasked: bool
) -> web.Response:
    courier = request.app[COURIER]
    event, event_error = await _open(courier[ENVELOPE], letter, unmasked=unmasked)
    record, record_error = await _record(request, letter.request_id)
    return page(
        request,
        "dead_letter.html",
        "dead-letters",
        letter=letter,
        event=event,
        event_error=event_error,
        unmasked=unmasked,
        record=record,
        record_error=record_error,
        rate=DEFAULT_RATE,
    )


async def _open(
    envelope: EnvelopeCipher, letter: DeadLetterView, *, unmasked: bool
) -> tuple[str, str]:
    """The event as indented JSON (masked unless ``unmasked``), or why it cannot be shown."""
    try:
        opened = await envelope.open(letter.body)
    except EnvelopeError as exc:
        return "", f"the envelope cannot be opened ({exc.reason}): {exc}"
    except Exception as exc:
        return "", f"the envelope cannot be opened now: {type(exc).__name__}"
    shown = opened.payload if unmasked else masked_event(opened.op, opened.payload)
    return json.dumps(shown, indent=2, ensure_ascii=False, sort_keys=True), ""


async def _record(request: web.Request, request_id: str) -> tuple[StatusRecord | None, str]:
    if not request_id:
        return None, "the message carries no request id"
    try:
        record = await request.app[COURIER][STATUS].get(request_id)
    except Exception as exc:
        return None, f"the status table cannot be read now: {type(exc).__name__}"
    return record, "" if record is not None else "no status record (expired, or never written)"


def _rate(form: Any) -> float:
    try:
        rate = float(str(form.get("rate", DEFAULT_RATE)))
    except ValueError:
        return DEFAULT_RATE
    return rate if math.isfinite(rate) and rate > 0 else DEFAULT_RATE


async def replay_action(request: web.Request) -> web.Response:
    """POST /dead-letters/replay: the selected messages, or all matching the filter."""
    form = await request.post()
    return await _start(request, "replay", form, dry_run="dry_run" in form, limit=0)


async def discard_action(request: web.Request) -> web.Response:
    """POST /dead-letters/discard: needs ``confirm`` = "discard N", and deletes what the page
    showed: its N messages by id (the filter with a limit of N past the read's cap)."""
    form = await request.post()
    expected = str(form.get("expected", ""))
    if not expected.isdigit() or str(form.get("confirm", "")).strip() != f"discard {expected}":
        return _refused(request, 400, f"to discard, type exactly: discard {expected or 'N'}")
    ids = [str(value) for value in form.getall("id", [])]
    last = _reader(request).last
    if not ids and last is not None and last.complete:
        ids = [letter.message_id for letter in last.matching(**_filter(form))]
        if len(ids) != int(expected):
            return _refused(request, 409, "the DLQ changed since the page was read: reload it")
    return await _start(request, "discard", form, dry_run=False, limit=int(expected), ids=ids)


def _refused(request: web.Request, status: int, detail: str) -> web.Response:
    return page(request, "action_refused.html", "dead-letters", status=status, detail=detail)


async def _start(
    request: web.Request,
    kind: Kind,
    form: Any,
    *,
    dry_run: bool,
    limit: int,
    ids: list[str] | None = None,
) -> web.Response:
    reader = _reader(request)
    if ids is None:
        ids = [str(value) for value in form.getall("id", [])]
    chosen = selection(**_filter(form), message_ids=ids, snapshot=reader.last)
    jobs = request.app[JOBS]
    job = jobs.start(
        kind, request[PRINCIPAL], chosen, dry_run=dry_run, rate=_rate(form), limit=limit
    )
    await jobs.wait(job, ACTION_WAIT_SECONDS)
    return see_other(f"/actions/{job.id}")


async def action(request: web.Request) -> web.Response:
    """GET /actions/{job_id}: a job's progress and result."""
    job = request.app[JOBS].get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(text="no such action (the console keeps the last 50)")
    return page(request, "action.html", "dead-letters", job=job)


def setup(app: web.Application) -> None:
    """The dead-letter pages' routes."""
    app.router.add_get("/dead-letters", groups)
    app.router.add_get("/dead-letters/messages", listing)
    app.router.add_get("/dead-letters/messages/{message_id}", message)
    app.router.add_post("/dead-letters/messages/{message_id}/unmask", unmask)
    app.router.add_post("/dead-letters/replay", replay_action)
    app.router.add_post("/dead-letters/discard", discard_action)
    app.router.add_get("/actions/{job_id}", action)
