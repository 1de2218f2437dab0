"""The fleet-wide cap per target: each worker process takes its share of ``fleet_max_concurrency``.

A legacy system's owners may agree a number of concurrent calls for the whole fleet
(``targets[].fleet_max_concurrency``, 0 = no cap). The adaptive limit of each process
(``limiter.py``) then also stays under this process's *share* of that cap, set with
``limiter.set_cap``. The shares come from the number of live courier worker processes, and
keep the fleet within the cap while it scales out, scales in and loses processes.

Membership: one item of the status table, no new infrastructure, no new IAM action
---------------------------------------------------------------------------------------
The item's key is ``pk = "fleet#worker"``. Status records are ``"req#<request id>"``
(``service/status.py`` prefixes every id it reads or writes), so no request id can produce it.
Each member is one attribute of that item, ``"member#<member id>"``, whose value is the
member's lease: the wall-clock time (epoch seconds) until which it counts as live. Top-level
attributes rather than a map: setting a path inside a map that does not exist yet fails, so a
map would need a second call to create it; ``SET #me = :lease`` creates item and attribute at
once. Every ``heartbeat_seconds`` a member makes ONE UpdateItem (the role already has
``dynamodb:UpdateItem`` on the status table) that renews its lease and returns the whole item
(``ReturnValues=ALL_NEW``, strongly consistent): its *view* of the fleet. The same call renews
the item's ``expires_at`` (the table's TTL attribute), so the item vanishes a day after the
last worker stopped, and removes members whose lease ran out more than a lease ago (a process
that died); that removal is conditional on the lease still being the old one, so it never
removes a member that has just come back. A member leaving cleanly removes itself.

Item size grows by about 40 bytes per member, and each beat writes the whole item: 100
processes beating every 5 s cost about 80 write units a second on one key (4 KB items, 20
writes), well within the 1,000 a single key takes; the cost grows with the square of the
fleet, so past a few hundred processes this wants one item per group of processes. Only worker
processes with a capped target join.

Shares
------
The live members of a view (lease after now) are put in one order per target (a hash of
target and member id, so when the cap is smaller than the fleet the members left with 0 differ
from one target to the next), and the cap is dealt round-robin: the member at rank ``r`` of
``n`` gets ``ceil((cap - r) / n)``, that is ``cap // n`` plus one for the first ``cap % n``.
The shares of one view sum to the cap exactly; a share may be 0: the process then makes no
call to that target; a delivery waits up to 30 s for a share (``TargetClient.deliver``), then
its message goes back to the queue, where a process with a share can take it. Shares of 0
last only through a join wait, unless the cap is below the number of live workers: then some
processes have none for as long as the fleet keeps its size (``fleet_cap_below_members`` is
logged), their messages wait and bounce, and the cap should be raised or the fleet kept
smaller.

Why the fleet never exceeds the cap
-----------------------------------
``S`` (``stale_after``, 3 beats), ``W`` (``join_wait``) and ``L`` (``lease``) are durations; ``T``
is the longest timeout of the capped targets, and the margin is one beat (it covers clock
skew between instances and the drift of their clocks over ``L``, both milliseconds on EC2).

1. A process applies the shares of its *latest* view, at once, up or down, and only while
   that view is fresh: when ``S`` has passed since the beat that produced it was sent, it
   sets every capped share to 0 ("fenced") until a beat succeeds again.
2. A process takes a share above 0 only once ``W = S + T + margin`` has passed since it
   joined, i.e. since its first successful beat after being fenced (or started); until then
   it counts in everyone's view but takes 0.
3. A lease lasts ``L = S + T + margin`` past the beat that wrote it.

Freshness is measured from when a beat was *sent* and a join from when its answer came back,
both on the monotonic clock: each errs on the safe side of the instant DynamoDB applied it.

Take any instant t and the set A of processes whose share is above 0. Each p in A joined at
least W ago and has stayed unfenced since (2), so it has written a lease at least every S (1),
and each lease lasts ``T + margin`` beyond the time by which the next one is written (3): no
view taken since p joined lacks p. The view each q in A applies is less than S old (1), and
``W > S``, so it was taken after every member of A joined: it contains all of A, and maybe
more. Adding members to a view only pushes q's rank and n up, and ``ceil((cap - r) / n)`` only
falls when r or n grows, so q's share in its view is at most q's share in a view of exactly A.
Those sum to the cap.

The same argument holds for calls already open: a process that lowers its share keeps its
calls above the new share open until they end, within the target's timeout T. Shares fall when
a process joins (the others see it within a beat or two, or fence after S) or when a process
fences itself; the joiner waits ``W ≥ S + T``, and a fenced process's lease outlives its fencing
by ``T + margin``, so the others cannot take its share before its open calls have ended. A
process that dies stops calling (its open calls end within T on the target's side too), and the
others take its share only when its lease has run out. The only window left is a target that
keeps working on a call after courier's timeout gave up on it.

No delayed *increase* is needed beyond (2): a share rises only when a view has fewer members
than before, and every process whose share is above 0 is in every fresh view.

When the table cannot be reached
--------------------------------
The shares stay as they were (never raised) while the latest view is fresh, so a blip of up to
two missed beats changes nothing; a warning is logged once per outage. Past S the process
fences itself: its lease may run out in the others' views, and they would take its share. A
process that has never joined takes 0, not ``cap // expected fleet size``: every member that
did join already shares the whole cap among themselves, so anything taken by a process they do
not count is over the cap. Both cost little: the status records live in the same table, so a
worker that cannot reach it cannot complete messages either; they wait and are retried.

Limits: members must agree on the cap: during a rolling deploy that changes
``fleet_max_concurrency`` the old and the new values are both in force (lower a cap by
deploying it before the owners' new limit applies). A new process makes no call to a capped
target for its first W seconds (about 25 s with the defaults and a 5 s timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

from .. import metrics
from ..errors import error_name
from ..settings import TargetSettings
from ..status import FAILURES, TTL_ATTRIBUTE, condition_failed

log = logging.getLogger("courier.fleet")

FLEET_KEY = "fleet#worker"  # status records are "req#<request id>": never this
MEMBER_PREFIX = "member#"
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_BEATS = 3  # S: a view older than 3 beats is not trusted (two beats may fail)
ITEM_TTL_SECONDS = 86_400  # the item expires a day after the last beat of the last member
JITTER = 0.1  # beats spread by ±10 % so a fleet started at once does not beat in step


class CapSink(Protocol):
    """What takes a share: ``ConcurrencyLimit`` (``limiter.py``)."""

    def set_cap(self, cap: int | None) -> None:
        """Bound the limit by ``cap`` (None: no cap; 0: no calls)."""


class CappedTarget(Protocol):
    """A target client with its settings and its limiter (``targets.TargetClient``)."""

    @property
    def settings(self) -> TargetSettings: ...

    @property
    def limiter(self) -> CapSink: ...


def shares(cap: int, members: Iterable[str], target: str) -> dict[str, int]:
    """Each member's share of ``cap`` for ``target``: round-robin in the target's member order.

    The shares sum to ``cap``. Any member's share only falls when members are added, the
    property the module docstring's argument rests on.
    """
    ordered = sorted(set(members), key=lambda member: (_order(target, member), member))
    count = len(ordered)
    return {member: -(-(cap - rank) // count) for rank, member in enumerate(ordered)}


def _order(target: str, member: str) -> bytes:
    return hashlib.sha256(f"{target}\n{member}".encode()).digest()


def default_member_id() -> str:
    """``<host>/<pid>/<random>``: unique per process, and readable.

    The host name of an EC2 instance names it as well as its instance id does (which IMDS gives
    only later, in the background); the random part keeps a restarted process with a reused
    pid apart from its predecessor's lease.
    """
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Timing:
    """The durations of the module docstring's argument, in seconds."""

    heartbeat: float
    stale_after: float  # S
    join_wait: float  # W
    call_timeout: float  # one beat's UpdateItem, at most

    @property
    def lease(self) -> float:
        """L: a lease lasts as long as a joiner waits, S + T + margin (the argument's step 3)."""
        return self.join_wait

    @classmethod
    def for_timeout(
        cls,
        heartbeat: float,
        longest_timeout: float,
        stale_after: float | None = None,
        call_timeout: float | None = None,
    ) -> Timing:
        """The timing for ``heartbeat`` and the capped targets' longest call timeout."""
        stale = stale_after if stale_after is not None else STALE_AFTER_BEATS * heartbeat
        wait = stale + longest_timeout + heartbeat  # the margin is one beat
        # A beat slower than S is useless (its view is stale on arrival).
        call = min(call_timeout if call_timeout is not None else heartbeat, stale)
        return cls(heartbeat, stale_after=stale, join_wait=wait, call_timeout=call)


class FleetMembership:
    """This process's membership of the fleet, and the shares it applies to capped targets.

    ``start`` joins (beating in a task of its own); ``stop`` leaves. Call ``stop`` only once
    the worker has drained: the process must make no more calls once it no longer counts.
    Until the first share is granted every capped target's share is 0.
    """

    def __init__(
        self,
        dynamodb: Any,
        table: str,
        targets: Sequence[CappedTarget],
        *,
        member_id: str | None = None,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_after_seconds: float | None = None,
        call_timeout_seconds: float | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dynamodb = dynamodb
        self.table = table
        self.member_id = member_id or default_member_id()
        self._targets = [t for t in targets if t.settings.fleet_max_concurrency > 0]
        longest = max((t.settings.timeout_seconds for t in self._targets), default=0.0)
        self.timing = Timing.for_timeout(
            heartbeat_seconds, longest, stale_after_seconds, call_timeout_seconds
        )
        self._wall = wall
        self._clock = clock
        self._attribute = MEMBER_PREFIX + self.member_id
        self.members: dict[str, float] = {}  # the latest view: member id -> lease (epoch s)
        self._joined_at: float | None = None  # monotonic; None: not a member (or fenced)
        self._fence: asyncio.TimerHandle | None = None
        self._outage_since: float | None = None
        self._applied: dict[str, int] = {}
        self._without_share: set[str] = set()  # capped targets a granted view gave 0 (warned)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        for target in self._targets:
            self._apply(target, 0, reason="joining")

    @property
    def live(self) -> list[str]:
        """Members whose lease has not run out, in the latest view (sorted)."""
        now = self._wall()
        return sorted(member for member, lease in self.members.items() if lease > now)

    def share(self, target: str) -> int | None:
        """The share applied to ``target`` now; None when the target has no fleet cap."""
        return self._applied.get(target)

    def start(self) -> None:
        """Join, and beat every ``heartbeat_seconds`` until ``stop``."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="fleet-membership")

    async def stop(self) -> None:
        """Stop beating, take 0 on every capped target, and leave (remove this member)."""
        await self._cancel()
        self._fenced("leaving")
        try:
            await asyncio.wait_for(
                self._dynamodb.update_item(
                    TableName=self.table,
                    Key={"pk": {"S": FLEET_KEY}},
                    UpdateExpression="REMOVE #me",
                    # UpdateItem would otherwise create a bare item (no TTL) if there is none.
                    ConditionExpression="attribute_exists(#me)",
                    ExpressionAttributeNames={"#me": self._attribute},
                ),
                self.timing.call_timeout,
            )
        except FAILURES as exc:  # our lease runs out by itself
            if condition_failed(exc):
                return  # never joined, or already removed as lapsed
            log.warning(
                "could not leave the fleet: this process counts until its lease runs out",
                extra={"fields": {"event": "fleet_leave_failed", "error": error_name(exc)}},
            )
        finally:
            metrics.fleet_members.set(0)

    async def abandon(self) -> None:
        """Stop beating without leaving: what a process that dies does (tests)."""
        await self._cancel()

    async def _cancel(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._fence is not None:  # after the task: its last beat may have armed it again
            self._fence.cancel()
            self._fence = None

    async def _run(self) -> None:
        # Python 3.11's wait_for can swallow a cancellation that lands as the call it waits on
        # completes (fixed in 3.12): the flag ends the loop all the same.
        while not self._stopping:
            try:
                await self.beat()
            except Exception:  # a bug must not end the beats unseen: it would fence for good
                log.exception(
                    "fleet heartbeat failed unexpectedly",
                    extra={"fields": {"event": "fleet_heartbeat_error", "member": self.member_id}},
                )
            if not self._stopping:
                jitter = random.uniform(1 - JITTER, 1 + JITTER)
                await asyncio.sleep(self.timing.heartbeat * jitter)

    async def beat(self) -> bool:
        """One heartbeat: renew the lease, read the fleet, apply the shares. False on failure."""
        sent = self._clock()
        try:
            item = await asyncio.wait_for(self._renew(), self.timing.call_timeout)
        except FAILURES as exc:
            self._failed(exc)
            return False
        received = self._clock()
        if received - sent >= self.timing.stale_after:
            return False  # a view this old is not trusted (the fence may already have fallen)
        self._recovered()
        self.members = _members(item)
        if self._joined_at is None:
            self._joined_at = received
            log.info(
                "joined the fleet",
                extra={"fields": {"event": "fleet_joined", "member": self.member_id}},
            )
        self._arm_fence(sent)
        self._apply_view(received)
        return True

    async def _renew(self) -> Mapping[str, Any]:
        """The UpdateItem of a beat; the item as it is after it."""
        now = self._wall()
        lapsed = [
            MEMBER_PREFIX + member
            for member, lease in self.members.items()
            if lease < now - self.timing.lease and member != self.member_id
        ]
        try:
            return await self._update(now, lapsed)
        except ClientError as exc:
            if not lapsed or not condition_failed(exc):
                raise
            # A lapsed member has come back since our last view: leave it, renew only.
            return await self._update(now, [])

    async def _update(self, now: float, lapsed: Sequence[str]) -> Mapping[str, Any]:
        names = {"#me": self._attribute, "#ttl": TTL_ATTRIBUTE}
        values: dict[str, Any] = {
            ":lease": {"N": _number(now + self.timing.lease)},
            ":ttl": {"N": str(int(now) + ITEM_TTL_SECONDS)},
        }
        expression = "SET #me = :lease, #ttl = :ttl"
        params: dict[str, Any] = {}
        if lapsed:
            values[":cut"] = {"N": _number(now - self.timing.lease)}
            for index, attribute in enumerate(lapsed):
                names[f"#x{index}"] = attribute
            removed = [f"#x{index}" for index in range(len(lapsed))]
            expression += " REMOVE " + ", ".join(removed)
            params["ConditionExpression"] = " AND ".join(
                f"(attribute_not_exists({name}) OR {name} < :cut)" for name in removed
            )
        response = await self._dynamodb.update_item(
            TableName=self.table,
            Key={"pk": {"S": FLEET_KEY}},
            UpdateExpression=expression,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
            **params,
        )
        return dict(response.get("Attributes", {}))

    def _apply_view(self, received: float) -> None:
        live = self.live
        metrics.fleet_members.set(len(live))
        granted = self._joined_at is not None and (
            received - self._joined_at >= self.timing.join_wait
        )
        for target in self._targets:
            cap = target.settings.fleet_max_concurrency
            share = shares(cap, live, target.settings.name).get(self.member_id, 0)
            if granted:
                self._note_no_share(target, share, len(live))
            self._apply(target, share if granted else 0, reason="view", members=len(live))

    def _note_no_share(self, target: CappedTarget, share: int, members: int) -> None:
        """Warn once when a granted view leaves this process no share of ``target``.

        A cap below the fleet's size leaves some processes without a share for good: their
        messages for that target wait up to 30 s, then go back to the queue. Every share is 0
        while a process joins, so "once" is kept by target, not read from the last share.
        """
        name = target.settings.name
        if share > 0:
            self._without_share.discard(name)
            return
        if name in self._without_share:
            return
        self._without_share.add(name)
        log.warning(
            "target %s: fleet_max_concurrency %d is below the %d live workers; this one has"
            " no share",
            target.settings.name,
            target.settings.fleet_max_concurrency,
            members,
            extra={
                "fields": {
                    "event": "fleet_cap_below_members",
                    "member": self.member_id,
                    "target": target.settings.name,
                    "cap": target.settings.fleet_max_concurrency,
                    "members": members,
                }
            },
        )

    def _apply(self, target: CappedTarget, share: int, *, reason: str, members: int = 0) -> None:
        name = target.settings.name
        previous = self._applied.get(name)
        if previous == share:
            return
        self._applied[name] = share
        target.limiter.set_cap(share)
        metrics.fleet_share.labels(name).set(share)
        if previous is None:
            return
        log.info(
            "target %s fleet share %d -> %d",
            name,
            previous,
            share,
            extra={
                "fields": {
                    "event": "fleet_share_changed",
                    "target": name,
                    "share": share,
                    "previous": previous,
                    "cap": target.settings.fleet_max_concurrency,
                    "members": members,
                    "reason": reason,
                }
            },
        )

    def _arm_fence(self, sent: float) -> None:
        if self._fence is not None:
            self._fence.cancel()
        delay = max(0.0, sent + self.timing.stale_after - self._clock())
        self._fence = asyncio.get_running_loop().call_later(delay, self._fenced, "stale")

    def _fenced(self, reason: str) -> None:
        """Take 0 everywhere: our lease may lapse in the others' views (or we are leaving)."""
        self._fence = None
        if self._joined_at is not None and reason == "stale":
            log.warning(
                "fleet view is stale: no calls to capped targets until a heartbeat succeeds",
                extra={
                    "fields": {
                        "event": "fleet_share_fenced",
                        "member": self.member_id,
                        "stale_after_seconds": self.timing.stale_after,
                    }
                },
            )
        self._joined_at = None
        for target in self._targets:
            self._apply(target, 0, reason=reason)

    def _failed(self, exc: BaseException) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = self._clock()
        log.warning(
            "fleet heartbeat failed: keeping the current shares for now",
            extra={
                "fields": {
                    "event": "fleet_heartbeat_failed",
                    "member": self.member_id,
                    "error": error_name(exc),
                    "table": self.table,
                }
            },
        )

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        seconds = self._clock() - self._outage_since
        self._outage_since = None
        log.info(
            "fleet heartbeat recovered",
            extra={
                "fields": {
                    "event": "fleet_heartbeat_recovered",
                    "member": self.member_id,
                    "seconds": round(seconds, 3),
                }
            },
        )


def membership_for(
    dynamodb: Any, table: str, targets: Sequence[CappedTarget]
) -> FleetMembership | None:
    """A membership when some target has a fleet cap; None otherwise (nothing to share)."""
    if not any(target.settings.fleet_max_concurrency > 0 for target in targets):
        return None
    return FleetMembership(dynamodb, table, targets)


def _members(item: Mapping[str, Any]) -> dict[str, float]:
    members: dict[str, float] = {}
    for name, value in item.items():
        if name.startswith(MEMBER_PREFIX) and "N" in value:
            members[name.removeprefix(MEMBER_PREFIX)] = float(value["N"])
    return members


def _number(seconds: float) -> str:
    return f"{seconds:.3f}"
