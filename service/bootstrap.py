"""Create the AWS resources courier needs, on any endpoint: moto for tests and ``courier local``.

Idempotent: running it twice against the same endpoint reuses what exists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from .aws import AwsClients
from .secrets.credstash import CredStash
from .settings import QueueSettings, Settings


@dataclass(frozen=True, slots=True)
class ResourceNames:
    """Names of what ``bootstrap`` creates; a ``prefix`` keeps parallel test runs apart."""

    prefix: str = "courier"
    # Retries count as receives: with the worker's backoff (2 s doubling, capped at 15 min)
    # 20 receives ride out a few hours of target outage before redrive gives up.
    max_receive_count: int = 20
    retention_seconds: int = 4 * 86400
    visibility_timeout_seconds: int = 30
    secrets_table: str = "credential-store"

    @property
    def queue(self) -> str:
        return f"{self.prefix}-work"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}-dlq"

    @property
    def status_table(self) -> str:
        return f"{self.prefix}-status"


@dataclass(frozen=True, slots=True)
class Resources:
    """What ``bootstrap`` made: URLs, table names and key ARNs."""

    queue_url: str
    dlq_url: str
    fifo_queue_url: str
    fifo_dlq_url: str
    status_table: str
    secrets_table: str
    data_key_arn: str
    credstash_key_arn: str
    secrets: Mapping[str, str] = field(default_factory=dict)

    def apply_to(self, settings: Settings, *, fifo: bool = False) -> Settings:
        """``settings`` pointed at these resources."""
        from dataclasses import replace

        queue = (
            QueueSettings(url=self.fifo_queue_url, dlq_url=self.fifo_dlq_url)
            if fifo
            else QueueSettings(url=self.queue_url, dlq_url=self.dlq_url)
        )
        return settings.replace(
            queue=queue,
            status=replace(settings.status, table=self.status_table),
            secrets=replace(settings.secrets, table=self.secrets_table),
            envelope=replace(settings.envelope, kms_key_id=self.data_key_arn),
        )


async def bootstrap(
    clients: AwsClients, names: ResourceNames, secrets: Mapping[str, str] | None = None
) -> Resources:
    """Create queues (+DLQs, + FIFO pair), tables, KMS keys with aliases, and ``secrets``."""
    dlq_url = await ensure_queue(
        clients.sqs, names.dlq, {"MessageRetentionPeriod": str(14 * 86400)}
    )
    queue_url = await ensure_queue(
        clients.sqs, names.queue, await work_queue_attributes(clients.sqs, names, dlq_url)
    )
    fifo = {"FifoQueue": "true", "ContentBasedDeduplication": "true"}
    fifo_dlq_url = await ensure_queue(clients.sqs, f"{names.dlq}.fifo", fifo)
    fifo_queue_url = await ensure_queue(
        clients.sqs,
        f"{names.queue}.fifo",
        {**fifo, **await work_queue_attributes(clients.sqs, names, fifo_dlq_url)},
    )
    await ensure_table(
        clients.dynamodb, names.secrets_table, [("name", "HASH"), ("version", "RANGE")]
    )
    await ensure_table(
        clients.dynamodb, names.status_table, [("pk", "HASH")], ttl_attribute="expires_at"
    )
    data_key = await _kms_key(clients.kms, f"alias/{names.prefix}", "courier envelope data keys")
    credstash_key = await _kms_key(clients.kms, "alias/credstash", "CredStash secrets")
    store = CredStash(clients.dynamodb, clients.kms, names.secrets_table)
    for name, value in (secrets or {}).items():
        if await store.latest_version(name) is None:
            await store.put(name, value, kms_key=credstash_key)
    return Resources(
        queue_url=queue_url,
        dlq_url=dlq_url,
        fifo_queue_url=fifo_queue_url,
        fifo_dlq_url=fifo_dlq_url,
        status_table=names.status_table,
        secrets_table=names.secrets_table,
        data_key_arn=data_key,
        credstash_key_arn=credstash_key,
        secrets=dict(secrets or {}),
    )


async def work_queue_attributes(sqs: Any, names: ResourceNames, dlq_url: str) -> dict[str, str]:
    """Attributes of a work queue: redrive to ``dlq_url``, retention, visibility timeout."""
    attributes = await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    redrive = {
        "deadLetterTargetArn": attributes["Attributes"]["QueueArn"],
        "maxReceiveCount": names.max_receive_count,
    }
    return {
        "RedrivePolicy": json.dumps(redrive),
        "MessageRetentionPeriod": str(names.retention_seconds),
        "VisibilityTimeout": str(names.visibility_timeout_seconds),
    }


async def ensure_queue(sqs: Any, name: str, attributes: Mapping[str, str]) -> str:
    """The URL of queue ``name``, created with ``attributes`` unless it exists."""
    response = await sqs.create_queue(QueueName=name, Attributes=dict(attributes))
    return str(response["QueueUrl"])


async def ensure_table(
    dynamodb: Any, name: str, keys: list[tuple[str, str]], ttl_attribute: str | None = None
) -> None:
    """Create table ``name`` (string ``keys``, on demand, TTL on ``ttl_attribute``) unless it
    exists."""
    try:
        await dynamodb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": a, "KeyType": k} for a, k in keys],
            AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a, _ in keys],
            BillingMode="PAY_PER_REQUEST",
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
        return
    if ttl_attribute:
        await dynamodb.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attribute},
        )


async def _kms_key(kms: Any, alias: str, description: str) -> str:
    try:
        found = await kms.describe_key(KeyId=alias)
        return str(found["KeyMetadata"]["Arn"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NotFoundException":
            raise
    created = await kms.create_key(Description=description)
    arn = str(created["KeyMetadata"]["Arn"])
    await kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn
