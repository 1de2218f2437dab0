"""Stub legacy system: accepts JSON or SOAP deliveries and counts effects per idempotency key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .base import StubServer

SOAP_OK = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
    "<CreateMailboxResponse><Result>OK</Result></CreateMailboxResponse>"
    "</soap:Body></soap:Envelope>"
)


@dataclass
class LegacyStub(StubServer):
    """Any POST path; every successful delivery is counted under its ``Idempotency-Key``."""

    name: str = "legacy"
    token: str = ""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._deliver)

    async def _deliver(self, request: web.Request) -> web.Response:
        body, failure = await self.gate(request)
        if failure is not None:
            return failure
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorised"}, status=401)
        key = request.headers.get("Idempotency-Key", "")
        if key:
            self.effect(key, body)
        if "xml" in request.content_type:
            return web.Response(text=SOAP_OK, content_type="text/xml")
        return web.json_response({"status": "ok", "system": self.name})
