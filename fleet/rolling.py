"""The rolling replacement: an instance refresh of a two-instance fleet behind the ALB, on one
machine, under steady load.

Each "instance" is one ``role = all`` courier process on a port of its own (on EC2 an
instance runs ``courier@N`` per vCPU on one shared port; here one process stands for one
instance). HAProxy stands in for the ALB, configured from terraform/alb.tf's target group
(``courier_testkit.haproxy``); courier gets terraform's ``courier_role`` and
``drain_seconds``. AWS and the legacy systems are the chaos rig (``chaos.rig``: fauxqs,
dynalite and moto behind the strict proxy, the kit's stubs).

The refresh replaces the oldest instance first, one at a time, as Auto Scaling does with
``min_healthy_percentage`` 90 on two instances (its 120% maximum leaves no room for a third):

1. ``deregister`` -- the target is draining: HAProxy sends it nothing new; once no request is in
   flight there (at most the deregistration delay) it is out of service (HAProxy forgets it
   once it has stopped);
2. ``terminate`` -- the lifecycle hook and the shutdown: SIGTERM, courier's own drain (readyz
   503, polling stops, in-flight messages finished or released), exit;
3. ``launch`` -- a new courier process on a new port;
4. ``register`` -- added to HAProxy in the ``initial`` state; in service once it passed the
   healthy threshold of checks on /readyz.

Measured: every attempt's answer through HAProxy (goal: every one a 202), every accepted
request completed and delivered to every target (goal: 0 lost), and each step's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chaos import verify
from chaos.report import Row
from chaos.rig import TARGETS, Rig
from chaos.scenarios.common import Scenario, metric, run_id, summarize
from courier_testkit.courier import CourierProcess
from courier_testkit.haproxy import (
    BACKEND,
    FRONTEND,
    HAProxy,
    TargetGroup,
    haproxy,
    target_group_from_terraform,
)
from courier_testkit.hcl_expressions import Scope, evaluate_expression
from courier_testkit.iam_policy import load_module
from courier_testkit.ports import LOOPBACK, free_port
from fleet.load import SteadyLoad
from fleet.report import Outcome, Round
from service import daemon
from service.settings import Settings

LB_ERROR_COUNTERS = (f"{FRONTEND}.hrsp_5xx", f"{BACKEND}.econ", f"{BACKEND}.eresp")


@dataclass(frozen=True)
class Scale:
    """How long and how hard one run is."""

    name: str
    rate: float  # create requests per second through HAProxy
    warmup_seconds: float  # steady load before the first replacement
    between_rounds_seconds: float  # steady load after each replacement
    target_latency: float  # the legacy stubs' answer time: messages are in flight at SIGTERM
    rounds: int = 2  # instances replaced, one at a time
    instances: int = 2
    drain_timeout: float = 120.0  # for every accepted request to arrive after the load


QUICK = Scale("quick", rate=20, warmup_seconds=3, between_rounds_seconds=2, target_latency=0.05)
FULL = Scale(
    "full",
    rate=50,
    warmup_seconds=30,
    between_rounds_seconds=45,
    target_latency=0.2,
    drain_timeout=240,
)


@dataclass(frozen=True)
class Deployment:
    """What the Terraform deploys that the stand-in follows."""

    target_group: TargetGroup
    role: str  # var.courier_role
    drain_seconds: float  # var.drain_seconds: courier's drain bound

    @classmethod
    def from_terraform(cls, variables: Mapping[str, Any] | None = None) -> Deployment:
        """terraform/'s values (``variables`` over the declared defaults)."""
        module = load_module()
        scope = Scope(module.definitions, {}, variables or {})
        return cls(
            target_group_from_terraform(module, "api", variables),
            str(evaluate_expression("var.courier_role", scope)),
            float(evaluate_expression("var.drain_seconds", scope)),
        )

    def as_json(self) -> dict[str, Any]:
        """The values, for a report."""
        own = {"role": self.role, "drain_seconds": self.drain_seconds}
        return own | self.target_group.as_json()


@dataclass
class Instance:
    """One instance of the fleet: a courier process on a port of its own."""

    name: str  # also its HAProxy server name
    settings: Settings
    process: CourierProcess
    stack: contextlib.AsyncExitStack  # stops the process
    access_key: str  # its own, so the strict proxy's ledger tells its messages apart

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.settings.http.port}"


class RollingReplacement(Scenario):
    """The five chaos steps; the fault is the refresh, in ``rounds`` of four named steps."""

    deployment: Deployment
    settings: Settings
    lb: HAProxy
    stop_load: asyncio.Event
    instances: list[Instance]
    rounds: list[Round]
    counters: dict[str, int]
    served: dict[str, int]  # requests HAProxy sent to each server in service at the end
    states: dict[str, str]

    def __init__(self, rig: Rig, scale: Scale) -> None:
        super().__init__(rig, scale)  # type: ignore[arg-type]  # chaos's base keeps any scale
        self.scale: Scale = scale  # type: ignore[assignment]
        self.launched = 0  # instances started so far: i1, i2, ...

    async def setup(self) -> None:
        """Fresh queues and table, stubs, the fleet, then HAProxy in front of it."""
        rig, scale = self.rig, self.scale
        self.row = Row(f"rolling replacement x{scale.rounds}")
        self.deployment = Deployment.from_terraform()
        if self.deployment.role != "all":
            raise ValueError(f"courier_role {self.deployment.role!r}: the fleet runs role=all only")
        self.resources = await rig.fresh("fleet")
        await rig.stubs.reset()
        for name, _ in TARGETS:
            await rig.stubs.behave(name, latency_seconds=scale.target_latency)
        self.settings = rig.settings(
            self.resources,
            self.deployment.role,
            http={"drain_seconds": self.deployment.drain_seconds},
        )
        self.rounds, self.counters, self.served, self.states = [], {}, {}, {}
        await self.stack.enter_async_context(verify.message_ledger(rig))
        self.instances = list(
            await asyncio.gather(*(self.launch_instance() for _ in range(scale.instances)))
        )
        servers = {instance.name: instance.address for instance in self.instances}
        self.lb = await self.stack.enter_async_context(
            haproxy(self.deployment.target_group, servers, name="fleet-haproxy")
        )
        for name in servers:  # the fleet is in service before the refresh starts
            await self.lb.wait_healthy(name)

    async def load(self) -> None:
        """Steady load through HAProxy, then the warm-up."""
        self.stop_load = asyncio.Event()
        steady = SteadyLoad(self.lb.url, self.rig.token(), run=run_id(), rate=self.scale.rate)
        self.sending = asyncio.create_task(steady.run_until(self.stop_load))
        self.stack.callback(self.sending.cancel)  # done by then, unless a step failed
        await asyncio.sleep(self.scale.warmup_seconds)

    async def fault(self) -> None:
        """The refresh: each round replaces the oldest instance, then steady load again."""
        for number in range(1, self.scale.rounds + 1):
            self.rounds.append(await self.replace(number))
            await asyncio.sleep(self.scale.between_rounds_seconds)

    async def recover(self) -> None:
        """Stop the load; wait for every accepted request; read HAProxy's counters and the
        status of every request while everything still runs."""
        self.stop_load.set()
        await self.wait_delivered(self.scale.drain_timeout)
        self.counters = await self.lb.counters()
        self.served = {name: state.total for name, state in (await self.lb.servers()).items()}
        self.states = await verify.states_by_id(self.rig, self.resources)

    async def check(self) -> list[Row]:
        """The summary row (chaos's accounting plus the fleet's own invariants)."""
        row = self.row
        summarize(row, self.result, self.drained, dlq=self.dlq)
        row.base_invariants()
        outcome = self.outcome()
        failed = outcome.failed_attempts()
        row.check(sum(failed.values()) == 0, f"attempts that were not answered 202: {failed}")
        not_completed = sorted(i for i in self.ids if self.states.get(i) != "completed")
        row.check(not not_completed, f"{len(not_completed)} accepted requests not completed")
        row.check(len(self.rounds) == self.scale.rounds, f"{len(self.rounds)} rounds ran")
        # HAProxy's own count agrees: no 5xx to a client, no failed connection or answer
        # from a target (an attempt the client saw fail would show here too).
        seen = {name: self.counters.get(name, 0) for name in LB_ERROR_COUNTERS}
        row.check(not any(seen.values()), f"HAProxy counted errors: {seen}")
        idle = sorted(name for name, total in self.served.items() if total == 0)
        row.check(bool(self.served) and not idle, f"instances never in service: {idle}")
        stop_bound = daemon.stop_bound_seconds(self.settings)
        for done in self.rounds:
            done.check(row, stop_bound)
        row.recover_s = outcome.refresh_seconds
        row.seconds = time.monotonic() - self.started
        return [row]

    def outcome(self) -> Outcome:
        """Everything the report shows."""
        return Outcome(
            self.scale.name,
            self.row,
            self.rounds,
            self.result,
            self.deployment.as_json(),
            self.counters,
            self.served,
        )

    # -- one round ---------------------------------------------------------------------------

    async def replace(self, number: int) -> Round:
        """Deregister, terminate, launch, register: one instance replaced."""
        victim = self.instances.pop(0)  # termination policy OldestInstance
        done = Round(number, victim.name, started_at=time.monotonic())
        await self.deregister(victim, done)
        await self.terminate(victim, done)
        replacement = await self.launch(done)
        await self.register(replacement, done)
        self.instances.append(replacement)
        done.finished_at = time.monotonic()
        return done

    async def deregister(self, victim: Instance, done: Round) -> None:
        """The target group drains the target, then forgets it."""
        result = await self.lb.deregister(victim.name)
        done.deregister_s = result.seconds
        done.requests_in_flight_at_deregister = result.in_flight_at_start
        done.deregister_timed_out = result.timed_out

    async def terminate(self, victim: Instance, done: Round) -> None:
        """The lifecycle hook and the shutdown: SIGTERM and courier's own drain, until exit."""
        process = victim.process
        done.messages_in_flight_at_sigterm = await metric(process, "courier_messages_in_flight")
        term_at = time.monotonic()
        process.signal(signal.SIGTERM)
        limit = daemon.stop_bound_seconds(victim.settings) + 5
        with contextlib.suppress(TimeoutError):
            done.exit_code = await process.process.wait(limit)
        done.stop_s = time.monotonic() - term_at
        await victim.stack.aclose()  # SIGKILL if it did not exit
        await self.lb.remove(victim.name)
        stopped = verify.log_events(process.log(), "consumer_stopped")
        done.released_at_stop = int(stopped[0]["released"]) if stopped else None
        held = verify.holdings(await verify.message_events(self.rig), victim.access_key, term_at)
        done.messages_received = len(held.received)
        done.orphaned = sorted(held.orphaned)

    async def launch(self, done: Round) -> Instance:
        """A new instance: courier on a new port, up once it logs that it listens."""
        started = time.monotonic()
        replacement = await self.launch_instance(wait_ready=False)
        done.launch_s = time.monotonic() - started
        done.launched = replacement.name
        return replacement

    async def register(self, replacement: Instance, done: Round) -> None:
        """Registered with the target group; in service after the healthy threshold."""
        await self.lb.register(replacement.name, replacement.address)
        done.healthy_s = await self.lb.wait_healthy(replacement.name)

    # -- helpers -----------------------------------------------------------------------------

    async def launch_instance(self, *, wait_ready: bool = True) -> Instance:
        """Start one courier process (stopped with the scenario at the latest)."""
        self.launched += 1
        name = f"i{self.launched}"
        http = dataclasses.replace(self.settings.http, port=free_port())
        settings = self.settings.replace(http=http)
        access_key = f"fleet-{name}"
        stack = contextlib.AsyncExitStack()
        self.stack.push_async_callback(stack.aclose)
        process = await stack.enter_async_context(
            self.rig.courier(
                settings,
                f"fleet-{name}",
                wait_ready=wait_ready,
                env={"AWS_ACCESS_KEY_ID": access_key},
            )
        )
        return Instance(name, settings, process, stack, access_key)


async def run(rig: Rig, scale: Scale) -> Outcome:
    """One rolling replacement on ``rig``; the outcome, with its invariants checked."""
    scenario = RollingReplacement(rig, scale)
    await scenario.steps()
    return scenario.outcome()
