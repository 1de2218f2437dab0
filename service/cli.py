"""The ``courier`` command: run | local | check | bootstrap | token | replay | secrets."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from . import __version__
from .errors import CourierError, SettingsError
from .local import LOCAL_CONFIG_PATH, use_fake_credentials
from .logs import setup_logging
from .settings import DEFAULT_CONFIG_PATH, Settings, load_settings

if TYPE_CHECKING:
    from .bootstrap import Resources

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int] | int]


def run_async(main: Coroutine[Any, Any, int | None]) -> int | None:
    """Run ``main`` on uvloop when it is installed (it is on Linux), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return asyncio.run(main)
    return uvloop.run(main)


CONFIG_HELP = (
    "TOML settings file (default: $COURIER_CONFIG, else .courier/local.toml in the working"
    " directory, else /etc/courier/courier.toml if present)"
)


def _config_parent() -> argparse.ArgumentParser:
    """``--config`` for every subcommand, so it may follow the command as well as precede it."""
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand given no --config leaves the one before the command in place.
    parent.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="courier", description=__doc__)
    parser.add_argument("--version", action="version", version=f"courier {__version__}")
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    run = commands.add_parser("run", help="serve the API and/or the worker until SIGTERM")
    run.add_argument("--role", choices=["all", "api", "worker"], help="override the role setting")

    local = commands.add_parser("local", help="run the whole chain on embedded stand-ins for AWS")
    local.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    local.add_argument(
        "--aws-port", type=int, default=4566, help="moto port (default 4566, 0 = any)"
    )

    check = commands.add_parser(
        "check", help="validate the settings as `run` would: exit 0 (valid) or 2 (invalid)"
    )
    check.add_argument("--role", choices=["all", "api", "worker"], help="override the role setting")

    boot = commands.add_parser(
        "bootstrap",
        help="create courier's queues, tables and KMS keys if missing; print them as settings",
    )
    boot.add_argument(
        "--prefix", default="courier", help="name prefix: PREFIX-work, PREFIX-dlq, PREFIX-status"
    )
    boot.add_argument(
        "--demo-secrets",
        action="store_true",
        help="also store random values for the demo secrets that are missing",
    )

    replay = commands.add_parser("replay", help="move messages from the DLQ back to the work queue")
    replay.add_argument("--reason", default="", help="only messages dead-lettered for this reason")
    replay.add_argument("--target", default="", help="only messages that failed at this target")
    replay.add_argument("--op", default="", help="only messages of this operation")
    replay.add_argument(
        "--older-than", type=float, default=0.0, metavar="SECONDS", help="minimum age"
    )
    replay.add_argument(
        "--newer-than", type=float, default=0.0, metavar="SECONDS", help="maximum age"
    )
    replay.add_argument("--rate", type=float, default=10.0, help="messages per second (default 10)")
    replay.add_argument("--limit", type=int, default=0, help="stop after this many (0 = all)")
    replay.add_argument("--dry-run", action="store_true", help="list what would move; move nothing")

    token = commands.add_parser("token", help="print a development JWT signed with the HS256 key")
    token.add_argument("--scope", action="append", default=[], help="scope to grant (repeatable)")
    token.add_argument("--subject", default="developer", help="the token's sub claim")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    secrets = commands.add_parser("secrets", help="read or write CredStash secrets")
    actions = _Commands(secrets.add_subparsers(dest="action", required=True, metavar="ACTION"))
    get = actions.add_parser("get", help="print a secret's plaintext")
    get.add_argument("name")
    get.add_argument("--version", dest="secret_version", default=None)
    get.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    put = actions.add_parser("put", help="store a new version of a secret")
    put.add_argument("name")
    put.add_argument("value")
    put.add_argument("--kms-key", default=None, help="default: secrets.kms_key_id")
    put.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    return parser


class _Commands:
    """Subparsers that all accept ``--config``."""

    def __init__(self, action: Any) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(
            name, parents=[_config_parent()], **kwargs
        )
        return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``courier`` console script.

    Exit status: 0 done; 2 an invalid setting or argument, with one line on stderr, before
    anything starts, or a port courier cannot listen on, as it starts; 1 a failure while
    running; 130 interrupted.
    """
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        return _refuse(exc)
    setup_logging(settings.log.level)
    if _points_at_emulator(settings):
        use_fake_credentials()
    handler = _COMMANDS[args.command]
    try:
        outcome = handler(args, settings)
        result = run_async(outcome) if asyncio.iscoroutine(outcome) else outcome
    except SettingsError as exc:
        return _refuse(exc)
    except CourierError as exc:
        print(f"courier: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings the command runs with; for ``run`` and ``check`` also what the role needs."""
    settings = load_settings(_config_path(args))
    if getattr(args, "role", None):
        settings = settings.replace(role=args.role)
    if args.command in ("run", "check"):
        # One function, so check refuses exactly what run refuses, with the same line.
        from .app import check_runnable

        check_runnable(settings)
    return settings


def _config_path(args: argparse.Namespace) -> Path | None:
    """``--config``; else, when nothing names a file, ``courier local``'s file if it is here.

    Not for ``local`` (it writes that file, and must not start from the last run's endpoints),
    and never on a host that has /etc/courier/courier.toml: there that file is the config.
    """
    explicit: Path | None = args.config
    named = explicit is not None or bool(os.environ.get("COURIER_CONFIG"))
    if named or args.command == "local" or DEFAULT_CONFIG_PATH.is_file():
        return explicit  # None: load_settings applies COURIER_CONFIG and the default path
    if not LOCAL_CONFIG_PATH.is_file():
        return None
    print(
        f"courier: using {LOCAL_CONFIG_PATH} (written by courier local);"
        " --config or COURIER_CONFIG choose another",
        file=sys.stderr,
    )
    return LOCAL_CONFIG_PATH


def _refuse(error: SettingsError) -> int:
    print(f"courier: {error}", file=sys.stderr)
    return 2


def _points_at_emulator(settings: Settings) -> bool:
    # Emulators on loopback (moto, fauxqs) accept any signature; real AWS never lives there.
    endpoints = [settings.aws.endpoint_for(name) or "" for name in ("sqs", "dynamodb", "kms")]
    return any(urlparse(url).hostname in {"127.0.0.1", "localhost", "::1"} for url in endpoints)


async def _run(_: argparse.Namespace, settings: Settings) -> int:
    from . import daemon

    await daemon.run(settings)
    return 0


async def _local(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from .local import run_local

    try:
        import moto.server  # noqa: F401  (only to learn whether it is installed)
    except ImportError:
        # The runtime wheel leaves moto out: it is in the dev extra.
        raise SettingsError(
            "courier local needs moto, a development dependency: pip install 'courier[dev]'"
        ) from None

    # One courier local per port: a second one must not silently share the first's (SO_REUSEPORT).
    http = replace(settings.http, port=args.port, reuse_port=False)
    await run_local(settings.replace(http=http), aws_port=args.aws_port)
    return 0


def _check(_: argparse.Namespace, settings: Settings) -> int:
    # main() has already run run's validation (_settings): reaching here means valid.
    targets = "1 target" if len(settings.targets) == 1 else f"{len(settings.targets)} targets"
    print(f"courier: settings are valid (role={settings.role}, {targets})")
    return 0


async def _bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    from .aws import open_clients
    from .bootstrap import ResourceNames, bootstrap
    from .local import demo_secrets

    names = ResourceNames(prefix=args.prefix, secrets_table=settings.secrets.table)
    # bootstrap stores only the secrets that are missing: a second run keeps the first's values.
    values = demo_secrets() if args.demo_secrets else None
    async with open_clients(settings.aws) as clients:
        made = await bootstrap(clients, names, values)
    print(_as_settings(made, settings.aws.endpoint_for("sqs") or "AWS"))
    return 0


def _as_settings(made: Resources, where: str) -> str:
    """What ``bootstrap`` made, as TOML a person pastes into the settings file."""
    demo = ", ".join(made.secrets) + " (stored where missing)" if made.secrets else "none"
    return (
        f"# courier bootstrap: created, or found, at {where}; paste into the settings file\n"
        f"# FIFO pair: {made.fifo_queue_url} (DLQ {made.fifo_dlq_url})\n"
        f"# CredStash key: alias/credstash = {made.credstash_key_arn}\n"
        f"# demo secrets: {demo}\n"
        f"[queue]\nurl = {_quoted(made.queue_url)}\ndlq_url = {_quoted(made.dlq_url)}\n\n"
        f"[status]\ntable = {_quoted(made.status_table)}\n\n"
        f"[secrets]\ntable = {_quoted(made.secrets_table)}\n\n"
        f"[envelope]\nkms_key_id = {_quoted(made.data_key_arn)}"
    )


def _quoted(value: str) -> str:
    # A JSON string of printable ASCII is a TOML basic string.
    return json.dumps(value)


def _context(pairs: list[str]) -> dict[str, str]:
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettingsError(f"invalid --context {pair!r}: expected KEY=VALUE")
        context[key] = value
    return context


async def _secrets(args: argparse.Namespace, settings: Settings) -> int:
    from .aws import open_client
    from .secrets.credstash import CredStash

    # No --context: the deployment's secrets.encryption_context, as the daemon reads them.
    context = _context(args.context) or None
    async with (
        open_client("dynamodb", settings.aws) as dynamodb,
        open_client("kms", settings.aws) as kms,
    ):
        store = CredStash.from_settings(dynamodb, kms, settings.secrets)
        if args.action == "get":
            print(await store.get(args.name, args.secret_version, context))
        else:
            version = await store.put(args.name, args.value, kms_key=args.kms_key, context=context)
            print(f"stored {args.name} version {int(version)}")
    return 0


async def _token(args: argparse.Namespace, settings: Settings) -> int:
    from .api.auth import issue_token
    from .aws import open_client
    from .secrets.credstash import CredStash

    if not settings.auth.hs256_secret:
        raise SettingsError(
            "auth.hs256_secret is empty: this deployment has no HS256 key to sign with"
        )
    async with (
        open_client("dynamodb", settings.aws) as dynamodb,
        open_client("kms", settings.aws) as kms,
    ):
        store = CredStash.from_settings(dynamodb, kms, settings.secrets)
        key = await store.get(settings.auth.hs256_secret)
    scopes = args.scope or ["mailbox:create", "mailbox:read"]
    print(issue_token(key, settings.auth, args.subject, scopes, args.ttl))
    return 0


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from .aws import open_client
    from .worker.dlq import DeadLetterInfo
    from .worker.outcomes import Message
    from .worker.replay import ReplayFilter, replay

    if not settings.queue.url or not settings.queue.dlq_url:
        raise SettingsError("queue.url and queue.dlq_url are required to replay")
    selection = ReplayFilter(args.reason, args.target, args.op, args.older_than, args.newer_than)

    def show(message: Message, chosen: bool) -> None:
        if chosen:
            attributes = message.attributes
            info = DeadLetterInfo.of(attributes)
            reason = info.reason if info else "(redrive)"  # moved by SQS after maxReceiveCount
            print(
                f"{'would move' if args.dry_run else 'moving'} {message.message_id}"
                f" request={attributes.get('request_id', '?')} op={attributes.get('op', '?')}"
                f" reason={reason} target={(info.target if info else '') or '-'}"
            )

    async with open_client("sqs", settings.aws) as sqs:
        report = await replay(
            sqs,
            settings.queue.dlq_url,
            settings.queue.url,
            selection,
            rate_per_second=args.rate,
            dry_run=args.dry_run,
            limit=args.limit,
            on_message=show,
        )
    # skipped: dead-lettered again after the replay began (left for a later run);
    # left: matched but still in the DLQ (failed to move, or beyond --limit).
    counts = f"examined {report.examined}, matched {report.matched}"
    if args.dry_run:
        print(f"{counts}, would move {report.chosen}, skipped {report.skipped}")
        return 0
    print(
        f"{counts}, moved {report.moved}, skipped {report.skipped},"
        f" left {report.left}, failed {report.failed}"
    )
    return 1 if report.failed else 0


_COMMANDS: dict[str, Command] = {
    "run": _run,
    "local": _local,
    "check": _check,
    "bootstrap": _bootstrap,
    "secrets": _secrets,
    "token": _token,
    "replay": _replay,
}
