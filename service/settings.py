"""One frozen, typed settings object, built once from ``COURIER_*`` env vars and a TOML file.

Every section is a frozen dataclass; every field carries its default, its bounds and a
one-line help text once, here. ``load_settings`` validates everything up front and raises
``SettingsError`` with a single line naming the setting, the value and what was expected,
so a wrong value stops the daemon at startup rather than on the first request.

Precedence: defaults < TOML file < environment. The env name of ``[http] port`` is
``COURIER_HTTP_PORT``; top-level fields drop the section (``COURIER_ROLE``). Targets are a
TOML array of tables (``[[targets]]``) or JSON in ``COURIER_TARGETS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from .errors import SettingsError

DEFAULT_CONFIG_PATH = Path("/etc/courier/courier.toml")
ENV_PREFIX = "COURIER_"
# Old dotted name -> new one. The old name is refused with a line naming the new one, never
# ignored: an ignored COURIER_SECRETS_ENABLED=false would silently turn caching back on.
RENAMED = {"secrets.enabled": "secrets.cache_enabled"}

Role = Literal["all", "api", "worker"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
TargetFormat = Literal["json", "soap"]
ConcurrencyMode = Literal["adaptive", "fixed"]


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable str -> str mapping: a setting's value stays frozen like the rest."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        # TOML inline-table syntax: what the README's settings table shows as the default.
        return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self._items.items()) + "}"


def setting(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    kind: str | None = None,
) -> Any:
    """Declare a field with its default, bounds and help text (``kind``: ``url``, ``port``)."""
    meta = {"help": help, "min": min, "max": max, "kind": kind}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Where the API listens, and the shutdown deadline (``drain_seconds``) of both halves."""

    host: str = setting("127.0.0.1", "address the API binds to")
    port: int = setting(
        8080,
        "API port, shared by processes with SO_REUSEPORT (0 = any free port)",
        min=0,
        max=65535,
    )
    metrics_port: int = setting(0, "extra port serving only /metrics (0 = off)", min=0, max=65535)
    health_port: int = setting(
        9200,
        "port of a worker-role process, plus instance: /healthz, /readyz and /metrics only (a"
        " worker never binds the API port; 0 = any free port)",
        min=0,
        max=65535,
    )
    max_body_bytes: int = setting(64 * 1024, "largest accepted request body", min=1024, max=10**7)
    drain_seconds: float = setting(
        20.0,
        "one deadline after SIGTERM, for the API and the worker alike: in-flight requests are"
        " answered and in-flight messages finished by then (keep it + worker.release_seconds + 2"
        " below systemd's TimeoutStopSec)",
        min=0,
        max=600,
    )
    close_grace_seconds: float = setting(
        1.0,
        "after SIGTERM the API keeps accepting this long, answering with Connection: close, and"
        " closes a keep-alive connection only once it has been idle this long",
        min=0,
        max=60,
    )
    reuse_port: bool = setting(True, "set SO_REUSEPORT so several processes share the port")
    body_timeout_seconds: float = setting(
        10.0,
        "longest time a client may take to send its request body (slow bodies get 408)",
        min=0.1,
        max=600,
    )
    keepalive_timeout_seconds: float = setting(
        75.0,
        "idle keep-alive connections (and unfinished headers) are closed after this (> ALB's 60 s)",
        min=1,
        max=3600,
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Logging."""

    level: LogLevel = setting("INFO", "minimum level of JSON log lines")
    access_log: bool = setting(True, "log one JSON line per HTTP request")


@dataclass(frozen=True, slots=True)
class AwsSettings:
    """Region and optional endpoints (emulators, VPC endpoints)."""

    region: str = setting("us-east-1", "AWS region")
    endpoint_url: str = setting("", "endpoint for every AWS service (empty = AWS)", kind="url?")
    sqs_endpoint_url: str = setting(
        "", "endpoint for SQS only (overrides endpoint_url)", kind="url?"
    )
    dynamodb_endpoint_url: str = setting("", "endpoint for DynamoDB only", kind="url?")
    kms_endpoint_url: str = setting("", "endpoint for KMS only", kind="url?")
    connect_timeout_seconds: float = setting(2.0, "AWS connect timeout", min=0.1, max=60)
    read_timeout_seconds: float = setting(
        25.0, "AWS read timeout (> SQS long-poll wait)", min=1, max=300
    )
    max_pool_connections: int = setting(64, "HTTP connections per AWS client", min=1, max=1000)

    def endpoint_for(self, service: str) -> str | None:
        """The endpoint URL for ``service`` (sqs, dynamodb, kms), or None for AWS's own."""
        specific: str = getattr(self, f"{service}_endpoint_url", "")
        return specific or self.endpoint_url or None


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """The work queue and its dead-letter queue."""

    url: str = setting("", "work queue URL", kind="url?")
    dlq_url: str = setting("", "dead-letter queue URL", kind="url?")
    batch_sends: bool = setting(True, "coalesce concurrent sends into SendMessageBatch")
    send_linger_seconds: float = setting(
        0.002, "how long a send waits for others to share its batch", min=0, max=1
    )


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """Request status and idempotency records (DynamoDB)."""

    table: str = setting("courier-status", "status table name")
    ttl_days: int = setting(14, "days a status record is kept", min=1, max=3650)


@dataclass(frozen=True, slots=True)
class SecretSettings:
    """The CredStash store and the in-memory cache in front of it."""

    table: str = setting("credential-store", "CredStash DynamoDB table")
    ttl_seconds: float = setting(300.0, "how long a fetched secret is fresh", min=1, max=86400)
    refresh_ahead_seconds: float = setting(
        60.0, "refresh in the background this long before expiry", min=0, max=86400
    )
    max_stale_seconds: float = setting(
        3600.0,
        "serve a stale secret this long past expiry while the store fails",
        min=0,
        max=604800,
    )
    prefetch: tuple[str, ...] = setting([], "secret names loaded at startup (readiness waits)")
    cache_enabled: bool = setting(
        True, "cache secrets (false = fetch from the store on every use, for benchmarks)"
    )
    encryption_context: FrozenMap = setting(
        FrozenMap(),
        "KMS encryption context of this deployment's secrets (credstash put NAME VALUE k=v);"
        " TOML table, or k=v,k2=v2 / a JSON object in env",
    )
    kms_key_id: str = setting(
        "alias/credstash",
        "the CredStash KMS key (ARN, id or alias, resolved once with DescribeKey); a secret"
        " whose data key KMS reports under another key is refused ('' = any key)",
    )


@dataclass(frozen=True, slots=True)
class EnvelopeSettings:
    """Envelope encryption of queued events under KMS data keys."""

    kms_key_id: str = setting("alias/courier", "KMS key (id, ARN or alias) for data keys")
    accepted_key_ids: tuple[str, ...] = setting(
        [],
        "previous KMS keys (ids, ARNs or aliases) whose data keys may still be opened after"
        " kms_key_id changes; sealing always uses kms_key_id",
    )
    data_key_max_messages: int = setting(
        10_000, "messages encrypted under one data key", min=1, max=2**32
    )
    data_key_max_age_seconds: float = setting(300.0, "lifetime of one data key", min=1, max=86400)
    decrypt_cache_size: int = setting(1000, "decrypted data keys kept (LRU)", min=0, max=10**6)
    decrypt_cache_ttl_seconds: float = setting(
        3600.0, "how long a decrypted data key is kept", min=1, max=86400
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """JWT verification."""

    issuer: str = setting("courier-local", "expected `iss`")
    audience: str = setting("courier", "expected `aud`")
    hs256_secret: str = setting("courier.jwt.hs256", "CredStash name of the HS256 key ('' = off)")
    jwks_url: str = setting("", "JWKS URL for RS256/ES256 keys ('' = off)", kind="url?")
    jwks_refresh_seconds: float = setting(
        60.0, "minimum interval between JWKS refetches on an unknown kid", min=1, max=86400
    )
    jwks_max_age_seconds: float = setting(
        300.0,
        "longest time JWKS keys are trusted without a refetch (a shorter Cache-Control max-age"
        " or Expires wins); a key removed from the JWKS is refused within this bound",
        min=1,
        max=86400,
    )
    leeway_seconds: float = setting(30.0, "clock skew allowed on exp/nbf", min=0, max=300)


@dataclass(frozen=True, slots=True)
class IdmSettings:
    """The identity back-end called synchronously by the API."""

    url: str = setting("http://127.0.0.1:8081", "IdM base URL", kind="url")
    api_key_secret: str = setting("courier.idm.api_key", "CredStash name of the IdM API key")
    timeout_seconds: float = setting(2.0, "IdM call timeout", min=0.05, max=60)
    retries: int = setting(2, "extra attempts on transient IdM failures", min=0, max=10)


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """One legacy system the worker delivers to."""

    name: str = setting("", "target name (used in idempotency keys and metrics)")
    url: str = setting("", "endpoint URL", kind="url")
    format: TargetFormat = setting("json", "wire format: json or soap")
    method: str = setting("POST", "HTTP method")
    timeout_seconds: float = setting(5.0, "per-call timeout", min=0.05, max=300)
    secret: str = setting("", "CredStash name of the target's credentials ('' = none)")
    concurrency: int = setting(
        32,
        "most concurrent calls per process: the adaptive limit's ceiling, or the fixed limit",
        min=1,
        max=10_000,
    )
    concurrency_min: int = setting(
        1, "fewest concurrent calls the adaptive limit keeps per process", min=1, max=10_000
    )
    limit: ConcurrencyMode = setting(
        "adaptive",
        "adaptive: follow the target's latency and refusals (service/worker/limiter.py);"
        " fixed: always `concurrency`",
    )
    fleet_max_concurrency: int = setting(
        0,
        "concurrent calls agreed with the target's owners for the whole fleet (0 = no cap);"
        " each process takes its share (service/worker/fleet.py)",
        min=0,
        max=100_000,
    )
    retry_after_max_seconds: float = setting(
        300.0,
        "longest Retry-After honoured: calls to the target pause that long at most",
        min=0,
        max=43_200,
    )
    retries: int = setting(1, "immediate extra attempts before backing off", min=0, max=10)
    breaker_failures: int = setting(
        5, "consecutive transient failures that open the circuit", min=1, max=1000
    )
    breaker_cooldown_seconds: float = setting(
        10.0, "how long an open circuit refuses calls before a probe", min=0.1, max=3600
    )


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker half (``service/worker/``): how it polls the queue, how many messages it runs
    at once, how it acknowledges them and backs off retries.

    Its drain at shutdown is bounded by ``http.drain_seconds``, the one deadline shared with the
    API (see ``app.begin_shutdown``); ``release_seconds`` is what the worker adds after it.
    """

    max_in_flight: int = setting(100, "messages processed at once per process", min=1, max=10_000)
    pollers: int = setting(4, "concurrent long-polls when the queue is busy", min=1, max=64)
    wait_seconds: int = setting(
        20, "SQS long-poll WaitTimeSeconds (short polls would spin)", min=1, max=20
    )
    visibility_timeout_seconds: int = setting(
        30, "visibility granted per receive; extended while work runs", min=5, max=43200
    )
    ack_linger_seconds: float = setting(
        0.01, "how long a delete/visibility change waits to share a batch request", min=0, max=1
    )
    backoff_base_seconds: float = setting(
        2.0, "first retry delay for transient failures", min=0, max=3600
    )
    backoff_max_seconds: float = setting(900.0, "longest retry delay", min=1, max=43200)
    release_seconds: float = setting(
        5.0,
        "bound on releasing unfinished messages and flushing deletes after the drain deadline"
        " (http.drain_seconds)",
        min=0.5,
        max=60,
    )


@dataclass(frozen=True, slots=True)
class Ec2Settings:
    """EC2 integration: instance identity and Auto Scaling lifecycle draining (IMDSv2)."""

    enabled: Literal["off", "on", "auto"] = setting(
        "off", "talk to IMDS: on (EC2 images set this), off, or auto (probe; off when not on EC2)"
    )
    imds_url: str = setting("http://169.254.169.254", "instance metadata service", kind="url")
    imds_timeout_seconds: float = setting(1.0, "IMDS call timeout", min=0.05, max=30)
    lifecycle_poll_seconds: float = setting(
        5.0, "how often the Auto Scaling target lifecycle state is read", min=0.1, max=300
    )
    lifecycle_hook: str = setting(
        "courier-drain", "TERMINATING lifecycle hook to complete after draining"
    )
    asg_name: str = setting(
        "", "Auto Scaling group ('' = from the instance tag aws:autoscaling:groupName)"
    )
    autoscaling_endpoint_url: str = setting("", "Auto Scaling API endpoint ('' = AWS)", kind="url?")


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The operator console (``service/console/``): its own port, never behind the load balancer."""

    enabled: bool = setting(False, "serve the operator console (needs a mailbox:admin token)")
    host: str = setting("127.0.0.1", "address the console binds to (reach it through SSM)")
    port: int = setting(9300, "console port, plus instance (0 = any free port)", min=0, max=65535)
    sample_seconds: float = setting(
        5.0, "how often the console samples this process's counters for its charts", min=1, max=60
    )
    extra_queues: tuple[str, ...] = setting(
        [], "more queue URLs the overview shows beside queue.url and queue.dlq_url (a FIFO pair)"
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything courier reads at startup. Build with ``load_settings``."""

    role: Role = setting("all", "which halves run: all, api or worker")
    instance: int = setting(
        0,
        "instance number (systemd %i): added to http.metrics_port and http.health_port so each"
        " process has its own",
        min=0,
        max=999,
    )
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    secrets: SecretSettings = field(default_factory=SecretSettings)
    envelope: EnvelopeSettings = field(default_factory=EnvelopeSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    idm: IdmSettings = field(default_factory=IdmSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    ec2: Ec2Settings = field(default_factory=Ec2Settings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    targets: tuple[TargetSettings, ...] = ()

    def replace(self, **changes: Any) -> Settings:
        """A copy with top-level fields or whole sections replaced (for tests and tools)."""
        return dataclasses.replace(self, **changes)


def load_settings(
    config_path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build and validate settings from the TOML file (if any) and the environment.

    ``config_path`` None means ``COURIER_CONFIG`` or the default path if that file exists.
    """
    env = os.environ if environ is None else environ
    document = _read_toml(_config_path(config_path, env))
    settings: Settings = _build(Settings, document, env, section="")
    return settings


def to_toml(settings: Settings) -> str:
    """Render settings as a TOML file that ``load_settings`` reads back identically."""
    out = _toml_pairs(settings)
    for section in dataclasses.fields(settings):
        value = getattr(settings, section.name)
        if dataclasses.is_dataclass(value):
            out += [f"\n[{section.name}]", *_toml_pairs(value)]
    for target in settings.targets:
        out += ["\n[[targets]]", *_toml_pairs(target)]
    return "\n".join(out) + "\n"


def _toml_pairs(table: Any) -> list[str]:
    # Scalars only: sections and [[targets]] follow as tables of their own.
    return [
        f"{item.name} = {_toml_value(getattr(table, item.name))}"
        for item in dataclasses.fields(table)
        if item.name != "targets" and not dataclasses.is_dataclass(getattr(table, item.name))
    ]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, e.g. secrets.encryption_context
        pairs = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return json.dumps(str(value))


def _config_path(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        return explicit
    if env.get("COURIER_CONFIG"):
        return Path(env["COURIER_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path}: not found") from None
    except RecursionError:
        raise SettingsError(f"config file {path}: nested too deeply") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from None


def _build(
    cls: type[Any], document: Mapping[str, Any], env: Mapping[str, str], section: str
) -> Any:
    _refuse_renamed(document, env, section)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(document) - known)
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise SettingsError(f"unknown setting {unknown[0]!r} in {where} of the config file")
    values = {}
    for item in dataclasses.fields(cls):
        values[item.name] = _field_value(item, hints[item.name], document, env, section)
    return cls(**values)


def _refuse_renamed(document: Mapping[str, Any], env: Mapping[str, str], section: str) -> None:
    for old, new in RENAMED.items():
        old_section, _, old_name = old.rpartition(".")
        if old_section != section:
            continue
        renamed = f"was renamed to {new} ({_env_name(new)})"
        if old_name in document:
            raise SettingsError(f"setting {old} {renamed}")
        if _env_name(old) in env:
            raise SettingsError(f"setting {old} ({_env_name(old)}) {renamed}")


def _env_name(dotted: str) -> str:
    """``http.port`` -> ``COURIER_HTTP_PORT``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def _field_value(
    item: dataclasses.Field[Any],
    hint: Any,
    document: Mapping[str, Any],
    env: Mapping[str, str],
    section: str,
) -> Any:
    dotted = f"{section}.{item.name}" if section else item.name
    env_name = _env_name(dotted)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        sub = document.get(item.name, {})
        if not isinstance(sub, Mapping):
            raise SettingsError(f"invalid setting [{dotted}]: expected a table, got {sub!r}")
        return _build(hint, sub, env, dotted)
    if item.name == "targets" and not section:
        return _targets(document, env)
    if env_name in env:
        raw: Any = env[env_name]
        source = f"{dotted} ({env_name})"
    elif item.name in document:
        raw = document[item.name]
        source = dotted
    else:
        return _default(item)
    return _coerce(raw, hint, item.metadata, source)


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _targets(document: Mapping[str, Any], env: Mapping[str, str]) -> tuple[TargetSettings, ...]:
    raw: Any = document.get("targets", [])
    if "COURIER_TARGETS" in env:
        try:
            raw = json.loads(env["COURIER_TARGETS"])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SettingsError(
                f"invalid setting targets (COURIER_TARGETS): not JSON: {exc}"
            ) from None
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise SettingsError(f"invalid setting targets = {raw!r}: expected a list of tables")
    targets = tuple(
        _build(TargetSettings, entry, {}, f"targets[{index}]") for index, entry in enumerate(raw)
    )
    names = [t.name for t in targets]
    for index, name in enumerate(names):
        if not name:
            raise SettingsError(f"invalid setting targets[{index}].name = '': expected a name")
        if name in names[:index]:
            raise SettingsError(
                f"invalid setting targets[{index}].name = {name!r}: names must be unique"
            )
        target = targets[index]
        if target.concurrency_min > target.concurrency:
            raise SettingsError(
                f"invalid setting targets[{index}].concurrency_min = {target.concurrency_min}:"
                f" more than its concurrency ({target.concurrency})"
            )
    return targets


def _coerce(raw: Any, hint: Any, meta: Mapping[str, Any], source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        value = str(raw).upper() if all(str(c).isupper() for c in choices) else str(raw)
        if value not in choices:
            raise _invalid(source, raw, "one of " + ", ".join(map(str, choices)))
        return value
    if origin is tuple:
        return _coerce_list(raw, source)
    if hint is FrozenMap:
        return _coerce_context(raw, source)
    if hint is bool:
        return _coerce_bool(raw, source)
    if hint is int or hint is float:
        return _coerce_number(raw, hint, meta, source)
    if hint is str or isinstance(hint, types.UnionType):
        return _coerce_str(raw, meta, source)
    raise AssertionError(f"unsupported settings type {hint!r}")  # pragma: no cover


def _coerce_bool(raw: Any, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise _invalid(source, raw, "a boolean (true/false)")


def _coerce_number(
    raw: Any, hint: type[int] | type[float], meta: Mapping[str, Any], source: str
) -> Any:
    low, high = meta.get("min"), meta.get("max")
    expected = "an integer" if hint is int else "a number"
    if low is not None and high is not None:
        expected += f" between {_fmt(low)} and {_fmt(high)}"
    if isinstance(raw, bool):
        raise _invalid(source, raw, expected)
    try:
        value = hint(raw) if not isinstance(raw, str) else hint(raw.strip())
        if hint is int and isinstance(raw, float) and raw != int(raw):
            raise ValueError("not a whole number")
    except (TypeError, ValueError, OverflowError):
        raise _invalid(source, raw, expected) from None
    if not math.isfinite(value):  # nan compares false with every bound
        raise _invalid(source, raw, expected)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(source, raw, expected)
    return value


def _coerce_str(raw: Any, meta: Mapping[str, Any], source: str) -> str:
    if not isinstance(raw, str):
        raise _invalid(source, raw, "a string")
    value = raw.strip()
    kind = meta.get("kind")
    if kind in {"url", "url?"} and (value or kind == "url"):
        try:
            parsed = urlparse(value)
        except ValueError:
            raise _invalid(source, raw, "an http(s) URL") from None
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise _invalid(source, raw, "an http(s) URL")
    return value


def _coerce_list(raw: Any, source: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(raw, list) and all(isinstance(part, str) for part in raw):
        return tuple(raw)
    raise _invalid(source, raw, "a list of strings (comma-separated in env)")


def _coerce_context(raw: Any, source: str) -> FrozenMap:
    """A KMS encryption context: a TOML table, or ``k=v,k2=v2`` / a JSON object in env."""
    expected = "a table of non-empty strings (k=v,k2=v2 or a JSON object in env)"
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("{") else _pairs(text)
        except (ValueError, RecursionError):
            raise _invalid(source, raw, expected) from None
    if not isinstance(raw, Mapping):
        raise _invalid(source, raw, expected)
    for key, value in raw.items():
        if not (isinstance(key, str) and isinstance(value, str) and key.strip() and value):
            raise _invalid(source, raw, expected)
        if key.lower().startswith("aws:"):  # the aws: prefix is AWS services' own (aws:sqs:arn)
            raise _invalid(source, raw, "keys that do not start with aws: (reserved by AWS)")
    return FrozenMap(raw)


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(part)
        pairs[key.strip()] = value.strip()
    return pairs


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _invalid(source: str, raw: Any, expected: str) -> SettingsError:
    return SettingsError(f"invalid setting {source} = {raw!r}: expected {expected}")


def describe() -> list[tuple[str, str, Any, str]]:
    """(dotted name, env var, default, help) for every scalar setting; feeds the README table."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type[Any], prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            dotted = f"{prefix}.{item.name}" if prefix else item.name
            if dataclasses.is_dataclass(hints[item.name]):
                walk(hints[item.name], dotted)
            elif item.metadata:
                default = item.default if item.default is not dataclasses.MISSING else ()
                rows.append((dotted, _env_name(dotted), default, item.metadata["help"]))

    walk(Settings, "")
    return rows


def reference_table() -> str:
    """The README's configuration table (``python -m service.settings`` prints it)."""
    lines = ["| setting | env var | default | meaning |", "|---|---|---|---|"]
    for dotted, env_name, default, text in describe():
        shown = "[" + ", ".join(default) + "]" if isinstance(default, tuple) else default
        shown = str(shown).lower() if isinstance(shown, bool) else shown
        lines.append(
            f"| `{dotted}` | `{env_name}` | `{shown if shown != '' else chr(34) * 2}` | {text} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(reference_table())
