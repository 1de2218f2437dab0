"""``/healthz`` (alive), ``/readyz`` (fit for traffic) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from aiohttp import web

from .. import metrics
from ..state import READINESS


async def healthz(_: web.Request) -> web.Response:
    """The process and its event loop are alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when secrets are loaded, AWS answers and the process is not draining; else 503.

    The body names each check as "ok" or "failing" and nothing more: the reasons are in the
    log (``readiness_probe_failed``), because AWS error text names the role, account and
    resources, and this route answers without authentication.
    """
    readiness = request.app[READINESS]
    ready, checks = await readiness.report()
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return web.json_response(body, status=200 if ready else 503)


async def metrics_handler(_: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body, content_type = metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def setup(app: web.Application) -> None:
    """Add the operational routes to ``app``."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
