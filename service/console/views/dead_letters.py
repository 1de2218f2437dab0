"""Dead letters: groups, a filtered list, one message's page, and replay / discard / unmask."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from ...api.auth import AuthError
from ...envelope import EnvelopeCipher
from ...errors import EnvelopeError
from ...state import ENVELOPE
from ...status import StatusRecord
from ..actions import MAX_RATE, MIN_RATE, Job, Kind, Refused
from ..auth import UNMASK_SCOPE, audit, see_other, session_token, verify
from ..deadletters import DeadLetterReader, DeadLetterView, Running, selection
from ..keys import COURIER, DEAD_LETTERS, JOBS, PRINCIPAL
from ..masking import masked_event
from .common import page, read_record

DEFAULT_RATE = 10.0
# An action's POST answers once the job ends, or after this long with a page that follows it.
ACTION_WAIT_SECONDS = 15.0
LISTED = 500  # rows of the filtered list (and the most a discard from it deletes)
BUSY_REFRESH_SECONDS = 2


def _reader(request: web.Request) -> DeadLetterReader:
    reader = request.app.get(DEAD_LETTERS)
    if reader is None:
        raise web.HTTPNotFound(text="this process has no DLQ configured (queue.dlq_url)")
    return reader


def _filter(source: Any) -> dict[str, str]:
    return {name: str(source.get(name, "")).strip() for name in ("reason", "target", "op")}


def _busy(request: web.Request, running: Running) -> web.Response:
    """The page an unread DLQ gets while an action holds it: 503, refreshing itself."""
    response = page(
        request,
        "dead_letters_busy.html",
        "dead-letters",
        status=503,
        running=running,
        refresh=BUSY_REFRESH_SECONDS,
    )
    response.headers["Retry-After"] = str(BUSY_REFRESH_SECONDS)
    return response


async def groups(request: web.Request) -> web.Response:
    """GET /dead-letters."""
    snapshot = await _reader(request).snapshot()
    if snapshot.absent and snapshot.running is not None:
        return _busy(request, snapshot.running)
    return page(
        request, "dead_letters.html", "dead-letters", snapshot=snapshot, groups=snapshot.groups()
    )


async def listing(request: web.Request) -> web.Response:
    """GET /dead-letters/messages?reason=&target=&op=."""
    snapshot = await _reader(request).snapshot()
    if snapshot.absent and snapshot.running is not None:
        return _busy(request, snapshot.running)
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
        min_rate=MIN_RATE,
        max_rate=MAX_RATE,
    )


class _Busy(Exception):
    """A message not in the read served while an action holds the DLQ: perhaps it is there."""

    def __init__(self, running: Running) -> None:
        super().__init__("an action holds the DLQ")
        self.running = running


async def _letter(request: web.Request) -> DeadLetterView:
    reader = _reader(request)
    message_id = request.match_info["message_id"]
    snapshot = await reader.snapshot()
    letter = snapshot.find(message_id)
    if letter is None and snapshot.running is None:
        reader.mark_stale()  # perhaps newer than the last read: read again
        snapshot = await reader.snapshot()
        letter = snapshot.find(message_id)
    if letter is None and snapshot.running is not None:
        raise _Busy(snapshot.running)
    if letter is None:
        raise web.HTTPNotFound(
            text=f"no message {message_id!r} in the DLQ (replayed or discarded?)"
        )
    return letter


async def message(request: web.Request) -> web.Response:
    """GET /dead-letters/messages/{message_id}: the masked event."""
    try:
        letter = await _letter(request)
    except _Busy as busy:
        return _busy(request, busy.running)
    return await _message_page(request, letter, unmasked=False)


async def unmask(request: web.Request) -> web.Response:
    """POST /dead-letters/messages/{message_id}/unmask: the event as sent (audit-logged)."""
    try:
        letter = await _letter(request)
    except _Busy as busy:
        return _busy(request, busy.running)
    where = {"filter": {"message_ids": [letter.message_id]}, "request_id": letter.request_id}
    try:
        principal = await verify(request, session_token(request), UNMASK_SCOPE)
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
        min_rate=MIN_RATE,
        max_rate=MAX_RATE,
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
    record, error = await read_record(request, request_id)
    if record is None and not error:
        error = "no status record (expired, or never written)"
    return record, error


def _rate(form: Any) -> float:
    """The form's rate (DEFAULT_RATE when it has none; nan when not a number): Jobs.start
    refuses one out of bounds."""
    try:
        return float(str(form.get("rate", DEFAULT_RATE)))
    except ValueError:
        return math.nan


async def replay_action(request: web.Request) -> web.Response:
    """POST /dead-letters/replay: the selected messages, or all matching the filter."""
    form = await request.post()
    return await _start(request, "replay", form, dry_run="dry_run" in form, limit=0)


async def discard_action(request: web.Request) -> web.Response:
    """POST /dead-letters/discard: needs ``confirm`` = "discard N", and deletes exactly what
    the page showed: the N message ids its form carries (those still in the DLQ), no more."""
    form = await request.post()
    expected = str(form.get("expected", ""))
    if not expected.isdigit() or str(form.get("confirm", "")).strip() != f"discard {expected}":
        return _refused(request, 400, f"to discard, type exactly: discard {expected or 'N'}")
    ids = sorted({str(value) for value in form.getall("id", [])})
    if not ids or len(ids) != int(expected):
        detail = (
            f"the form lists {len(ids)} messages and the confirmation says {expected}:"
            " nothing was discarded; reload the page and confirm again"
        )
        return _refused(request, 409, detail)
    return await _start(request, "discard", form, dry_run=False, limit=len(ids), ids=ids)


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
    try:
        job = jobs.start(
            kind, request[PRINCIPAL], chosen, dry_run=dry_run, rate=_rate(form), limit=limit
        )
    except Refused as refused:
        return _refused(request, refused.status, refused.detail)
    if not jobs.queued(job):  # behind another job: its page follows it from the start
        await jobs.wait(job, ACTION_WAIT_SECONDS)
    return see_other(f"/actions/{job.id}")


def _job(request: web.Request) -> Job:
    job = request.app[JOBS].get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(text="no such action (the console keeps the last 50)")
    return job


async def action(request: web.Request) -> web.Response:
    """GET /actions/{job_id}: a job's progress and result."""
    return page(request, "action.html", "dead-letters", job=_job(request))


async def stop_action(request: web.Request) -> web.Response:
    """POST /actions/{job_id}/stop: stop a running or waiting job; its page once it has ended
    (a move under way finishes first). Stopping an ended job changes nothing."""
    job = _job(request)
    jobs = request.app[JOBS]
    jobs.stop(job, request[PRINCIPAL])
    await jobs.wait(job, ACTION_WAIT_SECONDS)
    return see_other(f"/actions/{job.id}")


def setup(app: web.Application) -> None:
    """The dead-letter pages' routes."""
    app.router.add_get("/dead-letters", groups)
    app.router.add_get("/dead-letters/messages", listing)
    app.router.add_get("/dead-letters/messages/{message_id}", message)
    app.router.add_post("/dead-letters/messages/{message_id}/unmask", unmask)
    app.router.add_post("/dead-letters/replay", replay_action)
    app.router.add_post("/dead-letters/discard", discard_action)
    app.router.add_get("/actions/{job_id}", action)
    app.router.add_post("/actions/{job_id}/stop", stop_action)
