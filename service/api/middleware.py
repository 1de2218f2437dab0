"""Middlewares: correlation id, problem+json for every error, metrics and the JSON access log.

Also ``ProblemAppRunner``: what aiohttp answers itself, outside any middleware (a request its
HTTP parser refuses), is problem+json too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .. import metrics
from ..errors import TransientError
from ..logs import bind_context
from .problems import Problem, from_http_exception, internal_error, malformed_request, unavailable

log = logging.getLogger("courier.access")
errors_log = logging.getLogger("courier.api")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# A caller-chosen id is echoed and logged: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_requests = metrics.LabelCache(metrics.http_requests)
_latency = metrics.LabelCache(metrics.http_latency)


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
    request_id = supplied if _VALID_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    bind_context(request_id=request_id)
    started = time.perf_counter()
    response = await _problems(request, handler, request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    elapsed = time.perf_counter() - started
    route = _route_name(request)
    _requests(route, request.method, str(response.status)).inc()
    _latency(route, request.method).observe(elapsed)
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
        # The decision tells an outage (RETRY: wait) from a deployment fault (MISCONFIGURED:
        # IAM, a missing queue or table, a disabled key: someone has to act).
        fields = {"event": "dependency_unavailable", "decision": exc.decision.value}
        errors_log.warning("dependency unavailable: %s", exc, extra={"fields": fields})
        return unavailable("a service courier depends on is unavailable; retry later").to_response(
            request_id
        )
    except Exception:
        errors_log.exception("unhandled error in %s", _route_name(request))
        return internal_error().to_response(request_id)


ACCESS_LOG_KEY = web.AppKey("access_log", bool)


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what never reaches the app as problem+json.

    A request aiohttp's parser refuses (malformed request line, bad or oversized header, bad
    chunked encoding) is answered by ``handle_error``, outside every middleware; aiohttp's
    answer is text that quotes the parser's message, i.e. bytes of the request (a token, say).
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The problem for ``status``; aiohttp's own handling (logging, never answering twice)
        runs first, with the request id in the log line's context."""
        # Set by ``observe`` when the request got that far (an exception escaping it).
        request_id = str(request.get(REQUEST_ID_KEY) or uuid.uuid4().hex)
        bind_context(request_id=request_id)
        super().handle_error(request, status, exc, message)
        problem = internal_error() if status >= 500 else malformed_request(status, exc)
        response = problem.to_response(request_id)
        response.headers[REQUEST_ID_HEADER] = request_id
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use ``ProblemRequestHandler``."""

    async def _make_server(self) -> web.Server:
        # aiohttp has no option for the connection handler's class: the app's server is
        # rebuilt, same arguments, as a server that makes ``ProblemRequestHandler``s.
        server = await super()._make_server()
        return _ProblemServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
