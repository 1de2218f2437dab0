"""The whole chain in one event loop: moto (session), stub IdM, three stub legacy systems, courier."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from service import daemon
from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import Settings, TargetSettings, WorkerSettings
from service.stubs import IdmStub, LegacyStub
from tests.conftest import DEMO_SECRETS

TARGETS = (("crm", "json"), ("billing", "soap"), ("directory", "json"))


def mailbox(index: int = 0, **overrides: Any) -> dict[str, Any]:
    return {
        "username": f"user{index:05d}",
        "display_name": f"User {index}",
        "plan": "standard",
        "contact_email": f"user{index}@example.com",
        **overrides,
    }


@dataclass
class Chain:
    """A running courier (API + worker) with its stubs and AWS resources."""

    url: str
    settings: Settings
    resources: Resources
    aws: AwsClients
    http: aiohttp.ClientSession
    idm: IdmStub
    targets: dict[str, LegacyStub]
    app: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, scopes: str = "mailbox:create mailbox:read") -> str:
        now = int(time.time())
        claims = {
            "iss": self.settings.auth.issuer,
            "aud": self.settings.auth.audience,
            "sub": "tester",
            "scope": scopes,
            "iat": now,
            "exp": now + 600,
        }
        return jwt.encode(claims, DEMO_SECRETS["courier.jwt.hs256"], algorithm="HS256")

    async def create(self, body: dict[str, Any]) -> str:
        headers = {"Authorization": f"Bearer {self.token()}"}
        async with self.http.post(
            f"{self.url}/v1/mailboxes", json=body, headers=headers
        ) as response:
            document = await response.json()
            assert response.status == 202, document
            return str(document["request_id"])

    async def status(self, request_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token()}"}
        async with self.http.get(
            f"{self.url}/v1/requests/{request_id}", headers=headers
        ) as response:
            assert response.status == 200
            document: dict[str, Any] = await response.json()
            return document

    async def wait_status(
        self, request_id: str, wanted: str, timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            document = await self.status(request_id)
            if document["status"] == wanted:
                return document
            assert time.monotonic() < deadline, f"{request_id} stuck at {document}"
            await asyncio.sleep(0.1)

    async def queue_depth(self, url: str | None = None) -> int:
        response = await self.aws.sqs.get_queue_attributes(
            QueueUrl=url or self.resources.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        attributes = response["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    async def dlq_messages(self) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for _ in range(5):
            response = await self.aws.sqs.receive_message(
                QueueUrl=self.resources.dlq_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=2,
                MessageAttributeNames=["All"],
            )
            for raw in response.get("Messages", []):
                found[raw["MessageId"]] = raw
            if not response.get("Messages"):
                break
        return list(found.values())


def chain_settings(
    settings: Settings, idm_url: str, target_urls: dict[str, str], **worker: Any
) -> Settings:
    targets = tuple(
        TargetSettings(
            name=name,
            url=f"{target_urls[name]}/api",
            format=fmt,
            timeout_seconds=1.0,
            retries=0,
            breaker_failures=3,
            breaker_cooldown_seconds=1.0,
        )
        for name, fmt in TARGETS
    )
    worker_settings = WorkerSettings(
        **{
            "wait_seconds": 1,
            "visibility_timeout_seconds": 5,
            "backoff_base_seconds": 0.5,
            "backoff_max_seconds": 2,
            "pollers": 2,
            **worker,
        }
    )
    return settings.replace(
        role="all",
        http=dataclasses.replace(settings.http, port=0, drain_seconds=3),
        idm=dataclasses.replace(settings.idm, url=idm_url, timeout_seconds=1, retries=1),
        targets=targets,
        worker=worker_settings,
    )


@contextlib.asynccontextmanager
async def running_chain(
    settings: Settings, resources: Resources, aws: AwsClients, **worker: Any
) -> AsyncIterator[Chain]:
    idm = IdmStub(api_key=DEMO_SECRETS["courier.idm.api_key"])
    stubs = {name: LegacyStub(name=name) for name, _ in TARGETS}
    async with contextlib.AsyncExitStack() as stack:
        idm_url = await stack.enter_async_context(idm.serving())
        urls = {
            name: await stack.enter_async_context(stub.serving()) for name, stub in stubs.items()
        }
        configured = chain_settings(settings, idm_url, urls, **worker)
        listening = await stack.enter_async_context(daemon.serving(configured))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Chain(listening.url, configured, resources, aws, http, idm, stubs, listening.app)
