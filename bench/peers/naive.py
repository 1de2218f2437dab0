"""The naive consumer: one synchronous boto3 loop, the way a first version is often written.

Receive 1 message (long poll), call the three targets one after another with ``requests``
(one keep-alive session), delete the message, repeat. No decryption, no status write.

``python -m bench.peers.naive --queue-url URL --endpoint URL --target name=url ...``
prints ``ready`` once its clients exist and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import boto3
import requests


def _stop(*_: Any) -> None:
    # Raised inside the blocking long poll, so the loop ends now rather than after 20 s.
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--wait-seconds", type=int, default=20)
    args = parser.parse_args()
    targets = [tuple(item.split("=", 1)) for item in args.target]
    signal.signal(signal.SIGTERM, _stop)
    sqs = boto3.client("sqs", region_name=args.region, endpoint_url=args.endpoint)
    http = requests.Session()
    print("ready", flush=True)
    while True:
        response = sqs.receive_message(
            QueueUrl=args.queue_url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=args.wait_seconds,
            MessageAttributeNames=["All"],
        )
        for message in response.get("Messages", []):
            attributes = message.get("MessageAttributes", {})
            request_id = attributes.get("request_id", {}).get("StringValue", message["MessageId"])
            try:
                for name, url in targets:
                    answer = http.post(
                        url,
                        data=message["Body"],
                        headers={
                            "Content-Type": "application/json",
                            "Idempotency-Key": f"{request_id}:{name}",
                        },
                        timeout=5,
                    )
                    answer.raise_for_status()
            except requests.RequestException as exc:
                print(f"delivery failed: {exc}", file=sys.stderr, flush=True)
                continue  # left in the queue: comes back after its visibility timeout
            sqs.delete_message(QueueUrl=args.queue_url, ReceiptHandle=message["ReceiptHandle"])


if __name__ == "__main__":
    main()
