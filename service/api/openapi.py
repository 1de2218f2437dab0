"""The OpenAPI 3.1 document of every route, built from the same schemas the handlers use."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from ..operations import create_mailbox
from .problems import TYPE_PREFIX

_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": f"stable problem type, '{TYPE_PREFIX}<slug>'"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "request_id": {"type": "string", "description": "correlation id, also in X-Request-Id"},
        "errors": {
            "type": "array",
            "description": "schema violations (validation-failed only)",
            "items": {
                "type": "object",
                "required": ["pointer", "message"],
                "properties": {"pointer": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

_ACCEPTED_SCHEMA = {
    "type": "object",
    "required": ["request_id", "status"],
    "properties": {
        "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "status": {"type": "string", "enum": ["accepted", "processing", "completed", "failed"]},
    },
}

_STATUS_SCHEMA = {
    "type": "object",
    "required": ["request_id", "operation", "status", "created_at", "updated_at", "targets"],
    "properties": {
        "request_id": {"type": "string"},
        "operation": {"type": "string"},
        "status": {
            "type": "string",
            "enum": ["pending", "send_failed", "accepted", "processing", "completed", "failed"],
            "description": (
                "pending: being created; send_failed: could not be queued, retry with the same "
                "Idempotency-Key; accepted: queued; then processing, completed or failed"
            ),
        },
        "identity_id": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "targets": {
            "type": "object",
            "description": "delivery state per legacy target (pending, delivered, failed)",
            "additionalProperties": {"type": "string"},
        },
        "error": {"type": "string"},
    },
}

_REQUEST_SCHEMA = {k: v for k, v in create_mailbox.REQUEST_SCHEMA.items() if k != "$schema"}


# Problems that carry a header clients act on have their own response component.
_PROBLEM_RESPONSES = {401: "Unauthorized", 403: "Forbidden", 409: "Conflict", 503: "Unavailable"}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"$ref": f"#/components/responses/{_PROBLEM_RESPONSES.get(status, 'Problem')}"}
        for status in statuses
    }


def _problem_response(description: str, header: str = "", meaning: str = "") -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if header:
        headers[header] = {"required": True, "description": meaning, "schema": {"type": "string"}}
    return {
        "description": description,
        "headers": headers,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def _conflict_response() -> dict[str, Any]:
    """409: two problems, and only the in-progress one carries Retry-After and Location."""
    response = _problem_response(
        "identity-exists: the IdM already has this username; request-in-progress: another "
        "request with this Idempotency-Key is being handled, retry after Retry-After"
    )
    response["headers"]["Retry-After"] = {
        "description": "request-in-progress only: seconds to wait before retrying",
        "schema": {"type": "string"},
    }
    response["headers"]["Location"] = {
        "description": "request-in-progress only: /v1/requests/{request_id} of that request",
        "schema": {"type": "string"},
    }
    return response


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "courier",
            "version": __version__,
            "description": "Orchestration API: create-mailbox and request status.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "CreateMailboxRequest": _REQUEST_SCHEMA,
                "Accepted": _ACCEPTED_SCHEMA,
                "RequestStatus": _STATUS_SCHEMA,
                "Problem": _PROBLEM_SCHEMA,
            },
            "headers": {
                "X-Request-Id": {
                    "description": "correlation id (echoed or generated)",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "responses": {
                "Problem": _problem_response("an RFC 9457 problem"),
                "Unauthorized": _problem_response(
                    "missing or invalid bearer token",
                    "WWW-Authenticate",
                    "Bearer challenge (RFC 6750)",
                ),
                "Forbidden": _problem_response(
                    "the token lacks the operation's scope",
                    "WWW-Authenticate",
                    "Bearer challenge naming the missing scope",
                ),
                "Conflict": _conflict_response(),
                "Unavailable": _problem_response(
                    "a dependency is down; nothing was accepted",
                    "Retry-After",
                    "seconds to wait before retrying",
                ),
            },
        },
        "paths": {
            "/v1/mailboxes": {"post": _create_operation()},
            "/v1/requests/{request_id}": {"get": _status_operation()},
            "/healthz": {"get": _plain("healthz", "the process is alive")},
            "/readyz": {
                "get": {**_plain("readyz", "ready for traffic"), "responses": _readyz_responses()}
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {"get": {**_plain("openapi", "this document")}},
        },
    }


def _create_operation() -> dict[str, Any]:
    return {
        "operationId": "createMailbox",
        "summary": "Create a mailbox: identity now, legacy systems asynchronously",
        "security": [{"bearer": ["mailbox:create"]}],
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                "description": "retries with the same key and body return the original answer",
            },
            {
                "name": "traceparent",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "W3C trace context, propagated to the queued event",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/CreateMailboxRequest"}
                }
            },
        },
        "responses": {
            "202": {
                **_json(
                    {"$ref": "#/components/schemas/Accepted"},
                    "queued; follow Location for the status",
                ),
                "headers": {
                    "Location": {
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "/v1/requests/{request_id}",
                    },
                    "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
                },
            },
            **_problems(400, 401, 403, 409, 413, 415, 422, 500, 502, 503, 504),
        },
    }


def _status_operation() -> dict[str, Any]:
    return {
        "operationId": "getRequest",
        "summary": "Status of a request, with per-target delivery states",
        "security": [{"bearer": ["mailbox:read"]}],
        "parameters": [
            {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/RequestStatus"}, "the status record"),
            **_problems(401, 403, 404, 500, 503),
        },
    }


def _plain(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "responses": {"200": _json({"type": "object"}, summary)},
    }


def _readyz_responses() -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "checks": {
                "type": "object",
                "additionalProperties": {"type": "string", "enum": ["ok", "failing"]},
            },
        },
    }
    return {
        "200": _json(schema, "ready"),
        "503": _json(schema, "not ready: the failing checks are named, their reasons are logged"),
    }


async def openapi_json(_: web.Request) -> web.Response:
    """Serve the document."""
    return web.json_response(document())


def setup(app: web.Application) -> None:
    """Add ``/openapi.json``."""
    app.router.add_get("/openapi.json", openapi_json)
