"""Queue depth and age of the oldest message, for the overview.

Depth comes from SQS (GetQueueAttributes: visible, in flight, delayed). SQS has no attribute
for the oldest message's age; it publishes it to CloudWatch as ``ApproximateAgeOfOldestMessage``
(one-minute periods, a few minutes late), read here with one GetMetricData for every queue.
Where CloudWatch has nothing (an emulator, or no IAM permission), a DLQ's age comes from the
console's last read of it, and a work queue's is shown as unknown: peeking at a work queue would
count as a receive towards its redrive and race the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("courier.console")

DEPTH_TTL_SECONDS = 5.0
AGE_TTL_SECONDS = 60.0
AGE_LOOKBACK_SECONDS = 15 * 60
DEPTH_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """One queue on the overview."""

    label: str
    url: str
    visible: int | None
    in_flight: int | None
    delayed: int | None
    oldest_age_seconds: float | None
    error: str = ""

    @property
    def name(self) -> str:
        """The queue's name (the last part of its URL)."""
        return self.url.rsplit("/", 1)[-1]


class QueueStats:
    """Depths (cached a few seconds) and oldest ages (cached a minute) of the named queues."""

    def __init__(self, sqs: Any, cloudwatch: Any | None, queues: Sequence[tuple[str, str]]) -> None:
        self._sqs = sqs
        self._cloudwatch = cloudwatch
        self.queues = [(label, url) for label, url in queues if url]
        self._depths: tuple[float, list[QueueDepth]] | None = None
        self._ages: tuple[float, dict[str, float]] = (0.0, {})
        self._refreshing = asyncio.Lock()

    async def read(self, fallback_ages: Mapping[str, float | None]) -> list[QueueDepth]:
        """Every queue's depth and oldest age (``fallback_ages`` by URL where CloudWatch has none)."""
        if (cached := self._cached()) is not None:
            return cached
        # Pages loaded together after the cache expired share one refresh.
        async with self._refreshing:
            if (cached := self._cached()) is not None:
                return cached
            # The CloudWatch ages alongside the depth calls, not before them.
            ages, depths = await asyncio.gather(
                self._oldest_ages(),
                asyncio.gather(*(self._depth(label, url) for label, url in self.queues)),
            )
            rows = [
                dataclasses.replace(depth, oldest_age_seconds=ages.get(url, fallback_ages.get(url)))
                for (_, url), depth in zip(self.queues, depths, strict=True)
            ]
            self._depths = (time.monotonic(), rows)
            return rows

    def _cached(self) -> list[QueueDepth] | None:
        if self._depths is None or time.monotonic() - self._depths[0] >= DEPTH_TTL_SECONDS:
            return None
        return self._depths[1]

    async def _depth(self, label: str, url: str) -> QueueDepth:
        """One queue's depth (its age is filled in by ``read``)."""
        try:
            response = await self._sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=list(DEPTH_ATTRIBUTES)
            )
        except Exception as exc:
            return QueueDepth(label, url, None, None, None, None, f"{type(exc).__name__}: {exc}")
        found = response.get("Attributes", {})
        visible, in_flight, delayed = (int(found.get(name, 0)) for name in DEPTH_ATTRIBUTES)
        return QueueDepth(label, url, visible, in_flight, delayed, None)

    async def _oldest_ages(self) -> dict[str, float]:
        checked, ages = self._ages
        if self._cloudwatch is None or time.monotonic() - checked < AGE_TTL_SECONDS:
            return ages
        try:
            ages = await self._cloudwatch_ages(self._cloudwatch)
        except Exception as exc:
            log.info(
                "oldest message ages unavailable from CloudWatch",
                extra={"fields": {"event": "console_cloudwatch_failed", "error": str(exc)[:200]}},
            )
            ages = {}
        self._ages = (time.monotonic(), ages)
        return ages

    async def _cloudwatch_ages(self, cloudwatch: Any) -> dict[str, float]:
        queries = [
            {
                "Id": f"q{index}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/SQS",
                        "MetricName": "ApproximateAgeOfOldestMessage",
                        "Dimensions": [{"Name": "QueueName", "Value": url.rsplit("/", 1)[-1]}],
                    },
                    "Period": 60,
                    "Stat": "Maximum",
                },
            }
            for index, (_, url) in enumerate(self.queues)
        ]
        end = datetime.datetime.now(datetime.UTC)
        response = await cloudwatch.get_metric_data(
            MetricDataQueries=queries,
            StartTime=end - datetime.timedelta(seconds=AGE_LOOKBACK_SECONDS),
            EndTime=end,
            ScanBy="TimestampDescending",
        )
        ages: dict[str, float] = {}
        for result in response.get("MetricDataResults", []):
            values = result.get("Values") or []
            if values:
                _, url = self.queues[int(str(result["Id"])[1:])]
                ages[url] = float(values[0])
        return ages
