"""EC2 integration against a stub IMDS (IMDSv2 tokens) and a stub Auto Scaling API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from service.aws import AwsClients
from service.bootstrap import Resources
from service.ec2 import Imds, identify
from service.net import bound_port
from service.settings import Ec2Settings, Settings
from tests.chain import mailbox, running_chain

COMPLETE_RESPONSE = (
    '<CompleteLifecycleActionResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
    "<CompleteLifecycleActionResult/><ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata>"
    "</CompleteLifecycleActionResponse>"
)


@dataclass
class FakeEc2:
    """IMDSv2 + the Auto Scaling API's CompleteLifecycleAction, on one aiohttp server."""

    lifecycle_state: str = "InService"
    token_requests: int = 0
    unauthorised: int = 0
    completed: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/{path:.*}", self._metadata)
        app.router.add_post("/", self._autoscaling)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        assert request.headers["X-aws-ec2-metadata-token-ttl-seconds"].isdigit()
        self.token_requests += 1
        return web.Response(text="token-123")

    async def _metadata(self, request: web.Request) -> web.Response:
        if request.headers.get("X-aws-ec2-metadata-token") != "token-123":
            self.unauthorised += 1
            return web.Response(status=401)
        values = {
            "instance-id": "i-0123456789abcdef0",
            "placement/availability-zone": "eu-west-1b",
            "tags/instance/aws:autoscaling:groupName": "courier-asg",
            "autoscaling/target-lifecycle-state": self.lifecycle_state,
        }
        path = request.match_info["path"]
        return web.Response(text=values[path]) if path in values else web.Response(status=404)

    async def _autoscaling(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.completed.append((time.monotonic(), {k: str(v) for k, v in form.items()}))
        return web.Response(text=COMPLETE_RESPONSE, content_type="text/xml")


@pytest.fixture
async def fake_ec2() -> AsyncIterator[tuple[FakeEc2, str]]:
    fake = FakeEc2()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = bound_port(site)
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_identity_over_imdsv2(fake_ec2: tuple[FakeEc2, str]) -> None:
    fake, url = fake_ec2
    async with aiohttp.ClientSession() as session:
        identity = await identify(Imds(session, Ec2Settings(imds_url=url)), Ec2Settings())
    assert identity is not None
    assert (identity.instance_id, identity.availability_zone, identity.asg_name) == (
        "i-0123456789abcdef0",
        "eu-west-1b",
        "courier-asg",
    )
    assert fake.token_requests == 1  # one token serves every call
    assert fake.unauthorised == 0


async def test_off_ec2_identify_gives_up_quickly() -> None:
    settings = Ec2Settings(imds_url="http://127.0.0.1:9", imds_timeout_seconds=0.2)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        assert await identify(Imds(session, settings), settings) is None
    # Generous for a loaded machine; what matters is no waiting on retries or long timeouts.
    assert time.monotonic() - started < 5


async def test_termination_drains_then_completes_the_lifecycle_action(
    settings: Settings, fresh: Resources, aws: AwsClients, fake_ec2: tuple[FakeEc2, str]
) -> None:
    fake, url = fake_ec2
    ec2 = Ec2Settings(
        enabled="on", imds_url=url, autoscaling_endpoint_url=url, lifecycle_poll_seconds=0.1
    )
    async with running_chain(settings.replace(ec2=ec2), fresh, aws) as chain:
        chain.targets["crm"].behaviour.latency_seconds = 0.8  # below the target timeout (1 s)
        request_id = await chain.create(mailbox(7))
        while not chain.targets["crm"].calls:
            await asyncio.sleep(0.02)
        fake.lifecycle_state = "Terminated"
        while not fake.completed:
            await asyncio.sleep(0.05)
        completed_at, action = fake.completed[0]
        crm_done = chain.targets["crm"].calls[0].at + 0.8
        record = await chain.status(request_id)
        async with chain.http.get(f"{chain.url}/readyz") as response:
            readyz = response.status
    assert action["Action"] == "CompleteLifecycleAction"
    assert action["LifecycleHookName"] == "courier-drain"
    assert action["AutoScalingGroupName"] == "courier-asg"
    assert action["InstanceId"] == "i-0123456789abcdef0"
    assert action["LifecycleActionResult"] == "CONTINUE"
    assert completed_at >= crm_done - 0.05  # only after the in-flight delivery finished
    assert record["status"] == "completed"
    assert readyz == 503
