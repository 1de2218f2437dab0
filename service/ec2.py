"""EC2 integration over IMDSv2: who we are (instance id, AZ) and whether Auto Scaling is ending us.

When the instance's target lifecycle state becomes ``Terminated`` (scale-in, instance
refresh), courier stops taking work, drains what it holds, and only then completes the
TERMINATING lifecycle action, so scale-in never cuts a delivery in half. Off EC2 the first
IMDS call fails within the short timeout and the integration stays off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from .errors import TransientError
from .settings import Ec2Settings

log = logging.getLogger("courier.ec2")

TOKEN_TTL_SECONDS = 21600
TERMINATING_STATES = frozenset({"Terminated", "Warmed:Terminated"})


class Imds:
    """A minimal IMDSv2 client: session token (PUT), then token-authenticated GETs."""

    def __init__(self, session: aiohttp.ClientSession, settings: Ec2Settings) -> None:
        self._session = session
        self._base = settings.imds_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=settings.imds_timeout_seconds)
        self._token = ""
        self._token_expires = 0.0

    async def get(self, path: str) -> str | None:
        """The metadata at ``path`` (e.g. ``meta-data/instance-id``); None when it does not exist."""
        headers = {"X-aws-ec2-metadata-token": await self._session_token()}
        try:
            async with self._session.get(
                f"{self._base}/latest/{path}", headers=headers, timeout=self._timeout
            ) as r:
                if r.status == 404:
                    return None
                r.raise_for_status()
                return await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"IMDS {path}: {type(exc).__name__}") from exc

    async def _session_token(self) -> str:
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
        try:
            async with self._session.put(
                f"{self._base}/latest/api/token", headers=headers, timeout=self._timeout
            ) as r:
                r.raise_for_status()
                self._token = await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"IMDS token: {type(exc).__name__}") from exc
        self._token_expires = time.monotonic() + TOKEN_TTL_SECONDS - 60
        return self._token


@dataclass(frozen=True, slots=True)
class Identity:
    """Where this process runs."""

    instance_id: str
    availability_zone: str
    asg_name: str


async def identify(imds: Imds, settings: Ec2Settings) -> Identity | None:
    """This instance's identity, or None when not on EC2 (or IMDS is unreachable)."""
    try:
        instance_id = await imds.get("meta-data/instance-id")
        zone = await imds.get("meta-data/placement/availability-zone")
        asg = settings.asg_name or await imds.get(
            "meta-data/tags/instance/aws:autoscaling:groupName"
        )
    except TransientError as exc:
        log.info(
            "not on EC2 (IMDS unreachable)",
            extra={"fields": {"event": "imds_unavailable", "error": str(exc)}},
        )
        return None
    if not instance_id:
        return None
    return Identity(instance_id, zone or "", asg or "")


class LifecycleWatcher:
    """Polls the target lifecycle state; on termination drains, then completes the hook."""

    def __init__(
        self,
        imds: Imds,
        autoscaling: object,
        identity: Identity,
        settings: Ec2Settings,
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        self._imds = imds
        self._autoscaling = autoscaling
        self._identity = identity
        self._settings = settings
        self._drain = drain

    async def run(self) -> None:
        """Return once the lifecycle action has been completed (or cannot be)."""
        while True:
            state = await self._state()
            if state in TERMINATING_STATES:
                break
            await asyncio.sleep(self._settings.lifecycle_poll_seconds)
        log.warning(
            "instance is terminating: draining before completing the lifecycle action",
            extra={"fields": {"event": "lifecycle_terminating", "state": state}},
        )
        await self._drain()
        await self._complete()

    async def _state(self) -> str | None:
        try:
            return await self._imds.get("meta-data/autoscaling/target-lifecycle-state")
        except TransientError:
            return None

    async def _complete(self) -> None:
        if not self._identity.asg_name:
            log.error(
                "cannot complete the lifecycle action: Auto Scaling group unknown (set ec2.asg_name)"
            )
            return
        try:
            await self._autoscaling.complete_lifecycle_action(  # type: ignore[attr-defined]
                LifecycleHookName=self._settings.lifecycle_hook,
                AutoScalingGroupName=self._identity.asg_name,
                LifecycleActionResult="CONTINUE",
                InstanceId=self._identity.instance_id,
            )
        except Exception as exc:  # the hook's heartbeat timeout then continues the termination
            log.error(
                "CompleteLifecycleAction failed",
                extra={"fields": {"event": "lifecycle_failed", "error": str(exc)}},
            )
            return
        log.info("lifecycle action completed", extra={"fields": {"event": "lifecycle_completed"}})
