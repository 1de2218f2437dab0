"""RFC 9457 problem details: every error the API returns is one of these, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web

CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:courier:problem:"


class Problem(Exception):
    """An error answer: stable ``type`` slug, ``title``, ``status``, ``detail`` (+ extra members).

    Raised anywhere under a handler; the ``observe`` middleware renders it.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.headers = dict(headers or {})
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra

    def body(self, request_id: str | None) -> dict[str, Any]:
        """The problem document."""
        document: dict[str, Any] = {
            "type": TYPE_PREFIX + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if request_id:
            document["request_id"] = request_id
        document.update(self.extra)
        return document

    def to_response(self, request_id: str | None) -> web.Response:
        """The problem as an ``application/problem+json`` response."""
        return web.Response(
            status=self.status,
            body=json.dumps(self.body(request_id)).encode(),
            content_type=CONTENT_TYPE,
            headers=self.headers,
        )


def from_http_exception(exc: web.HTTPException) -> Problem:
    """Turn aiohttp's own errors (404, 405, 413, ...) into problems."""
    slug = {
        404: "not-found",
        405: "method-not-allowed",
        413: "payload-too-large",
    }.get(exc.status, f"http-{exc.status}")
    headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
    return Problem(exc.status, slug, exc.reason, exc.text or exc.reason, headers=headers)


RETRY_AFTER_SECONDS = "2"


def unavailable(detail: str) -> Problem:
    """503 with Retry-After: a dependency (SQS, DynamoDB, KMS, ...) is down; nothing was accepted."""
    return Problem(
        503,
        "service-unavailable",
        "Service Unavailable",
        detail,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def internal_error() -> Problem:
    """What a client sees when courier itself failed: no details, the request id to quote."""
    return Problem(
        500,
        "internal-error",
        "Internal Server Error",
        "courier failed to handle the request; quote the request_id when reporting it.",
    )


# What a client is told about a request aiohttp's parser refused, by the parser's error: never
# the parser's message, which quotes the request's bytes. Most specific first.
_MALFORMED = (
    (http_exceptions.LineTooLong, "the request line or a header field is too long"),
    (http_exceptions.InvalidHeader, "a header field is malformed"),
    (http_exceptions.BadHttpMethod, "the request is not an HTTP/1.1 request"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidURLError, "the request target is malformed"),
    (http_exceptions.PayloadEncodingError, "the request body's encoding is malformed"),
)


def malformed_request(status: int, exc: BaseException | None) -> Problem:
    """A request the HTTP parser refused (aiohttp answers these before any handler runs)."""
    detail = next(
        (text for kind, text in _MALFORMED if isinstance(exc, kind)),
        "the request is not valid HTTP/1.1",
    )
    return Problem(status, "malformed-request", HTTPStatus(status).phrase, detail)
