"""SQS producer: puts sealed events on the work queue, coalescing concurrent sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .batching import BatchEntryError, Batcher
from .errors import Decision, PermanentError, TransientError, classify, classify_code


class SendError(TransientError):
    """SQS did not take the message; nothing was queued, and a later try may succeed.

    ``decision`` is RETRY (outage, throttling) or MISCONFIGURED (IAM, no such queue): the API
    answers 503 either way (``service/errors.py``).
    """


def is_fifo(queue_url: str) -> bool:
    """FIFO queue names end in ``.fifo``."""
    return queue_url.endswith(".fifo")


def string_attributes(values: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """SQS MessageAttributes for plain string values (empty ones dropped: SQS refuses them)."""
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items() if v}


class Producer:
    """Sends messages to one queue; with ``batching`` concurrent sends share SendMessageBatch."""

    def __init__(
        self, sqs: Any, queue_url: str, *, batching: bool = True, linger_seconds: float = 0.002
    ) -> None:
        self._sqs = sqs
        self.queue_url = queue_url
        self.fifo = is_fifo(queue_url)
        self._batcher = Batcher("send", self._send_batch, linger_seconds) if batching else None

    async def send(
        self,
        body: str,
        attributes: Mapping[str, str],
        *,
        group_id: str | None = None,
        deduplication_id: str | None = None,
    ) -> str:
        """Queue one message; returns its MessageId once SQS has it, else raises SendError."""
        entry: dict[str, Any] = {
            "MessageBody": body,
            "MessageAttributes": string_attributes(attributes),
        }
        if self.fifo:
            entry["MessageGroupId"] = group_id or "default"
            if deduplication_id:
                entry["MessageDeduplicationId"] = deduplication_id
        try:
            if self._batcher is not None:
                result = await self._batcher.submit(entry)
            else:
                result = await self._sqs.send_message(QueueUrl=self.queue_url, **entry)
        except BatchEntryError as exc:
            # An entry's code the table does not name goes by SQS's own SenderFault flag.
            decision = classify_code("sqs", exc.code, 400 if exc.sender_fault else 500)
            raise _send_error(f"SQS did not take the message: {exc}", decision) from exc
        except (ClientError, BotoCoreError, OSError) as exc:
            # The error code, not AWS's text: that names the account and queue, and 503s are logged.
            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else ""
            detail = f"SQS did not take the message: {code or type(exc).__name__}"
            raise _send_error(detail, classify(exc, "sqs")) from exc
        return str(result["MessageId"])

    async def aclose(self) -> None:
        """Flush pending sends (shutdown)."""
        if self._batcher is not None:
            await self._batcher.drain()

    async def _send_batch(self, entries: list[dict[str, Any]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = await self._sqs.send_message_batch(
            QueueUrl=self.queue_url, Entries=entries
        )
        return response


def _send_error(detail: str, decision: Decision) -> SendError | PermanentError:
    """SendError (503) when a later try may succeed, PermanentError (500) when SQS refused."""
    if decision.retryable:
        return SendError(detail, decision=decision)
    return PermanentError(detail)
