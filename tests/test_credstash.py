"""Interop of courier's CredStash with the real ``credstash`` package (library and CLI) on moto.

Both sides talk HTTP to the session's moto server: the credstash library through boto3
pointed at it, the credstash CLI through ``AWS_ENDPOINT_URL`` (it has no endpoint flag).
This module uses a table of its own, created by the credstash CLI's ``setup``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import credstash
import pytest

from service.aws import AwsClients
from service.bootstrap import Resources
from service.secrets.credstash import CredStash
from service.secrets.errors import SecretIntegrityError, SecretNotFoundError

TABLE = "credstash-interop"
REGION = "us-east-1"
CONTEXT = {"env": "test", "app": "courier"}
CREDSTASH_CLI = Path(sys.executable).with_name("credstash")


@pytest.fixture(scope="module")
def cli_env(moto_endpoint: str) -> dict[str, str]:
    """Environment for the credstash CLI: moto's endpoint and fake credentials, no profile."""
    env = {k: v for k, v in os.environ.items() if k not in {"AWS_PROFILE", "AWS_DEFAULT_PROFILE"}}
    env.update(
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_DEFAULT_REGION=REGION,
        AWS_ACCESS_KEY_ID="courier-local",
        AWS_SECRET_ACCESS_KEY="courier-local",
    )
    return env


@pytest.fixture(scope="module")
def table(cli_env: dict[str, str], resources: Resources) -> str:
    """This module's CredStash table, made by ``credstash setup`` (credstash's createDdbTable).

    ``resources`` provides the ``alias/credstash`` KMS key both sides encrypt under.
    """
    result = subprocess.run(
        [str(CREDSTASH_CLI), "-t", TABLE, "setup"],
        env=cli_env,
        cwd=tempfile.gettempdir(),  # the CLI writes credstash.log into its working directory
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return TABLE


@pytest.fixture(scope="module")
def boto(moto_endpoint: str) -> Iterator[tuple[Any, Any]]:
    """(boto3 DynamoDB resource, boto3 KMS client) on moto, as the credstash library wants."""
    dynamodb = boto3.resource("dynamodb", region_name=REGION, endpoint_url=moto_endpoint)
    kms = boto3.client("kms", region_name=REGION, endpoint_url=moto_endpoint)
    yield dynamodb, kms
    kms.close()
    dynamodb.meta.client.close()


@pytest.fixture
def store(aws: AwsClients, table: str) -> CredStash:
    return CredStash(aws.dynamodb, aws.kms, table)


@pytest.fixture
def name() -> str:
    return f"interop.{uuid.uuid4().hex[:12]}"


def library_put(boto: tuple[Any, Any], name: str, value: str, **kwargs: Any) -> None:
    dynamodb, kms = boto
    credstash.putSecret(name, value, table=TABLE, dynamodb=dynamodb, kms=kms, **kwargs)


def library_get(boto: tuple[Any, Any], name: str, **kwargs: Any) -> str:
    dynamodb, kms = boto
    value: str = credstash.getSecret(name, table=TABLE, dynamodb=dynamodb, kms=kms, **kwargs)
    return value


async def raw_item(aws: AwsClients, name: str, version: int = 1) -> dict[str, Any]:
    response = await aws.dynamodb.get_item(
        TableName=TABLE, Key={"name": {"S": name}, "version": {"S": str(version).zfill(19)}}
    )
    item: dict[str, Any] = response["Item"]
    return item


async def run_cli(env: Mapping[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(CREDSTASH_CLI),
        "-t",
        TABLE,
        *args,
        env=dict(env),
        cwd=tempfile.gettempdir(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_library_secret_with_binary_hmac(
    aws: AwsClients, store: CredStash, boto: Any, name: str
) -> None:
    library_put(boto, name, "library-value", version="1")
    item = await raw_item(aws, name)
    assert "B" in item["hmac"], "credstash stores its hex HMAC as bytes, i.e. Binary"
    assert await store.get(name) == "library-value"


async def test_item_with_string_hmac(
    aws: AwsClients, store: CredStash, boto: Any, name: str
) -> None:
    library_put(boto, name, "string-hmac-value", version="1")
    binary = (await raw_item(aws, name))["hmac"]["B"]
    await aws.dynamodb.update_item(
        TableName=TABLE,
        Key={"name": {"S": name}, "version": {"S": "1".zfill(19)}},
        UpdateExpression="SET hmac = :h",
        ExpressionAttributeValues={":h": {"S": bytes(binary).decode("ascii")}},
    )
    assert "S" in (await raw_item(aws, name))["hmac"]
    assert await store.get(name) == "string-hmac-value"
    assert library_get(boto, name) == "string-hmac-value"


async def test_sha512_digest(aws: AwsClients, store: CredStash, boto: Any, name: str) -> None:
    library_put(boto, name, "sha512-value", version="1", digest="SHA512")
    item = await raw_item(aws, name)
    assert item["digest"] == {"S": "SHA512"}
    assert len(bytes(item["hmac"]["B"])) == 128  # 64-byte HMAC, hex
    assert await store.get(name) == "sha512-value"


async def test_latest_and_explicit_versions(store: CredStash, boto: Any, name: str) -> None:
    for version in ("1", "2", "10"):  # 10 sorts last only because versions are zero-padded
        library_put(boto, name, f"value-{version}", version=version)
    assert await store.get(name) == "value-10"
    assert await store.latest_version(name) == "10".zfill(19)
    assert await store.get(name, version="2") == "value-2"
    assert await store.get(name, version="1".zfill(19)) == "value-1"
    with pytest.raises(SecretNotFoundError, match="version 3"):
        await store.get(name, version="3")


async def test_context_protected_secret(store: CredStash, boto: Any, name: str) -> None:
    library_put(boto, name, "context-value", version="1", context=CONTEXT)
    assert await store.get(name, context={"app": "courier", "env": "test"}) == "context-value"
    with pytest.raises(SecretIntegrityError):
        await store.get(name)
    with pytest.raises(SecretIntegrityError):
        await store.get(name, context={"env": "prod", "app": "courier"})


async def test_cli_written_secrets(
    aws: AwsClients, store: CredStash, cli_env: dict[str, str], name: str
) -> None:
    await run_cli(
        cli_env, "put", "-d", "SHA384", "-v", "1", name, "cli-v1", "env=test", "app=courier"
    )
    await run_cli(cli_env, "put", "-a", "-d", "SHA384", name, "cli-v2", "env=test", "app=courier")
    assert (await raw_item(aws, name, 2))["digest"] == {"S": "SHA384"}
    assert await store.get(name, context=CONTEXT) == "cli-v2"
    assert await store.get(name, version="1", context=CONTEXT) == "cli-v1"
    with pytest.raises(SecretIntegrityError):
        await store.get(name)


async def test_cli_reads_what_courier_writes(
    store: CredStash, cli_env: dict[str, str], resources: Resources, name: str
) -> None:
    await store.put(name, "from-courier", kms_key=resources.credstash_key_arn, context=CONTEXT)
    assert await run_cli(cli_env, "get", "-n", name, "env=test", "app=courier") == "from-courier"


@pytest.mark.parametrize("version", ["1", "beta"])  # credstash accepts non-numeric versions
async def test_tampered_contents_fail_the_hmac(
    aws: AwsClients, store: CredStash, boto: Any, name: str, version: str
) -> None:
    library_put(boto, name, "tamper-me", version=version)
    padded = version.zfill(19)
    item = await aws.dynamodb.get_item(
        TableName=TABLE, Key={"name": {"S": name}, "version": {"S": padded}}
    )
    contents = bytearray(base64.b64decode(item["Item"]["contents"]["S"]))
    contents[0] ^= 0x01
    await aws.dynamodb.update_item(
        TableName=TABLE,
        Key={"name": {"S": name}, "version": {"S": padded}},
        UpdateExpression="SET contents = :c",
        ExpressionAttributeValues={":c": {"S": base64.b64encode(contents).decode()}},
    )
    with pytest.raises(SecretIntegrityError, match=f"version {version}: HMAC mismatch"):
        await store.get(name)
    with pytest.raises(credstash.IntegrityError):  # credstash agrees it was tampered with
        library_get(boto, name)


async def test_missing_name_is_not_found(store: CredStash, name: str) -> None:
    with pytest.raises(SecretNotFoundError, match=name):
        await store.get(name)
    assert await store.latest_version(name) is None


async def test_credstash_library_reads_what_courier_writes(
    aws: AwsClients, store: CredStash, boto: Any, resources: Resources, name: str
) -> None:
    key = resources.credstash_key_arn
    assert await store.put(name, "courier-v1", kms_key=key, context=CONTEXT) == "1".zfill(19)
    assert await store.put(name, "courier-v2", kms_key=key, context=CONTEXT, digest="SHA512") == (
        "2".zfill(19)
    )
    assert "S" in (await raw_item(aws, name))["hmac"]
    assert library_get(boto, name, context=CONTEXT) == "courier-v2"
    assert library_get(boto, name, version="1", context=CONTEXT) == "courier-v1"
    with pytest.raises(credstash.KmsError):
        library_get(boto, name)


# --- the deployment's encryption context and CredStash key (settings) ------------------------


def secret_settings(table: str, environ: Mapping[str, str] | None = None, toml: str = "") -> Any:
    """SecretSettings as the daemon loads them: a TOML [secrets] section plus the environment."""
    from service.settings import load_settings

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(f'[secrets]\ntable = "{table}"\n{toml}')
    try:
        return load_settings(Path(handle.name), environ=dict(environ or {})).secrets
    finally:
        os.unlink(handle.name)


async def test_the_encryption_context_setting_reads_what_credstash_put_with_context(
    aws: AwsClients, cli_env: dict[str, str], table: str, name: str
) -> None:
    await run_cli(cli_env, "put", name, "scoped-value", "env=test", "app=courier")

    toml = secret_settings(table, toml='encryption_context = { env = "test", app = "courier" }\n')
    from_env = secret_settings(
        table, environ={"COURIER_SECRETS_ENCRYPTION_CONTEXT": "app=courier,env=test"}
    )
    assert dict(toml.encryption_context) == CONTEXT == dict(from_env.encryption_context)
    for settings in (toml, from_env):
        assert await CredStash.from_settings(aws.dynamodb, aws.kms, settings).get(name) == (
            "scoped-value"
        )

    without = CredStash.from_settings(aws.dynamodb, aws.kms, secret_settings(table))
    with pytest.raises(SecretIntegrityError, match="encryption context"):
        await without.get(name)


async def test_courier_secrets_get_uses_the_configured_context(
    cli_env: dict[str, str], moto_endpoint: str, table: str, name: str
) -> None:
    """What an operator sees: `courier secrets get` with the deployment's settings."""
    await run_cli(cli_env, "put", name, "cli-scoped", "env=test", "app=courier")
    env = {
        **cli_env,
        "COURIER_AWS_ENDPOINT_URL": moto_endpoint,
        "COURIER_SECRETS_TABLE": table,
        "COURIER_CONFIG": os.devnull,
    }

    def courier(extra: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "secrets", "get", name],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    scoped = courier({"COURIER_SECRETS_ENCRYPTION_CONTEXT": '{"env": "test", "app": "courier"}'})
    assert (scoped.returncode, scoped.stdout.strip()) == (0, "cli-scoped"), scoped.stderr
    unscoped = courier({})
    assert unscoped.returncode != 0
    assert "encryption context" in unscoped.stderr
    assert "cli-scoped" not in unscoped.stdout + unscoped.stderr


def test_encryption_context_setting_is_validated(table: str) -> None:
    from service.errors import SettingsError

    for bad in ("k", "=v", "aws:x=1", '{"k": 1}', '["k"]', "k=", "{"):
        with pytest.raises(SettingsError, match=r"secrets\.encryption_context"):
            secret_settings(table, environ={"COURIER_SECRETS_ENCRYPTION_CONTEXT": bad})
    with pytest.raises(SettingsError, match=r"secrets\.encryption_context"):
        secret_settings(table, toml="encryption_context = { k = 1 }\n")
    assert dict(secret_settings(table).encryption_context) == {}


@pytest.fixture(scope="module")
def foreign_key(boto: tuple[Any, Any]) -> str:
    """A KMS key that is not the CredStash key."""
    _, kms = boto
    return str(kms.create_key(Description="not the CredStash key")["KeyMetadata"]["Arn"])


async def test_a_secret_under_another_kms_key_is_refused(
    aws: AwsClients, boto: Any, table: str, name: str, foreign_key: str, resources: Resources
) -> None:
    library_put(boto, name, "foreign-value", version="1", kms_key=foreign_key)

    # The default is the credstash CLI's key, alias/credstash, resolved once with DescribeKey.
    by_alias = CredStash.from_settings(aws.dynamodb, aws.kms, secret_settings(table))
    by_arn = CredStash.from_settings(
        aws.dynamodb,
        aws.kms,
        secret_settings(table, toml=f'kms_key_id = "{resources.credstash_key_arn}"\n'),
    )
    for store in (by_alias, by_arn):
        with pytest.raises(SecretIntegrityError, match="not under the CredStash key") as caught:
            await store.get(name)
        assert foreign_key in str(caught.value)
        assert "foreign-value" not in str(caught.value)

    unchecked = CredStash.from_settings(
        aws.dynamodb, aws.kms, secret_settings(table, toml='kms_key_id = ""\n')
    )
    assert await unchecked.get(name) == "foreign-value"


async def test_a_secret_under_the_credstash_key_passes_the_key_check(
    aws: AwsClients, boto: Any, table: str, name: str
) -> None:
    library_put(boto, name, "own-value", version="1")  # credstash's default key alias/credstash
    from prometheus_client import REGISTRY

    def describe_calls() -> float:
        labels = {"service": "kms", "operation": "DescribeKey"}
        return REGISTRY.get_sample_value("courier_aws_requests_total", labels) or 0.0

    store = CredStash.from_settings(aws.dynamodb, aws.kms, secret_settings(table))
    before = describe_calls()
    assert await store.get(name) == "own-value"
    assert await store.get(name) == "own-value"
    assert describe_calls() - before == 1  # the alias is resolved once, then reused
