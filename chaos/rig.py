"""The rig every scenario runs on: AWS stand-ins behind cuttable proxies, stubs, courier processes.

Everything here comes from the test kit (``courier_testkit``); this module only puts it
together. SQS is fauxqs, DynamoDB dynalite, KMS moto, each in its own process
(``courier_testkit.aws``), behind the strict counting proxy (``courier_testkit.proxy``: it
refuses what real AWS refuses and records every call per access key; ``COURIER_AWS_LENIENT=1``
turns the refusing off), and each reached by courier through a ``TcpProxy`` in front of that,
which the scenario can cut. The IdM and the three legacy systems are the kit's stubs in one
process (``courier_testkit.stubs``; the crm stub refuses bodies with ``REJECT_MARKER``).
courier runs as real processes (``python -m service --config <toml> run``) through
``courier_testkit.courier.courier_process``.

A scenario takes ``fresh()`` resources (a new queue pair and status table, so runs never see
each other's messages), builds settings with ``settings()`` and starts processes with
``courier()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from courier_testkit.aws import AwsStack, aws_stack, demo_secrets
from courier_testkit.courier import CourierProcess, courier_process
from courier_testkit.stubs import StubProcess, stub_process
from courier_testkit.tcpproxy import TcpProxy
from courier_testkit.tokens import mint_token
from service.bootstrap import Resources
from service.settings import (
    AwsSettings,
    Settings,
    TargetSettings,
    WorkerSettings,
    load_settings,
)

TARGETS = (("crm", "json"), ("billing", "soap"), ("directory", "json"))
# A username carrying this marker is refused (400) by the crm stub: poison of the "legacy 4xx" kind.
REJECT_MARKER = "zreject"
REJECTING_TARGET = "crm"


def chaos_stubs(idm_api_key: str) -> contextlib.AbstractAsyncContextManager[StubProcess]:
    """The IdM and the ``TARGETS`` stubs in one process; ``REJECTING_TARGET`` refuses the marker.

    Its ``reset()`` also puts every stub's knobs back to their defaults.
    """
    return stub_process(
        dict.fromkeys((name for name, _ in TARGETS), 0.0),
        idm_api_key=idm_api_key,
        reject={REJECTING_TARGET: REJECT_MARKER},
        restore_behaviour=True,
        name="chaos-stubs",
    )


@dataclass
class Rig:
    """What every scenario shares."""

    stack: AwsStack
    proxies: dict[str, TcpProxy]
    stubs: StubProcess
    secrets: dict[str, str]
    aws: AwsSettings  # through the cuttable proxies
    log_dir: str = ""
    started: list[CourierProcess] = field(default_factory=list)

    async def fresh(self, prefix: str) -> Resources:
        """New queues, status table and data key; queue URLs through the SQS proxy."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        made = await self.stack.bootstrap(name, self.secrets)
        sqs = self.proxies["sqs"].url
        urls = ("queue_url", "dlq_url", "fifo_queue_url", "fifo_dlq_url")
        return dataclasses.replace(
            made,
            **{u: sqs + "/" + getattr(made, u).split("://", 1)[1].split("/", 1)[1] for u in urls},
        )

    def settings(
        self,
        resources: Resources,
        role: str = "all",
        *,
        worker: Mapping[str, Any] | None = None,
        secrets: Mapping[str, Any] | None = None,
        http: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
    ) -> Settings:
        """courier settings for ``resources`` (defaults unless overridden), in ``role``."""
        base = load_settings(environ={})
        targets = tuple(
            TargetSettings(
                name=name, url=f"{self.stubs.urls[name]}/{name}", format=fmt, **(target or {})
            )
            for name, fmt in TARGETS
        )
        configured = base.replace(
            role=role,
            aws=self.aws,
            http=dataclasses.replace(base.http, **{"port": 0, "health_port": 0, **(http or {})}),
            log=dataclasses.replace(base.log, access_log=False),
            idm=dataclasses.replace(base.idm, url=self.stubs.urls["idm"]),
            worker=dataclasses.replace(WorkerSettings(), **(worker or {})),
            secrets=dataclasses.replace(base.secrets, **(secrets or {})),
            targets=targets,
        )
        return resources.apply_to(configured)

    @contextlib.asynccontextmanager
    async def courier(
        self,
        settings: Settings,
        name: str = "courier",
        *,
        wait_ready: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> AsyncIterator[CourierProcess]:
        # to_toml does not render the top-level ``instance``: it goes in the environment.
        env = {"COURIER_INSTANCE": str(settings.instance), **(env or {})}
        async with courier_process(
            settings,
            name=name,
            env=env,
            wait_ready=wait_ready,
            stop_timeout=settings.http.drain_seconds + 10,
        ) as process:
            self.started.append(process)
            yield process

    def token(self, subject: str = "chaos", lifetime: int = 3600) -> str:
        """A bearer token with both mailbox scopes, signed with this rig's HS256 secret."""
        return mint_token(
            self.secrets["courier.jwt.hs256"],
            subject=subject,
            lifetime_seconds=lifetime,
        )


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    """Start everything (about 3 s); stop everything on exit, also after a failure."""
    secrets = demo_secrets()
    async with contextlib.AsyncExitStack() as stack:
        aws, stubs = await asyncio.gather(
            stack.enter_async_context(aws_stack()),
            stack.enter_async_context(chaos_stubs(secrets["courier.idm.api_key"])),
        )
        strict = aws.settings  # the strict counting proxy's endpoints
        proxies = {
            "sqs": TcpProxy(strict.sqs_endpoint_url, "sqs"),
            "dynamodb": TcpProxy(strict.dynamodb_endpoint_url, "dynamodb"),
            "kms": TcpProxy(strict.kms_endpoint_url, "kms"),
        }
        for proxy in proxies.values():
            await proxy.start()
            stack.push_async_callback(proxy.close)
        through = dataclasses.replace(
            aws.direct,
            sqs_endpoint_url=proxies["sqs"].url,
            dynamodb_endpoint_url=proxies["dynamodb"].url,
            kms_endpoint_url=proxies["kms"].url,
            connect_timeout_seconds=1.0,
        )
        os.environ.setdefault("AWS_DEFAULT_REGION", through.region)
        yield Rig(aws, proxies, stubs, secrets, through)
