"""Stub identity back-end: ``POST /identities`` creates an identity per unique username."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from .base import StubServer


@dataclass
class IdmStub(StubServer):
    """Creates identities; 401 without the API key, 409 for a taken username, replays by key."""

    api_key: str = ""
    identities: dict[str, str] = field(default_factory=dict)  # username -> identity id
    by_key: dict[str, str] = field(default_factory=dict)  # idempotency key -> identity id

    def reset(self) -> None:
        """Also forget the identities created, so usernames can be reused."""
        super().reset()
        self.identities.clear()
        self.by_key.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/identities", self._create)

    async def _create(self, request: web.Request) -> web.Response:
        body, failure = await self.gate(request)
        if failure is not None:
            return failure
        if self.api_key and request.headers.get("X-Api-Key") != self.api_key:
            return web.json_response({"error": "bad api key"}, status=401)
        try:
            username = json.loads(body)["username"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "username required"}, status=400)
        key = request.headers.get("Idempotency-Key", "")
        if key and key in self.by_key:
            return web.json_response({"id": self.by_key[key], "username": username}, status=201)
        if username in self.identities:
            return web.json_response({"error": f"username {username!r} exists"}, status=409)
        identity = f"idm-{uuid.uuid4().hex[:16]}"
        self.identities[username] = identity
        if key:
            self.by_key[key] = identity
            self.effect(key, body)
        return web.json_response({"id": identity, "username": username}, status=201)
