"""POST /v1/mailboxes and GET /v1/requests/{id} over real HTTP, against moto and a stub IdM."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest

from service import daemon
from service.aws import AwsClients
from service.bootstrap import Resources
from service.envelope import EnvelopeCipher
from service.settings import Settings
from service.stubs import IdmStub
from tests.conftest import DEMO_SECRETS

HS256_KEY = DEMO_SECRETS["courier.jwt.hs256"]
VALID_BODY = {
    "username": "jane.doe",
    "display_name": "Jane Doe",
    "plan": "standard",
    "contact_email": "jane@example.com",
}


@dataclass
class Api:
    """A running courier API with its stub IdM and AWS resources."""

    url: str
    settings: Settings
    resources: Resources
    idm: IdmStub
    http: aiohttp.ClientSession
    aws: AwsClients

    def token(self, scopes: str = "mailbox:create mailbox:read", **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": self.settings.auth.issuer,
            "aud": self.settings.auth.audience,
            "sub": "tester",
            "scope": scopes,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            **overrides,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, HS256_KEY, algorithm="HS256")

    async def post(
        self,
        body: Any = VALID_BODY,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        all_headers = {"Authorization": f"Bearer {token or self.token()}", **(headers or {})}
        async with self.http.post(
            f"{self.url}/v1/mailboxes", json=body, headers=all_headers
        ) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)

    async def queued(self) -> list[dict[str, Any]]:
        response = await self.aws.sqs.receive_message(
            QueueUrl=self.resources.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            VisibilityTimeout=0,
        )
        return list(response.get("Messages", []))


def api_settings(settings: Settings, idm_url: str) -> Settings:
    return settings.replace(
        http=dataclasses.replace(settings.http, port=0, drain_seconds=2),
        idm=dataclasses.replace(settings.idm, url=idm_url, timeout_seconds=0.5, retries=1),
        role="api",
    )


@pytest.fixture
async def api(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Api]:
    idm = IdmStub(api_key=DEMO_SECRETS["courier.idm.api_key"])
    async with (
        idm.serving() as idm_url,
        daemon.serving(api_settings(settings, idm_url)) as listening,
    ):
        async with aiohttp.ClientSession() as http:
            yield Api(listening.url, api_settings(settings, idm_url), fresh, idm, http, aws)


async def test_happy_path_queues_one_decryptable_message(api: Api) -> None:
    status, headers, body = await api.post()
    assert status == 202, body
    request_id = body["request_id"]
    assert body == {"request_id": request_id, "status": "accepted"}
    assert headers["Location"] == f"/v1/requests/{request_id}"
    messages = await api.queued()
    assert len(messages) == 1
    attributes = {k: v["StringValue"] for k, v in messages[0]["MessageAttributes"].items()}
    assert attributes["op"] == "create-mailbox"
    assert attributes["request_id"] == request_id
    assert attributes["traceparent"].startswith("00-")
    assert "jane" not in messages[0]["Body"]  # no plaintext personal data in the queue
    opened = await EnvelopeCipher(api.aws.kms, api.settings.envelope).open(messages[0]["Body"])
    assert opened.id == request_id
    assert opened.payload["mailbox"]["username"] == "jane.doe"
    assert opened.payload["mailbox"]["quota_mb"] == 10240
    assert opened.payload["identity_id"] == api.idm.identities["jane.doe"]
    async with api.http.get(
        f"{api.url}{headers['Location']}", headers={"Authorization": f"Bearer {api.token()}"}
    ) as response:
        assert response.status == 200
        record = await response.json()
    assert record["status"] == "accepted"
    assert record["identity_id"] == api.idm.identities["jane.doe"]
    assert record["request_id"] == request_id
    assert api.idm.calls[0].idempotency_key == request_id
