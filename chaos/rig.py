"""The rig every scenario runs on: AWS stand-ins behind cuttable proxies, stubs, courier processes.

SQS is fauxqs, DynamoDB dynalite, KMS moto, each in its own process (``bench.harness``), behind
the strict counting proxy (``bench.proxy``: it refuses what real AWS refuses and records every
call per access key; ``COURIER_AWS_LENIENT=1`` turns the refusing off), and each reached by
courier through a ``TcpProxy`` in front of that, which the scenario can cut. The IdM and the three
legacy systems are ``chaos.stubs`` in one process. courier runs as real processes
(``python -m service --config <toml> run``) through ``bench.harness.courier_process``.

A scenario takes ``fresh()`` resources (a new queue pair and status table, so runs never see
each other's messages), builds settings with ``settings()`` and starts processes with
``courier()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from bench import harness
from chaos.tcpproxy import TcpProxy
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


@dataclass
class Stubs:
    """The chaos stub process: ``urls[name]``, behaviour changes and recorded effects."""

    urls: Mapping[str, str]
    process: harness.ManagedProcess

    async def _call(self, name: str, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.request(method, self.urls[name] + path, json=body) as response,
        ):
            return await response.json()

    async def behave(self, name: str, **changes: Any) -> None:
        await self._call(name, "POST", "/_stub/behaviour", changes)

    async def effects(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(name, "GET", "/_chaos/effects")
        return result

    async def reset(self) -> None:
        for name in self.urls:
            await self._call(name, "POST", "/_chaos/reset")
            await self.behave(
                name, latency_seconds=0.0, failure_rate=0.0, down=False, fixed_status=0
            )


@contextlib.asynccontextmanager
async def stub_process(idm_api_key: str) -> AsyncIterator[Stubs]:
    argv = [sys.executable, "-m", "chaos.stubs"]
    for name, _ in TARGETS:
        argv += ["--legacy", f"{name}={REJECT_MARKER}" if name == REJECTING_TARGET else name]
    env = harness.python_env({"CHAOS_IDM_API_KEY": idm_api_key})
    async with harness.managed(argv, name="chaos-stubs", env=env) as process:
        found = await process.wait_for_output(r"stubs listening (\{.*\})")
        urls = json.loads(found[1])
        for url in urls.values():
            await harness.wait_http(url + "/_stub/stats", process=process)
        yield Stubs(urls, process)


@dataclass
class Rig:
    """What every scenario shares."""

    stack: harness.AwsStack
    proxies: dict[str, TcpProxy]
    stubs: Stubs
    secrets: dict[str, str]
    aws: AwsSettings  # through the cuttable proxies
    log_dir: str = ""
    started: list[harness.CourierProcess] = field(default_factory=list)

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
    ) -> AsyncIterator[harness.CourierProcess]:
        # to_toml does not render the top-level ``instance``: it goes in the environment.
        env = {"COURIER_INSTANCE": str(settings.instance), **(env or {})}
        async with harness.courier_process(
            settings,
            name=name,
            env=env,
            wait_ready=wait_ready,
            stop_timeout=settings.http.drain_seconds + 10,
        ) as process:
            self.started.append(process)
            yield process

    def token(self, subject: str = "chaos", lifetime: int = 3600) -> str:
        now = int(time.time())
        base = load_settings(environ={}).auth
        claims = {
            "iss": base.issuer,
            "aud": base.audience,
            "sub": subject,
            "scope": "mailbox:create mailbox:read",
            "iat": now,
            "exp": now + lifetime,
        }
        return jwt.encode(claims, self.secrets["courier.jwt.hs256"], algorithm="HS256")


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    """Start everything (about 3 s); stop everything on exit, also after a failure."""
    secrets = harness.demo_secrets()
    async with contextlib.AsyncExitStack() as stack:
        aws, stubs = await asyncio.gather(
            stack.enter_async_context(harness.aws_stack()),
            stack.enter_async_context(stub_process(secrets["courier.idm.api_key"])),
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
