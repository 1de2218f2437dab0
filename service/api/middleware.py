"""Middlewares: correlation id, problem+json for every error, metrics and the JSON access log."""

from __future__ import annotations

import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from .. import metrics
from ..errors import TransientError
from ..logs import bind_context
from .problems import Problem, from_http_exception, internal_error, unavailable

log = logging.getLogger("courier.access")
errors_log = logging.getLogger("courier.api")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# A caller-chosen id is echoed and logged: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(request: web.Request) -> str:
    """The correlation id of ``request`` (from X-Request-Id, or generated)."""
    return request.get(REQUEST_ID_KEY) or ""


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: correlation id, problem+json conversion, metrics, access log."""
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    bind_context(request_id=request_id)
    started = time.perf_counter()
    response = await _problems(request, handler, request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    elapsed = time.perf_counter() - started
    route = _route_name(request)
    metrics.http_requests.labels(route, request.method, str(response.status)).inc()
    metrics.http_latency.labels(route, request.method).observe(elapsed)
    if request.app.get(ACCESS_LOG_KEY, True):
        log.info(
            "%s %s %s",
            request.method,
            route,
            response.status,
            extra={
                "fields": {
                    "event": "http_request",
                    "method": request.method,
                    "route": route,
                    "status": response.status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "remote": request.remote,
                }
            },
        )
    return response


async def _problems(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem.to_response(request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc).to_response(request_id)
    except TransientError as exc:
        errors_log.warning(
            "dependency unavailable: %s", exc, extra={"fields": {"event": "dependency_unavailable"}}
        )
        return unavailable("a service courier depends on is unavailable; retry later").to_response(
            request_id
        )
    except Exception:
        errors_log.exception("unhandled error in %s", _route_name(request))
        return internal_error().to_response(request_id)


ACCESS_LOG_KEY = web.AppKey("access_log", bool)
