"""Requests: look up a request id; its status record and timeline."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...status import StatusRecord, iso
from ..deadletters import Snapshot
from ..keys import DEAD_LETTERS
from .common import page, read_record, when

# Request ids are hex (courier's own) or what an Idempotency-Key derived: keep the lookup tame.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class Moment:
    """One line of a request's timeline."""

    at: str
    what: str


def timeline(record: StatusRecord | None, dead_letters: list[tuple[float, str]]) -> list[Moment]:
    """What is known of a request, in time order: the record's times and its DLQ copies."""
    moments: list[tuple[str, str]] = []
    if record is not None:
        moments.append((record.created_at, f"accepted by the API ({record.op})"))
        if record.updated_at and record.updated_at != record.created_at:
            targets = ", ".join(
                f"{name}: {state}" for name, state in sorted(record.targets.items())
            )
            detail = f" ({targets})" if targets else ""
            moments.append((record.updated_at, f"last update: {record.state.value}{detail}"))
    for failed_at, what in dead_letters:
        moments.append((iso(failed_at), what))
    return [Moment(at, what) for at, what in sorted(moments)]


async def lookup(request: web.Request) -> web.Response:
    """GET /requests?id=..."""
    request_id = request.query.get("id", "").strip()
    context: dict[str, Any] = {
        "request_id": request_id,
        "record": None,
        "letters": [],
        "timeline": [],
        "error": "",
        "dlq_caveat": "",
    }
    if request_id and not REQUEST_ID.fullmatch(request_id):
        context["error"] = "not a request id"
    elif request_id:
        context.update(await _found(request, request_id))
    return page(request, "requests.html", "requests", **context)


async def _found(request: web.Request, request_id: str) -> dict[str, Any]:
    record, error = await read_record(request, request_id)
    if error:
        return {"error": error}
    reader = request.app.get(DEAD_LETTERS)
    letters = []
    caveat = ""
    if reader is not None:
        snapshot = await reader.snapshot()
        letters = snapshot.for_request(request_id)
        caveat = _dlq_caveat(snapshot)
    copies = [
        (m.failed_at, f"dead-lettered: {m.reason}" + (f" at {m.target}" if m.target else ""))
        for m in letters
    ]
    return {
        "record": record,
        "letters": letters,
        "timeline": timeline(record, copies),
        "dlq_caveat": caveat,
        "error": "" if record is not None or letters else "no such request (or its record expired)",
    }


def _dlq_caveat(snapshot: Snapshot) -> str:
    """How far the DLQ copies shown fall short of the DLQ now ("" when they do not)."""
    if snapshot.absent:
        return "The DLQ was not checked: an action holds it; look again when it ends."
    if not snapshot.complete:
        return f"Only the first {len(snapshot.letters)} DLQ messages were checked."
    if snapshot.running is not None:
        return f"DLQ copies as read at {when(snapshot.taken_at)}, before the action now running."
    return ""


def setup(app: web.Application) -> None:
    """The requests page's route."""
    app.router.add_get("/requests", lookup)
