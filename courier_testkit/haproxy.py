"""HAProxy (Debian's ``haproxy``, 2.6) as the stand-in for the ALB and its target group.

``haproxy(target_group, servers)`` writes a configuration from a ``TargetGroup`` (what
``aws_lb_target_group`` says: the health check's path, matcher, interval, timeout and
thresholds, and the deregistration delay), starts HAProxy on a free loopback port with its
runtime API on a unix socket, and yields an ``HAProxy`` handle; HAProxy is stopped on exit.
``target_group_from_terraform()`` reads those values from terraform/ (alb.tf), so the stand-in
follows the Terraform.

How the ALB's behaviour maps onto HAProxy:

=============================  ==============================================================
ALB / target group             HAProxy
=============================  ==============================================================
health check path, matcher     ``option httpchk`` + ``http-check send`` / ``expect``
interval, timeout              ``inter`` on every server, ``timeout check``
healthy / unhealthy threshold  ``rise`` / ``fall``
register a target              ``add server`` over the runtime API, health forced down first
                               (the ALB's ``initial`` state: no traffic before ``rise`` checks)
deregister (draining)          ``set server ... state drain``: no new requests; wait until no
                               request is in flight there, at most the deregistration delay
                               (then its connections are cut), ``maint``; ``del server`` once
                               the target has stopped
no retry of a failed request   ``retries 0``: a refused or reset connection to a target is a
                               502/503 to the client, as the ALB answers it
=============================  ==============================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .hcl_expressions import Scope, evaluate_value
from .iam_policy import TerraformModule, load_module
from .ports import LOOPBACK, free_port
from .processes import START_TIMEOUT_SECONDS, HarnessError, ManagedProcess
from .sampling import ProcessSampler

__all__ = [
    "BACKEND",
    "Deregistration",
    "HAProxy",
    "HealthCheck",
    "ServerState",
    "TargetGroup",
    "haproxy",
    "haproxy_binary",
    "render_config",
    "status_rule",
    "target_group_from_terraform",
]

BACKEND = "targets"
FRONTEND = "alb"
POLL_SECONDS = 0.05
DEFAULT_WEIGHT = 1  # every target alike, as the ALB's round robin
# The ALB's own timeouts towards targets: 10 s to connect, 60 s idle (its default).
CONNECT_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 60.0
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])

ServerAdminState = Literal["ready", "drain", "maint"]


@dataclass(frozen=True)
class HealthCheck:
    """A target group's ``health_check`` block; the defaults are AWS's for an HTTP group."""

    path: str = "/"
    matcher: str = "200"
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    healthy_threshold: int = 5
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class TargetGroup:
    """What HAProxy needs of an ``aws_lb_target_group``; defaults are AWS's."""

    health_check: HealthCheck = HealthCheck()
    deregistration_delay_seconds: float = 300.0

    def as_json(self) -> dict[str, Any]:
        """The values, for a report."""
        return {
            "deregistration_delay_seconds": self.deregistration_delay_seconds,
            **{f"health_check_{k}": v for k, v in vars(self.health_check).items()},
        }


def target_group_from_terraform(
    module: TerraformModule | None = None,
    name: str = "api",
    variables: Mapping[str, Any] | None = None,
) -> TargetGroup:
    """``aws_lb_target_group.<name>`` of ``module`` (default: terraform/ parsed by
    ``iam_policy.load_module``), its expressions evaluated (``variables`` or the declared
    defaults). Raises ``ValueError`` for a health check HAProxy here would not reproduce."""
    module = module if module is not None else load_module()
    body = module.resources.get(("aws_lb_target_group", name))
    if body is None:
        raise ValueError(f'resource "aws_lb_target_group" "{name}" is missing')
    scope = Scope(module.definitions, {}, variables or {})
    blocks = body.get("health_check", [{}])
    if len(blocks) != 1:
        raise ValueError(f"aws_lb_target_group.{name}: expected one health_check block")
    check = {key: evaluate_value(value, scope) for key, value in blocks[0].items()}
    _refuse_unmodelled(name, check)
    defaults = HealthCheck()
    health = HealthCheck(
        path=str(check.get("path", defaults.path)),
        matcher=str(check.get("matcher", defaults.matcher)),
        interval_seconds=float(check.get("interval", defaults.interval_seconds)),
        timeout_seconds=float(check.get("timeout", defaults.timeout_seconds)),
        healthy_threshold=int(check.get("healthy_threshold", defaults.healthy_threshold)),
        unhealthy_threshold=int(check.get("unhealthy_threshold", defaults.unhealthy_threshold)),
    )
    delay = evaluate_value(body.get("deregistration_delay", 300), scope)
    return TargetGroup(health, float(delay))


def _refuse_unmodelled(name: str, check: Mapping[str, Any]) -> None:
    """Checks on another port or protocol, or turned off, are not what the stand-in does."""
    if check.get("enabled", True) is not True:
        raise ValueError(f"aws_lb_target_group.{name}: health checks are disabled")
    if check.get("port", "traffic-port") != "traffic-port":
        raise ValueError(f"aws_lb_target_group.{name}: health check on another port")
    if str(check.get("protocol", "HTTP")).upper() != "HTTP":
        raise ValueError(f"aws_lb_target_group.{name}: health check protocol is not HTTP")


def status_rule(matcher: str) -> str:
    """The ``http-check expect`` rule for an ALB matcher: ``"200"``, ``"200,202"``,
    ``"200-299"``."""
    codes: list[int] = []
    for part in matcher.split(","):
        low, _, high = part.strip().partition("-")
        codes.extend(range(int(low), int(high or low) + 1))
    if not codes or not all(200 <= code <= 499 for code in codes):
        raise ValueError(f"matcher {matcher!r}: the ALB allows codes 200 to 499")
    if len(codes) == 1:
        return f"status {codes[0]}"
    return "rstatus ^(" + "|".join(str(code) for code in codes) + ")$"


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def server_options(target_group: TargetGroup) -> str:
    """A server line's health-check options (dynamic servers get no ``default-server``)."""
    check = target_group.health_check
    return (
        f"check inter {_ms(check.interval_seconds)}"
        f" rise {check.healthy_threshold} fall {check.unhealthy_threshold}"
    )


def render_config(
    target_group: TargetGroup, port: int, admin_socket: Path, servers: Mapping[str, str]
) -> str:
    """HAProxy's configuration: one HTTP frontend on ``port``, one backend with ``servers``
    (name -> ``host:port``, in service from the start), the runtime API on ``admin_socket``."""
    check = target_group.health_check
    lines = [
        "global",
        f"    stats socket {admin_socket} mode 600 level admin",
        "    stats timeout 30s",
        "    nbthread 1",
        "    log stderr format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        # The ALB does not retry a request that failed at a target: neither does this.
        "    retries 0",
        f"    timeout connect {_ms(CONNECT_TIMEOUT_SECONDS)}",
        f"    timeout client {_ms(IDLE_TIMEOUT_SECONDS)}",
        f"    timeout server {_ms(IDLE_TIMEOUT_SECONDS)}",
        f"    timeout http-keep-alive {_ms(IDLE_TIMEOUT_SECONDS)}",
        f"    timeout check {_ms(check.timeout_seconds)}",
        "",
        f"frontend {FRONTEND}",
        f"    bind {LOOPBACK}:{port}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        "    balance roundrobin",
        "    option httpchk",
        f"    http-check send meth GET uri {check.path} ver HTTP/1.1 hdr Host {LOOPBACK}",
        f"    http-check expect {status_rule(check.matcher)}",
    ]
    lines += [f"    server {n} {a} {server_options(target_group)}" for n, a in servers.items()]
    return "\n".join(lines) + "\n"


def haproxy_binary() -> str | None:
    """The ``haproxy`` executable (also looked for in the sbin directories), or None."""
    return shutil.which("haproxy", path=SEARCH_PATH)


@dataclass(frozen=True)
class ServerState:
    """One server as ``show stat`` reports it."""

    name: str
    address: str
    status: str  # UP, DOWN, DRAIN, MAINT, or a transition such as "UP 1/3", "DOWN 1/2"
    sessions: int  # requests (streams) being served there now
    queued: int
    total: int  # requests sent there so far
    check: str  # the last check's result (L7OK, L7STS, L4CON, ...)

    @property
    def up(self) -> bool:
        """UP, or UP and going down: it gets new requests."""
        return self.status.split(" ")[0] == "UP"


@dataclass(frozen=True)
class Deregistration:
    """How deregistering one target went."""

    seconds: float  # drain state until nothing was in flight there (or the delay ran out)
    in_flight_at_start: int
    timed_out: bool  # the delay ran out with requests still in flight (they were cut)


@dataclass(frozen=True)
class HAProxy(ProcessSampler):
    """A running HAProxy: its URL, target group, runtime API and process."""

    url: str
    target_group: TargetGroup
    admin_socket: Path
    config_path: Path
    process: ManagedProcess

    async def command(self, line: str, timeout: float = 10.0) -> str:  # noqa: ASYNC109
        """One runtime API command; its whole answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.admin_socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return answer.decode(errors="replace")

    async def _admin(self, line: str, *accepted: str) -> None:
        """A command that answers nothing (or one of ``accepted``) when it worked."""
        answer = (await self.command(line)).strip()
        if answer and answer not in accepted:
            raise HarnessError(f"haproxy {line!r}: {answer}")

    async def stats(self) -> list[dict[str, str]]:
        """``show stat``: one row per frontend, backend and server."""
        text = (await self.command("show stat")).removeprefix("# ")
        return list(csv.DictReader(line for line in text.splitlines() if line))

    async def servers(self) -> dict[str, ServerState]:
        """The backend's servers by name."""
        found = {}
        for row in await self.stats():
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND"):
                found[row["svname"]] = ServerState(
                    name=row["svname"],
                    address=row.get("addr", ""),
                    status=row["status"],
                    sessions=int(row["scur"] or 0),
                    queued=int(row["qcur"] or 0),
                    total=int(row["stot"] or 0),
                    check=row.get("check_status", ""),
                )
        return found

    async def counters(self) -> dict[str, int]:
        """What HAProxy itself counted: answers to clients by class, errors towards targets."""
        wanted = {
            FRONTEND: ("hrsp_2xx", "hrsp_4xx", "hrsp_5xx", "ereq"),
            BACKEND: ("econ", "eresp", "wretr", "wredis"),
        }
        counts: dict[str, int] = {}
        for row in await self.stats():
            if row["svname"] in ("FRONTEND", "BACKEND") and row["pxname"] in wanted:
                for field in wanted[row["pxname"]]:
                    counts[f"{row['pxname']}.{field}"] = int(row.get(field) or 0)
        return counts

    async def server(self, name: str) -> ServerState:
        """One server; ``HarnessError`` when there is none of that name."""
        found = (await self.servers()).get(name)
        if found is None:
            raise HarnessError(f"haproxy has no server {name!r}")
        return found

    async def set_state(self, name: str, state: ServerAdminState) -> None:
        """``set server <backend>/<name> state ready|drain|maint``."""
        await self._admin(f"set server {BACKEND}/{name} state {state}")

    async def register(self, name: str, address: str) -> None:
        """Add a server as a newly registered target: it gets requests only once it passed
        ``healthy_threshold`` checks in a row (the ALB's ``initial`` state).

        HAProxy takes a server leaving maintenance for UP before any check, so it is added with
        weight 0 (round robin never picks it), forced DOWN, and only then weighted.
        """
        server = f"{BACKEND}/{name}"
        options = server_options(self.target_group)
        await self._admin(
            f"add server {server} {address} {options} weight 0", "New server registered."
        )
        await self._admin(f"enable health {server}")
        await self.set_state(name, "ready")
        await self._admin(f"set server {server} health down")
        await self._admin(f"set server {server} weight {DEFAULT_WEIGHT}")

    async def wait_healthy(self, name: str, timeout: float | None = None) -> float:  # noqa: ASYNC109
        """Seconds until ``name`` is UP; ``HarnessError`` after ``timeout`` (default: the
        checks ``healthy_threshold`` + 2 intervals take, plus their timeout)."""
        check = self.target_group.health_check
        limit = (
            timeout
            or check.interval_seconds * (check.healthy_threshold + 2) + check.timeout_seconds
        )
        started = time.monotonic()
        while True:
            state = await self.server(name)
            if state.status == "UP":
                return time.monotonic() - started
            if time.monotonic() - started > limit:
                raise HarnessError(f"haproxy server {name} not UP after {limit:g}s: {state}")
            await asyncio.sleep(POLL_SECONDS)

    async def deregister(self, name: str) -> Deregistration:
        """Deregister a target as the ALB does: draining (no new requests) until nothing is in
        flight there or the deregistration delay has passed (then what is left is cut), then
        out of service for good (``maint``). ``remove`` forgets it."""
        started = time.monotonic()
        await self.set_state(name, "drain")
        first = await self.server(name)
        state = first
        deadline = started + self.target_group.deregistration_delay_seconds
        while (state.sessions or state.queued) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            state = await self.server(name)
        drained = time.monotonic() - started
        timed_out = bool(state.sessions or state.queued)
        await self.set_state(name, "maint")
        if timed_out:
            await self._admin(f"shutdown sessions server {BACKEND}/{name}")
        return Deregistration(drained, first.sessions + first.queued, timed_out)

    async def remove(self, name: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """``del server`` of a deregistered server; HAProxy refuses while it still holds an
        idle connection to it (closed when the target stops), so this retries until
        ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            answer = (await self.command(f"del server {BACKEND}/{name}")).strip()
            if answer == "Server deleted.":
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"haproxy could not delete server {name}: {answer}")
            await asyncio.sleep(POLL_SECONDS)

    async def wait_started(self, timeout: float = START_TIMEOUT_SECONDS) -> None:  # noqa: ASYNC109
        """Until the runtime API answers (HAProxy has bound its frontend by then)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.alive():
                raise self.process.describe_failure("exited while starting")
            with contextlib.suppress(OSError):
                await self.command("show info")
                return
            if time.monotonic() > deadline:
                raise self.process.describe_failure(f"did not start within {timeout:g}s")
            await asyncio.sleep(POLL_SECONDS)


@contextlib.asynccontextmanager
async def haproxy(
    target_group: TargetGroup,
    servers: Mapping[str, str] | None = None,
    *,
    port: int = 0,
    directory: Path | None = None,
    name: str = "haproxy",
) -> AsyncIterator[HAProxy]:
    """HAProxy in front of ``servers`` (name -> ``host:port``, in service from the start),
    configured as ``target_group``; ``port`` 0 picks a free one. Stopped on exit.

    ``directory`` keeps the configuration, the admin socket and the log (HAProxy's stderr:
    one line per request).
    """
    binary = haproxy_binary()
    if binary is None:
        raise HarnessError("haproxy is not installed (Debian: apt-get install haproxy)")
    with contextlib.ExitStack() as cleanup:
        if directory is None:  # removed afterwards; a directory given is the caller's to keep
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"{name}-")))
        async with _running(
            binary,
            target_group,
            servers=servers or {},
            port=port,
            directory=directory,
            name=name,
        ) as handle:
            yield handle


@contextlib.asynccontextmanager
async def _running(
    binary: str,
    target_group: TargetGroup,
    *,
    servers: Mapping[str, str],
    port: int,
    directory: Path,
    name: str,
) -> AsyncIterator[HAProxy]:
    port = port or free_port()
    admin_socket = directory / "admin.sock"
    config_path = directory / "haproxy.cfg"
    config_path.write_text(render_config(target_group, port, admin_socket, servers))
    process = ManagedProcess(
        [binary, "-db", "-f", str(config_path)], name=name, directory=directory
    )
    try:
        handle = HAProxy(
            f"http://{LOOPBACK}:{port}", target_group, admin_socket, config_path, process
        )
        await handle.wait_started()
        yield handle
    finally:
        await process.stop()
