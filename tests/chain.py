"""The whole chain in one event loop: moto (session), stub IdM, three stub legacy systems, courier."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from courier_testkit.courier import CourierProcess, courier_process
from courier_testkit.courier import courier_config as write_config
from courier_testkit.ports import free_port
from courier_testkit.processes import REPO
from courier_testkit.stubs import StubIdm, StubTarget
from courier_testkit.tokens import mint_token
from service import daemon
from service.aws import AwsClients
from service.bootstrap import Resources
from service.envelope import EnvelopeCipher
from service.operations import create_mailbox
from service.settings import Settings, TargetSettings, WorkerSettings
from service.state import POLLER
from service.status import now_iso
from service.stubs import IdmStub, LegacyStub
from service.worker.poller import Poller
from tests.conftest import DEMO_SECRETS

__all__ = ["REPO", "CourierProcess", "free_port", "write_config"]  # for the test modules

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

    @property
    def poller(self) -> Poller:
        """The running courier's SQS poller."""
        poller: Poller = self.app[POLLER]
        return poller

    def token(self, scopes: str = "mailbox:create mailbox:read") -> str:
        return mint_token(
            DEMO_SECRETS["courier.jwt.hs256"],
            self.settings.auth,
            scopes=scopes,
            lifetime_seconds=600,
        )

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
    settings: Settings,
    idm_url: str,
    target_urls: dict[str, str],
    *,
    target_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    drain_seconds: float = 3,
    **worker: Any,
) -> Settings:
    """Settings of a courier talking to the stubs; ``target_overrides``: name -> fields."""
    overrides = target_overrides or {}
    targets = tuple(
        TargetSettings(
            **{
                "name": name,
                "url": f"{target_urls[name]}/api",
                "format": fmt,
                "timeout_seconds": 1.0,
                "retries": 0,
                "breaker_failures": 3,
                "breaker_cooldown_seconds": 1.0,
                **overrides.get(name, {}),
            }
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
        http=dataclasses.replace(settings.http, port=0, drain_seconds=drain_seconds),
        idm=dataclasses.replace(settings.idm, url=idm_url, timeout_seconds=1, retries=1),
        targets=targets,
        worker=worker_settings,
    )


def worker_only_settings(
    settings: Settings, stubs: Mapping[str, LegacyStub], **chain: Any
) -> Settings:
    """``chain_settings`` for a ``role = worker`` courier delivering to ``stubs``; its IdM URL
    is a closed port, since the worker role never calls the IdM."""
    urls = {name: stub.url for name, stub in stubs.items()}
    return chain_settings(settings, "http://127.0.0.1:9", urls, **chain).replace(role="worker")


def legacy_stubs() -> dict[str, LegacyStub]:
    """One stub per target of ``TARGETS``."""
    return {name: StubTarget(name=name) for name, _ in TARGETS}


@contextlib.asynccontextmanager
async def serving_stubs(
    stubs: Mapping[str, LegacyStub] | None = None,
) -> AsyncIterator[dict[str, LegacyStub]]:
    """The legacy stubs of ``TARGETS`` (or ``stubs``) serving on free ports."""
    served = {**legacy_stubs(), **(stubs or {})}
    async with contextlib.AsyncExitStack() as stack:
        for stub in served.values():
            await stack.enter_async_context(stub.serving())
        yield served


@contextlib.asynccontextmanager
async def running_chain(
    settings: Settings,
    resources: Resources,
    aws: AwsClients,
    *,
    stubs: Mapping[str, LegacyStub] | None = None,
    target_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    drain_seconds: float = 3,
    **worker: Any,
) -> AsyncIterator[Chain]:
    """Stubs + courier (role all) in this loop; ``stubs`` replaces some of the legacy stubs."""
    idm = StubIdm(api_key=DEMO_SECRETS["courier.idm.api_key"])
    stubs = {**legacy_stubs(), **(stubs or {})}
    async with contextlib.AsyncExitStack() as stack:
        idm_url = await stack.enter_async_context(idm.serving())
        urls = {
            name: await stack.enter_async_context(stub.serving()) for name, stub in stubs.items()
        }
        configured = chain_settings(
            settings,
            idm_url,
            urls,
            target_overrides=target_overrides,
            drain_seconds=drain_seconds,
            **worker,
        )
        listening = await stack.enter_async_context(daemon.serving(configured))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Chain(listening.url, configured, resources, aws, http, idm, stubs, listening.app)


async def eventually(
    condition: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10,
    what: str = "",
    interval: float = 0.05,
) -> Any:
    """Wait until ``condition()`` is truthy (polling every ``interval`` s) and return that
    result, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(interval)


def event_payload(index: int = 0, **mailbox_overrides: Any) -> dict[str, Any]:
    """A valid create-mailbox event, as the API queues it (before sealing)."""
    return create_mailbox.event(
        mailbox(index, **mailbox_overrides), "idm-test", "tester", now_iso()
    )


async def plant(
    aws: AwsClients,
    queue_url: str,
    body: str,
    attributes: Mapping[str, str] | None = None,
    group_id: str | None = None,
) -> str:
    """Put ``body`` on a queue directly (no API); returns the MessageId."""
    extra: dict[str, Any] = {}
    if group_id is not None:
        extra = {"MessageGroupId": group_id, "MessageDeduplicationId": uuid.uuid4().hex}
    response = await aws.sqs.send_message(
        QueueUrl=queue_url,
        MessageBody=body,
        MessageAttributes={
            k: {"DataType": "String", "StringValue": v} for k, v in (attributes or {}).items()
        },
        **extra,
    )
    return str(response["MessageId"])


async def plant_request(
    aws: AwsClients, settings: Settings, index: int = 0, request_id: str | None = None
) -> str:
    """Seal a valid create-mailbox event and put it on the work queue; returns the request id."""
    request_id = request_id or uuid.uuid4().hex
    cipher = EnvelopeCipher(aws.kms, settings.envelope)
    body = await cipher.seal(create_mailbox.NAME, request_id, event_payload(index))
    attributes = {"op": create_mailbox.NAME, "request_id": request_id}
    await plant(aws, settings.queue.url, body, attributes)
    return request_id


@contextlib.asynccontextmanager
async def chain_courier(
    settings: Settings, directory: Path, *args: str
) -> AsyncIterator[CourierProcess]:
    """Run ``python -m service --config <file> run <args>`` with ``settings`` on free ports.

    The kit's runner, started without waiting for /readyz (``wait_ready()`` does) with this
    environment's AWS credentials; courier's output stays in ``directory`` and it is killed on
    exit if still running.
    """
    port, health_port = free_port(), free_port()
    configured = settings.replace(
        http=dataclasses.replace(settings.http, port=port, health_port=health_port)
    )
    async with courier_process(
        configured,
        name=f"courier-{port}",
        args=args,
        directory=directory,
        env={"PYTHONUNBUFFERED": "1"},
        wait_ready=False,
        stop_timeout=0,
        fake_aws=False,
    ) as running:
        yield running


async def run_cli(
    settings: Settings,
    directory: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, str]:
    """``python -m service --config <settings as TOML> <args>``: exit code and output.

    ``env``, when given, is the child's whole environment (else this process's)."""
    config = write_config(settings, directory, f"cli-{uuid.uuid4().hex[:8]}.toml")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--config",
        str(config),
        *args,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def receive_all(aws: AwsClients, url: str) -> list[dict[str, Any]]:
    """Every visible message of a queue, in receive order, with all attributes (left in
    flight for a minute, so one pass never sees a message twice)."""
    found: dict[str, dict[str, Any]] = {}
    while True:
        response = await aws.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=60,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        if not response.get("Messages"):
            return list(found.values())
        for raw in response["Messages"]:
            found[raw["MessageId"]] = raw
