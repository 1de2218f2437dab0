"""The worker end to end: API → SQS (moto) → worker → three stub legacy systems."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import Settings
from tests.chain import Chain, mailbox, running_chain


@pytest.fixture
async def chain(settings: Settings, fresh: Resources, aws: AwsClients) -> AsyncIterator[Chain]:
    async with running_chain(settings, fresh, aws) as running:
        yield running


async def test_happy_path_delivers_to_every_target_once(chain: Chain) -> None:
    request_id = await chain.create(mailbox(1))
    record = await chain.wait_status(request_id, "completed")
    assert record["targets"] == {
        "crm": "delivered",
        "billing": "delivered",
        "directory": "delivered",
    }
    for name, stub in chain.targets.items():
        assert stub.effects == {f"{request_id}:{name}": 1}, name
    soap = chain.targets["billing"].calls[0]
    assert soap.headers["Content-Type"].startswith("text/xml")
    assert b"<Username>user00001</Username>" in soap.body
    assert chain.targets["crm"].calls[0].headers["Content-Type"] == "application/json"
    assert await chain.queue_depth() == 0
