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

# Examples: tests/test_openapi.py validates each against its schema and POSTs the request
# examples to a running courier, so they cannot drift from what the API accepts and answers.
_EXAMPLE_REQUEST_ID = "5f0c6a1e9b2d4c7fa3e81d2b6c4a9e07"
_REQUEST_EXAMPLES = {
    "minimal": {
        "summary": "the required fields only",
        "value": {
            "username": "jane.doe",
            "display_name": "Jane Doe",
            "plan": "standard",
            "contact_email": "jane@example.com",
        },
    },
    "full": {
        "summary": "every field",
        "value": {
            "username": "john.smith",
            "display_name": "John Smith",
            "plan": "premium",
            "contact_email": "john.smith@example.net",
            "msisdn": "+447700900123",
            "quota_mb": 20480,
            "locale": "en-GB",
            "aliases": ["jsmith", "john.s"],
        },
    },
}
_ACCEPTED_EXAMPLE = {"request_id": _EXAMPLE_REQUEST_ID, "status": "accepted"}
_STATUS_EXAMPLE = {
    "request_id": _EXAMPLE_REQUEST_ID,
    "operation": create_mailbox.NAME,
    "status": "processing",
    "identity_id": "idm-3f9a2c",
    "created_at": "2026-01-15T09:30:00.123Z",
    "updated_at": "2026-01-15T09:30:01.456Z",
    "targets": {"billing": "delivered", "mailstore": "pending"},
}
# The 422 example's errors are what courier itself says about this body.
_INVALID_REQUEST = {"username": "Jane", "plan": "gold", "contact_email": "jane@example.com"}


def _problem_example(
    summary: str, status: int, slug: str, title: str, detail: str
) -> dict[str, Any]:
    value = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": _EXAMPLE_REQUEST_ID,
    }
    return {"summary": summary, "value": value}


def _problem_examples() -> dict[int, dict[str, Any]]:
    """Examples of the main problems, by status (the texts are courier's own)."""
    errors = create_mailbox.validation_errors(_INVALID_REQUEST)
    invalid = _problem_example(
        "the body breaks the CreateMailboxRequest schema",
        422,
        "validation-failed",
        "Unprocessable Content",
        f"the request body does not match the CreateMailboxRequest schema ({len(errors)} errors)",
    )
    invalid["value"]["errors"] = errors
    return {
        401: {
            "invalid-token": _problem_example(
                "no bearer token (an invalid one gets the same problem, another detail)",
                401,
                "invalid-token",
                "Unauthorized",
                "an 'Authorization: Bearer <token>' header is required",
            )
        },
        409: {
            "identity-exists": _problem_example(
                "the IdM already has this username",
                409,
                "identity-exists",
                "Conflict",
                "an identity with this username already exists",
            ),
            "request-in-progress": _problem_example(
                "another request with this Idempotency-Key is being handled",
                409,
                "request-in-progress",
                "Conflict",
                "a request with this Idempotency-Key is still in progress; "
                "retry after Retry-After seconds",
            ),
        },
        422: {"validation-failed": invalid},
        503: {
            "service-unavailable": _problem_example(
                "a dependency is down; nothing was accepted",
                503,
                "service-unavailable",
                "Service Unavailable",
                "a service courier depends on is unavailable; retry later",
            )
        },
    }


# Problems that carry a header clients act on have their own response component.
_PROBLEM_RESPONSES = {
    401: "Unauthorized",
    403: "Forbidden",
    409: "Conflict",
    422: "Unprocessable",
    503: "Unavailable",
}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"$ref": f"#/components/responses/{_PROBLEM_RESPONSES.get(status, 'Problem')}"}
        for status in statuses
    }


def _problem_response(
    description: str, header: str = "", meaning: str = "", status: int = 0
) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if header:
        headers[header] = {"required": True, "description": meaning, "schema": {"type": "string"}}
    media: dict[str, Any] = {"schema": {"$ref": "#/components/schemas/Problem"}}
    examples = _problem_examples().get(status)
    if examples:
        media["examples"] = examples
    return {
        "description": description,
        "headers": headers,
        "content": {"application/problem+json": media},
    }


def _conflict_response() -> dict[str, Any]:
    """409: two problems, and only the in-progress one carries Retry-After and Location."""
    response = _problem_response(
        "identity-exists: the IdM already has this username; request-in-progress: another "
        "request with this Idempotency-Key is being handled, retry after Retry-After",
        status=409,
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


def _json(
    schema: dict[str, Any], description: str, example: dict[str, Any] | None = None
) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["examples"] = {"example": {"value": example}}
    return {"description": description, "content": {"application/json": media}}


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
                    status=401,
                ),
                "Forbidden": _problem_response(
                    "the token lacks the operation's scope",
                    "WWW-Authenticate",
                    "Bearer challenge naming the missing scope",
                ),
                "Conflict": _conflict_response(),
                "Unprocessable": _problem_response(
                    "validation-failed: the body breaks the schema (see errors); "
                    "idempotency-key-reused: the key was used with a different body",
                    status=422,
                ),
                "Unavailable": _problem_response(
                    "a dependency is down; nothing was accepted",
                    "Retry-After",
                    "seconds to wait before retrying",
                    status=503,
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
                    "schema": {"$ref": "#/components/schemas/CreateMailboxRequest"},
                    "examples": _REQUEST_EXAMPLES,
                }
            },
        },
        "responses": {
            "202": {
                **_json(
                    {"$ref": "#/components/schemas/Accepted"},
                    "queued; follow Location for the status",
                    _ACCEPTED_EXAMPLE,
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
            "200": _json(
                {"$ref": "#/components/schemas/RequestStatus"}, "the status record", _STATUS_EXAMPLE
            ),
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
