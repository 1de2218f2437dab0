"""The ceiling: what receiving and deleting alone cost, with courier's concurrency.

``--loops`` aiobotocore loops (courier's default is 4 pollers), each: ReceiveMessage(10,
long poll) then DeleteMessageBatch of what came, nothing else. On uvloop, as courier runs.
On SIGTERM it writes ``{"done": [[request_id, deleted_at], ...]}`` (monotonic clock) to
``--out`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session


async def _loop(sqs: Any, queue_url: str, wait: int, done: list[list[Any]]) -> None:
    while True:
        response = await sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if not messages:
            continue
        await sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
        at = time.monotonic()
        for message in messages:
            attributes = message.get("MessageAttributes", {})
            done.append([attributes.get("request_id", {}).get("StringValue", ""), at])


async def run(args: argparse.Namespace) -> None:
    done: list[list[Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    config = AioConfig(max_pool_connections=64, read_timeout=25, retries={"mode": "standard"})
    async with get_session().create_client(
        "sqs", region_name=args.region, endpoint_url=args.endpoint, config=config
    ) as sqs:
        print("ready", flush=True)
        tasks = [
            asyncio.create_task(_loop(sqs, args.queue_url, args.wait_seconds, done))
            for _ in range(args.loops)
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(Path(args.out).write_text, json.dumps({"done": done}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--wait-seconds", type=int, default=20)
    parser.add_argument("--out", required=True)
    import uvloop

    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
