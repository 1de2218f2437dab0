"""Reading a JSON request body strictly: media type, size, UTF-8, duplicate keys, nesting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from ..state import SETTINGS
from .problems import Problem


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _DuplicateKeyError(f"duplicate key {key[:64]!r}")
        document[key] = value
    return document


def _no_constants(name: str) -> Any:
    # Python's json accepts NaN and ±Infinity; RFC 8259 JSON does not.
    raise ValueError(f"{name!r} is not a JSON value")


async def _read_body(request: web.Request) -> bytes:
    timeout = request.app[SETTINGS].http.body_timeout_seconds
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the common small request): reading it
            # cannot wait, so no timer and no task (wait_for's cost, ~10% of a create).
            return await request.read()
        # aiohttp raises 413 beyond client_max_size; nothing bounds a slow body but this.
        return await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise Problem(
            408,
            "body-timeout",
            "Request Timeout",
            f"the request body did not arrive within {timeout:g}s",
        ) from None
    except (
        aiohttp.ClientPayloadError,
        aiohttp.http_exceptions.HttpProcessingError,
        ConnectionError,
    ):
        raise Problem(
            400,
            "incomplete-body",
            "Bad Request",
            "the request body ended before its Content-Length",
        ) from None


async def read_json(request: web.Request) -> Any:
    """The parsed body, or a 415/413/400 problem saying exactly what is wrong."""
    if request.content_type != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported Media Type",
            f"the body must be application/json, not {request.content_type or 'missing'!r}",
        )
    raw = await _read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(400, "malformed-json", "Bad Request", "the body is not valid UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKeyError as exc:
        raise Problem(400, "malformed-json", "Bad Request", f"the JSON has a {exc}") from None
    except RecursionError:
        # The C decoder refuses pathological nesting with RecursionError instead of crashing.
        raise Problem(
            400, "malformed-json", "Bad Request", "the JSON is nested too deeply"
        ) from None
    except ValueError as exc:
        raise Problem(
            400, "malformed-json", "Bad Request", f"the body is not valid JSON: {exc}"
        ) from None
