"""Embedded stand-ins for AWS, used by the test-suite and by ``courier local``."""

from __future__ import annotations

import os
from typing import Any

# moto signs nothing, but botocore refuses to send a request without credentials.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "courier-local",
    "AWS_SECRET_ACCESS_KEY": "courier-local",
}


def use_fake_credentials() -> None:
    """Give botocore credentials to sign with, unless real ones are already configured."""
    for name, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(name, value)


class EmbeddedAws:
    """moto's server (SQS, DynamoDB, KMS, ...) in a thread, on 127.0.0.1 only."""

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        self._server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint_url = ""

    def start(self) -> str:
        """Start serving; returns the endpoint URL."""
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self.endpoint_url

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        self._server.stop()

    def __enter__(self) -> EmbeddedAws:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
