"""The fleet-wide cap per target (``service/worker/fleet.py``), on a real status table (moto).

Several memberships share one status table, each with its own DynamoDB client, as processes of
a fleet do. Their shares go to a ``Ledger`` standing in for the fleet's limiters: it checks the
sum of the shares against the cap at every change, the moment a share is applied, so a single
moment over the cap fails the test. A process that dies stops beating and, being dead, makes no
calls: its share leaves the ledger. An outage is a TCP proxy in front of moto that is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from courier_testkit.tcpproxy import tcp_proxy
from service.aws import AwsClients
from service.bootstrap import Resources
from service.dynamo import open_dynamodb
from service.settings import AwsSettings, Settings, TargetSettings
from service.state import TARGETS
from service.status import StatusStore
from service.worker.fleet import FLEET_KEY, ITEM_TTL_SECONDS, FleetMembership, shares
from tests.chain import eventually, mailbox, running_chain

pytestmark = pytest.mark.timeout(180)

# Generous against a busy machine (moto runs in this process and sometimes takes more than a
# beat to answer): a view is trusted for 2 s, so join wait and lease are 2 + 0.2 (the target's
# timeout) + 0.5 (the margin, one beat) = 2.7 s.
HEARTBEAT = 0.5
STALE_AFTER = 2.0
TIMEOUT = 0.2
CALL_TIMEOUT = 1.0
DEADLINE = 40.0
OUTAGE_STALE_AFTER = 4.0


class Ledger:
    """The shares every process applies, per target; fails the moment a sum passes its cap."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps
        self.shares: dict[str, dict[str, int]] = {name: {} for name in caps}
        self.peaks = dict.fromkeys(caps, 0)
        self.over: list[str] = []

    def set(self, target: str, member: str, share: int) -> None:
        self.shares[target][member] = share
        total = self.total(target)
        self.peaks[target] = max(self.peaks[target], total)
        if total > self.caps[target]:
            self.over.append(f"{target}: {self.shares[target]} > {self.caps[target]}")

    def total(self, target: str) -> int:
        return sum(self.shares[target].values())

    def gone(self, member: str) -> None:
        """A process died: it makes no more calls."""
        for target in self.caps:
            self.set(target, member, 0)


@dataclass
class FakeLimit:
    """Stands in for ``ConcurrencyLimit``: only ``set_cap``, reported to the ledger."""

    ledger: Ledger
    target: str
    member: str
    caps: list[int | None] = field(default_factory=list)

    def set_cap(self, cap: int | None) -> None:
        self.caps.append(cap)
        self.ledger.set(self.target, self.member, cap or 0)


@dataclass
class FakeTarget:
    settings: TargetSettings
    limiter: FakeLimit


def member(dynamodb: Any, table: str, ledger: Ledger, name: str, **kwargs: Any) -> FleetMembership:
    targets = [
        FakeTarget(
            TargetSettings(
                name=target, url="http://x", timeout_seconds=TIMEOUT, fleet_max_concurrency=cap
            ),
            FakeLimit(ledger, target, name),
        )
        for target, cap in ledger.caps.items()
    ]
    uncapped = FakeTarget(TargetSettings(name="free", url="http://x"), FakeLimit(ledger, "", name))
    return FleetMembership(
        dynamodb,
        table,
        [*targets, uncapped],
        member_id=name,
        **{
            "heartbeat_seconds": HEARTBEAT,
            "stale_after_seconds": STALE_AFTER,
            "call_timeout_seconds": CALL_TIMEOUT,
            **kwargs,
        },
    )


@contextlib.asynccontextmanager
async def running(*members: FleetMembership) -> AsyncIterator[None]:
    for one in members:
        one.start()
    try:
        yield
    finally:
        for one in members:
            await one.abandon()


def test_shares_sum_to_the_cap_and_only_fall_as_members_are_added() -> None:
    rng = random.Random(16)
    for _ in range(500):
        cap = rng.randint(0, 40)
        fleet = [f"i-{rng.getrandbits(32):08x}/{pid}" for pid in range(rng.randint(1, 12))]
        some = rng.sample(fleet, rng.randint(1, len(fleet)))
        whole, part = shares(cap, fleet, "crm"), shares(cap, some, "crm")
        assert sum(whole.values()) == cap == sum(part.values())
        assert max(whole.values()) - min(whole.values()) <= 1
        # The argument in fleet.py's docstring: a member of ``some`` gets no more in any view
        # that holds more members.
        assert all(whole[m] <= part[m] for m in some), (cap, fleet, some)


async def test_the_fleet_stays_within_the_cap_while_it_scales_out_and_loses_members(
    aws: AwsClients, fresh: Resources
) -> None:
    ledger = Ledger({"crm": 10})
    table = fresh.status_table
    a, b, c = (member(aws.dynamodb, table, ledger, name) for name in "abc")
    async with running(a, b, c):
        await eventually(lambda: ledger.total("crm") == 10, DEADLINE, "3 members sharing the cap")
        assert sorted(ledger.shares["crm"].values()) == [3, 3, 4]
        assert [one.live for one in (a, b, c)] == [["a", "b", "c"]] * 3

        d = member(aws.dynamodb, table, ledger, "d")
        async with running(d):  # scale out: d counts at once, takes its share later
            await eventually(lambda: ledger.shares["crm"].get("d", 0) > 0, DEADLINE, "d's share")
            await eventually(
                lambda: ledger.total("crm") == 10, DEADLINE, "4 members sharing the cap"
            )
            assert sorted(ledger.shares["crm"].values()) == [2, 2, 3, 3]

            await c.stop()  # scale in: c has drained, it leaves
            assert ledger.shares["crm"]["c"] == 0
            await eventually(lambda: ledger.total("crm") == 10, DEADLINE, "3 members after c left")
            assert sorted(ledger.shares["crm"].values()) == [0, 3, 3, 4]

            await b.abandon()  # b dies: no more beats, no more calls
            ledger.gone("b")
            await eventually(
                lambda: ledger.total("crm") == 10, DEADLINE, "a and d after b's lease ran out"
            )
            assert (ledger.shares["crm"]["a"], ledger.shares["crm"]["d"]) == (5, 5)
            assert a.live == ["a", "d"]
            # b, long gone, is removed from the item by whoever sees it first.
            await eventually(
                lambda: "b" not in a.members and "b" not in d.members, DEADLINE, "b removed"
            )
            item = await _item(aws, table)

    assert ledger.over == []
    assert ledger.peaks["crm"] == 10
    assert sorted(name for name in item if name.startswith("member#")) == ["member#a", "member#d"]
    assert abs(int(item["expires_at"]["N"]) - (time.time() + ITEM_TTL_SECONDS)) < 60
    # The uncapped target was never given a share.
    assert a.share("free") is None
    assert a.share("crm") == 5


async def test_a_cap_smaller_than_the_fleet_leaves_some_processes_at_zero(
    aws: AwsClients, fresh: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "courier.fleet")
    ledger = Ledger({"crm": 5, "tiny": 2})
    fleet = [member(aws.dynamodb, fresh.status_table, ledger, name) for name in "xyz"]
    async with running(*fleet):
        await eventually(
            lambda: ledger.total("crm") == 5 and ledger.total("tiny") == 2,
            DEADLINE,
            "shares of both caps",
        )
        assert sorted(ledger.shares["crm"].values()) == [1, 2, 2]
        assert sorted(ledger.shares["tiny"].values()) == [0, 1, 1]
        assert [one.share("tiny") for one in fleet].count(0) == 1
        (left_out,) = [one for one in fleet if one.share("tiny") == 0]
        await eventually(  # said once, though every beat deals it 0 again
            lambda: _events(caplog, "fleet_cap_below_members", left_out.member_id) == 1,
            DEADLINE,
            "the warning",
        )
        await left_out.beat()
        assert _events(caplog, "fleet_cap_below_members", left_out.member_id) == 1
    assert ledger.over == []


async def test_an_outage_keeps_the_shares_then_fences_the_process_that_cannot_renew(
    aws: AwsClients,
    aws_settings: AwsSettings,
    fresh: Resources,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "courier.fleet")
    ledger = Ledger({"crm": 6})
    table = fresh.status_table
    assert aws_settings.endpoint_url
    async with (
        tcp_proxy(aws_settings.endpoint_url) as proxy,
        open_dynamodb(aws_settings, proxy.url) as cut_off,  # the hot path's client, through it
    ):
        # Stale after 4 s: the blip below (a failed beat: 1 s of aiodynamo's retries, one more
        # beat, the beat after the restore) must stay well under it.
        a = member(aws.dynamodb, table, ledger, "a", stale_after_seconds=OUTAGE_STALE_AFTER)
        b = member(cut_off, table, ledger, "b", stale_after_seconds=OUTAGE_STALE_AFTER)
        async with running(a, b):
            await eventually(lambda: ledger.shares["crm"] == {"a": 3, "b": 3}, DEADLINE, "3 and 3")

            # A blip shorter than the staleness bound: nothing changes, one warning.
            failed = _events(caplog, "fleet_heartbeat_failed", "b")
            await eventually(
                lambda: _events(caplog, "fleet_heartbeat_recovered", "b") == failed,
                DEADLINE,
                "b up",
            )
            await proxy.cut()
            await eventually(
                lambda: _events(caplog, "fleet_heartbeat_failed", "b") > failed, DEADLINE, "warned"
            )
            await asyncio.sleep(1.2)  # more beats fail: still one warning
            assert _events(caplog, "fleet_heartbeat_failed", "b") == failed + 1
            assert ledger.shares["crm"] == {"a": 3, "b": 3}
            await proxy.restore()
            await eventually(
                lambda: _events(caplog, "fleet_heartbeat_recovered", "b") == failed + 1,
                DEADLINE,
                "recovered",
            )
            assert ledger.shares["crm"] == {"a": 3, "b": 3}

            # A longer one: b fences itself, a takes the whole cap once b's lease has run out.
            await proxy.cut()
            await eventually(
                lambda: ledger.shares["crm"]["a"] == 6, DEADLINE, "a with the whole cap"
            )
            assert ledger.shares["crm"]["b"] == 0  # b had fenced itself before
            assert _events(caplog, "fleet_share_fenced", "b") == 1
            # A process that never managed to join takes nothing.
            c = member(cut_off, table, ledger, "c", stale_after_seconds=OUTAGE_STALE_AFTER)
            async with running(c):
                await asyncio.sleep(OUTAGE_STALE_AFTER)
                assert ledger.shares["crm"]["c"] == 0
                await proxy.restore()
                await eventually(
                    lambda: ledger.shares["crm"].get("b") == 2 and ledger.shares["crm"]["c"] == 2,
                    DEADLINE,
                    "all three sharing again",
                )
                assert ledger.total("crm") == 6
    assert ledger.over == []
    assert _events(caplog, "fleet_heartbeat_failed", "c") >= 1  # c's first beats failed


async def test_the_fleet_item_is_no_status_record(aws: AwsClients, fresh: Resources) -> None:
    ledger = Ledger({"crm": 4})
    one = member(aws.dynamodb, fresh.status_table, ledger, "a")
    assert await one.beat()
    store = StatusStore(aws.dynamodb, fresh.status_table, ttl_days=1)
    # Status records are "req#<id>": no request id reaches the fleet's item.
    assert await store.get(FLEET_KEY) is None
    assert await store.get(FLEET_KEY.removeprefix("req#")) is None
    assert (await _item(aws, fresh.status_table))["pk"]["S"] == FLEET_KEY
    await one.stop()
    assert "member#a" not in await _item(aws, fresh.status_table)


async def test_a_lapsed_member_that_came_back_is_not_removed(
    aws: AwsClients, fresh: Resources
) -> None:
    ledger = Ledger({"crm": 4})
    table = fresh.status_table
    one = member(aws.dynamodb, table, ledger, "a")
    await _lease(aws, table, "z", time.time() - 10 * one.timing.lease)  # lapsed long ago
    assert await one.beat()
    assert "z" in one.members
    assert one.live == ["a"]
    # z comes back before a's next beat, which would remove it as seen lapsed: the removal is
    # conditional on the old lease, so z stays and counts.
    await _lease(aws, table, "z", time.time() + 60)
    assert await one.beat()
    assert one.live == ["a", "z"]
    # Lapsed again, and still so when a looks: removed.
    await _lease(aws, table, "z", time.time() - 10 * one.timing.lease)
    assert await one.beat()
    assert await one.beat()
    assert "member#z" not in await _item(aws, table)
    assert one.live == ["a"]


async def _lease(aws: AwsClients, table: str, name: str, until: float) -> None:
    await aws.dynamodb.update_item(
        TableName=table,
        Key={"pk": {"S": FLEET_KEY}},
        UpdateExpression="SET #m = :lease",
        ExpressionAttributeNames={"#m": f"member#{name}"},
        ExpressionAttributeValues={":lease": {"N": f"{until:.3f}"}},
    )


async def test_a_worker_with_a_capped_target_joins_the_fleet_and_leaves_it_when_stopped(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    overrides = {"crm": {"fleet_max_concurrency": 8}}
    async with running_chain(settings, fresh, aws, target_overrides=overrides) as chain:
        members = await _members_until_one(aws, fresh.status_table)
        limits = {client.name: client.limiter.limit for client in chain.app[TARGETS]}
        async with chain.http.get(f"{chain.url}/metrics") as response:
            text = await response.text()
    # Joining: counted by the fleet at once, calls to crm only once every member has seen it.
    assert len(members) == 1
    assert limits["crm"] == 0
    assert limits["billing"] > 0  # uncapped targets are left alone
    assert 'courier_target_fleet_share{target="crm"} 0.0' in text
    assert "courier_fleet_members 1.0" in text
    assert not [n for n in await _item(aws, fresh.status_table) if n.startswith("member#")]


async def test_a_worker_without_capped_targets_stays_out_of_the_fleet(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    async with running_chain(settings, fresh, aws) as chain:
        request_id = await chain.create(mailbox(16))
        await chain.wait_status(request_id, "completed", timeout=20)
    response = await aws.dynamodb.get_item(
        TableName=fresh.status_table, Key={"pk": {"S": FLEET_KEY}}, ConsistentRead=True
    )
    assert "Item" not in response


async def _members_until_one(aws: AwsClients, table: str) -> list[str]:
    deadline = time.monotonic() + DEADLINE
    while True:
        response = await aws.dynamodb.get_item(
            TableName=table, Key={"pk": {"S": FLEET_KEY}}, ConsistentRead=True
        )
        members = [n for n in response.get("Item", {}) if n.startswith("member#")]
        if members:
            return members
        assert time.monotonic() < deadline, "the worker never joined the fleet"
        await asyncio.sleep(0.05)


async def test_leaving_without_having_joined_writes_nothing(
    aws: AwsClients, fresh: Resources
) -> None:
    ledger = Ledger({"crm": 4})
    await member(aws.dynamodb, fresh.status_table, ledger, "a").stop()
    response = await aws.dynamodb.get_item(
        TableName=fresh.status_table, Key={"pk": {"S": FLEET_KEY}}, ConsistentRead=True
    )
    assert "Item" not in response  # UpdateItem would have created a bare item, without TTL
    assert ledger.shares["crm"] == {"a": 0}


async def _item(aws: AwsClients, table: str) -> dict[str, Any]:
    response = await aws.dynamodb.get_item(
        TableName=table, Key={"pk": {"S": FLEET_KEY}}, ConsistentRead=True
    )
    return dict(response["Item"])


def _events(caplog: pytest.LogCaptureFixture, event: str, member: str) -> int:
    fields = [getattr(record, "fields", {}) for record in caplog.records]
    return sum(1 for f in fields if f.get("event") == event and f.get("member") == member)
