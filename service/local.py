"""Embedded stand-ins for AWS and the customer's systems: the test-suite's and ``courier local``'s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aws import open_clients
from .bootstrap import ResourceNames, Resources, bootstrap
from .net import ensure_free
from .settings import AwsSettings, Settings, TargetFormat, TargetSettings, to_toml

if TYPE_CHECKING:
    from .daemon import Listening

# moto signs nothing, but botocore refuses to send a request without credentials.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "courier-local",
    "AWS_SECRET_ACCESS_KEY": "courier-local",
}


def use_fake_credentials() -> None:
    """Give botocore credentials to sign with, unless real ones are already configured."""
    for name, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(name, value)


LOOPBACK = "127.0.0.1"  # the embedded AWS never listens beyond this machine
AWS_PORT_SETTING = "courier local --aws-port (0 = any free port)"


class EmbeddedAws:
    """moto's server (SQS, DynamoDB, KMS, ...) in a thread, on 127.0.0.1 only."""

    def __init__(self, port: int = 0, wsgi_middleware: Callable[[Any], Any] | None = None) -> None:
        """``wsgi_middleware`` wraps moto's WSGI app (the test-suite's strict AWS limits)."""
        import logging

        from moto.server import ThreadedMotoServer

        # werkzeug logs every request at INFO: thousands of lines that drown courier's own.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        self._port = port
        self._server: Any = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
        self._middleware = wsgi_middleware
        self.endpoint_url = ""

    def start(self) -> str:
        """Start serving; returns the endpoint URL."""
        ensure_free(LOOPBACK, self._port, AWS_PORT_SETTING)
        self._server.start()
        if self._middleware is not None:
            # werkzeug reads ``server.app`` per request; nothing is served before we return.
            wsgi = self._server._server
            wsgi.app = self._middleware(wsgi.app)
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


DEMO_SECRET_NAMES = ("courier.jwt.hs256", "courier.idm.api_key", "courier.crm.token")
LOCAL_CONFIG_PATH = Path(".courier/local.toml")
# The reference operation's three legacy systems: two JSON, one SOAP; crm wants a token.
LOCAL_TARGETS: tuple[tuple[str, TargetFormat, str], ...] = (
    ("crm", "json", "courier.crm.token"),
    ("billing", "soap", ""),
    ("directory", "json", ""),
)


def demo_secrets() -> dict[str, str]:
    """Fresh random values for the secrets a local chain needs (new on every start)."""
    return {name: secrets.token_urlsafe(32) for name in DEMO_SECRET_NAMES}


async def run_local(base: Settings, aws_port: int, config_out: Path = LOCAL_CONFIG_PATH) -> None:
    """``courier local``: embedded AWS, stub IdM and legacy systems, and the daemon, until Ctrl-C."""
    from . import daemon
    from .stubs import IdmStub, LegacyStub

    _check_ports(base, aws_port)
    use_fake_credentials()
    values = demo_secrets()
    idm = IdmStub(api_key=values["courier.idm.api_key"])
    stubs = {
        name: LegacyStub(name=name, token=values.get(secret, ""))
        for name, _, secret in LOCAL_TARGETS
    }
    with EmbeddedAws(port=aws_port) as aws:
        async with contextlib.AsyncExitStack() as stack:
            idm_url = await stack.enter_async_context(idm.serving())
            urls = {
                name: await stack.enter_async_context(stub.serving())
                for name, stub in stubs.items()
            }
            aws_settings = replace(base.aws, endpoint_url=aws.endpoint_url)
            async with open_clients(aws_settings) as clients:
                resources = await bootstrap(clients, ResourceNames(), values)
            settings = _local_settings(base, aws_settings, resources, idm_url, urls)
            _write_config(config_out, settings)
            listening = await stack.enter_async_context(daemon.serving(settings))
            _print_banner(settings, resources, listening, config_out)
            await _until_interrupted()


def _check_ports(settings: Settings, aws_port: int) -> None:
    """Every fixed port, before moto starts or the settings file is rewritten: the usual
    holder is another ``courier local``, whose ``.courier/local.toml`` must stay true."""
    from .console.server import CONSOLE_PORT_SETTING, console_port
    from .daemon import API_PORT_SETTING

    ensure_free(LOOPBACK, aws_port, AWS_PORT_SETTING)
    ensure_free(settings.http.host, settings.http.port, API_PORT_SETTING)
    ensure_free(settings.console.host, console_port(settings), CONSOLE_PORT_SETTING)


def _local_settings(
    base: Settings, aws: AwsSettings, resources: Resources, idm_url: str, urls: dict[str, str]
) -> Settings:
    targets = tuple(
        TargetSettings(name=name, url=f"{urls[name]}/{name}", format=fmt, secret=secret)
        for name, fmt, secret in LOCAL_TARGETS
    )
    # The console is on (its port from the settings, 9300 unless set), showing the FIFO pair too.
    console = replace(
        base.console,
        enabled=True,
        extra_queues=(*base.console.extra_queues, resources.fifo_queue_url, resources.fifo_dlq_url),
    )
    settings = base.replace(
        aws=aws, idm=replace(base.idm, url=idm_url), targets=targets, console=console
    )
    return resources.apply_to(settings)


def _write_config(path: Path, settings: Settings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(settings))


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print("\ncourier local: stopping", file=sys.stderr, flush=True)


def _print_banner(
    settings: Settings, resources: Resources, listening: Listening, config: Path
) -> None:
    lines = [
        "courier local is running (Ctrl-C stops everything):",
        f"  API            {listening.url}   (GET /readyz, /healthz, /metrics)",
        f"  AWS (moto)     {settings.aws.endpoint_url}",
        f"  IdM (stub)     {settings.idm.url}",
        *(f"  {t.name + ' (stub)':<15}{t.url}   ({t.format})" for t in settings.targets),
        f"  work queue     {resources.queue_url}",
        f"  DLQ            {resources.dlq_url}",
        f"  status table   {resources.status_table}",
        f"  secrets table  {resources.secrets_table}   (secrets: {', '.join(resources.secrets)})",
        f"  settings       {config}   (use with: courier --config {config} ...)",
        "",
        "Try it:",
        f"  TOKEN=$(.venv/bin/courier --config {config} token)",
        f'  curl -si -X POST {listening.url}/v1/mailboxes -H "Authorization: Bearer $TOKEN" \\',
        "       -H 'Content-Type: application/json' \\",
        '       -d \'{"username":"jane.doe","display_name":"Jane Doe","plan":"standard",'
        '"contact_email":"jane@example.com"}\'',
    ]
    lines += _console_lines(listening, config)
    print("\n".join(lines), file=sys.stderr, flush=True)


def _console_lines(listening: Listening, config: Path) -> list[str]:
    if listening.console_url is None:
        return []
    return [
        "",
        f"Operator console: {listening.console_url}   (sign in with a mailbox:admin token:)",
        f"  .venv/bin/courier --config {config} token --scope mailbox:admin \\",
        '       --scope mailbox:admin-unmask --subject "$USER"   # paste it into the login page',
        "  (mailbox:admin-unmask is needed only to see a dead letter's personal fields)",
    ]
