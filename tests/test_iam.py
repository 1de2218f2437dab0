"""courier end to end under the exact IAM policy terraform/iam.tf grants the instance role.

The policy is rendered from the Terraform (``courier_testkit.iam_policy``) with the ARNs of
this module's moto resources. moto runs in its own process with IAM enforcement
(``courier_testkit.iam_moto``): an administrator bootstraps the resources, and courier (API +
worker in one ``courier run`` process, and the ``courier replay`` / ``courier secrets`` CLIs)
signs with the access key of an IAM user holding the policy.

moto 5.2 enforces only part of a policy (actions for DynamoDB and KMS, actions and queue ARNs
for SQS, with batch operations under non-IAM names; no conditions), so it holds
``moto_projection(policy)``. Every call courier's key makes is recorded and checked against
the exact policy, resource by resource and with its encryption-context / leading-key
conditions: each test fails on a call the instance role would be refused in AWS, naming the
action and the resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session

from courier_testkit.courier import CourierProcess, courier_process
from courier_testkit.hcl_expressions import (
    Definitions,
    ExpressionError,
    Scope,
    evaluate_expression,
)
from courier_testkit.iam_moto import Credentials, IamMoto, iam_moto
from courier_testkit.iam_policy import (
    AccessRequest,
    AwsAccount,
    ParserUnavailable,
    RecordedCall,
    UnevaluableCondition,
    actions_used,
    evaluate,
    load_module,
    moto_projection,
    render_policy,
    unauthorised,
    without_action,
)
from courier_testkit.processes import HarnessError
from service.aws import AwsClients, open_client
from service.bootstrap import ResourceNames, Resources, bootstrap
from service.secrets.credstash import CredStash
from service.settings import AwsSettings, FrozenMap, Settings, load_settings
from service.stubs import IdmStub, LegacyStub
from tests.chain import Chain, chain_settings, mailbox, run_cli, serving_stubs
from tests.conftest import DEMO_SECRETS

pytestmark = pytest.mark.timeout(180)

REGION = "us-east-1"
DEPLOYMENT = "courier-iam"  # var.name
CRM_SECRET = "courier.crm.token"
SECRETS = {**DEMO_SECRETS, CRM_SECRET: "crm-token-for-the-iam-test"}
# var.credstash_encryption_context = secrets.encryption_context; the secrets are stored with it.
CONTEXT = {"app": "courier", "deployment": DEPLOYMENT}
# What courier needs at run time: a chain in which one of these is never called has lost
# its coverage (e.g. the recorder stopped seeing calls), which must fail too.
NEEDED_ACTIONS = {
    "sqs:SendMessage",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
    "dynamodb:Query",
    "dynamodb:BatchWriteItem",
    "dynamodb:UpdateItem",
    "dynamodb:PutItem",  # the claim of a request sent with an Idempotency-Key
    "dynamodb:GetItem",  # GET /v1/requests/{id}
    "kms:GenerateDataKey",
    "kms:Decrypt",
}


@dataclass
class IamChain:
    """courier running as the instance role's IAM user, and what the checks need."""

    moto: IamMoto
    courier_key: Credentials
    policy: dict[str, Any]
    account: AwsAccount
    chain: Chain
    courier: CourierProcess
    directory: Path
    described: dict[str, Any]  # ARNs and key schemas of the resources (see _describe)
    targets: list[dict[str, str]]  # var.targets

    def render(self, context: Mapping[str, str]) -> dict[str, Any]:
        """The instance policy for this chain with another credstash_encryption_context."""
        return _render(self.chain.resources, self.described, context, self.targets)

    async def calls(self, since: int = 0) -> list[RecordedCall]:
        """The AWS calls courier's key made, from the ``since``-th on."""
        return (await self.moto.calls(self.courier_key))[since:]

    async def mark(self) -> int:
        """How many calls courier's key has made so far (for ``calls(since=...)``)."""
        return len(await self.calls())

    async def assert_granted(self, since: int = 0) -> list[RecordedCall]:
        """Fail, naming action and resource, on any call the exact policy does not allow."""
        calls = await self.calls(since)
        problem = refused_calls(self.policy, calls, self.account)
        assert not problem, problem
        return calls

    @contextlib.asynccontextmanager
    async def granted(self) -> AsyncIterator[None]:
        """Check the calls made inside; when the body fails, a refused call is the reason given.

        A call AWS would refuse usually shows as something stuck or an error later on; the
        permission is the cause worth reading first.
        """
        since = await self.mark()
        try:
            yield
        except Exception:
            await self.assert_granted(since)
            raise
        await self.assert_granted(since)

    async def wait_status(self, request_id: str, wanted: str, timeout: float = 30) -> None:
        """Poll the API until ``request_id`` is ``wanted``; fail at once on a refused call."""
        deadline = time.monotonic() + timeout
        while True:
            document = await self.chain.status(request_id)
            if document["status"] == wanted:
                return
            await self.assert_granted()
            assert time.monotonic() < deadline, f"{request_id} stuck at {document}"
            await asyncio.sleep(0.25)

    async def cli(self, *args: str) -> tuple[int, str]:
        """``python -m service --config <chain settings> <args>`` signing as courier's user."""
        return await run_cli(
            self.chain.settings,
            self.directory,
            *args,
            env=_child_env(self.courier_key),
            timeout=60,
        )


def refused_calls(
    policy: Mapping[str, Any], calls: Sequence[RecordedCall], account: AwsAccount
) -> str:
    """A message naming every call ``policy`` does not allow ('' when there is none)."""
    violations = unauthorised(policy, calls, account)
    if not violations:
        return ""
    return "courier made AWS calls the instance role (terraform/iam.tf) does not allow:\n  " + (
        "\n  ".join(str(v) for v in violations)
    )


def _child_env(key: Credentials) -> dict[str, str]:
    from courier_testkit.processes import python_env

    return python_env(key.env())


# --------------------------------------------------------------------------------------
# Setup: moto with IAM, resources, the rendered policy, the courier user, courier itself
# --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_clients(moto: IamMoto, settings: AwsSettings) -> AsyncIterator[AwsClients]:
    """SQS, DynamoDB and KMS clients signing as the administrator."""
    session = get_session()
    session.set_credentials(moto.admin.access_key_id, moto.admin.secret_access_key)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(name, settings, session=session))
            for name in ("sqs", "dynamodb", "kms")
        ]
        yield AwsClients(*clients)


async def _describe(admin: AwsClients, resources: Resources) -> dict[str, Any]:
    """ARNs and key schemas of the bootstrapped resources, as the policy and checks need them."""
    arns = {}
    for name, url in (("work", resources.queue_url), ("dlq", resources.dlq_url)):
        found = await admin.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        arns[name] = found["Attributes"]["QueueArn"]
    tables = {}
    for table in (resources.status_table, resources.secrets_table):
        described = (await admin.dynamodb.describe_table(TableName=table))["Table"]
        partition = next(
            k["AttributeName"] for k in described["KeySchema"] if k["KeyType"] == "HASH"
        )
        tables[described["TableArn"]] = partition
    key_arns: dict[str, str] = {}
    for alias, arn in (
        ("alias/courier-iam", resources.data_key_arn),
        ("alias/credstash", resources.credstash_key_arn),
    ):
        metadata = (await admin.kms.describe_key(KeyId=arn))["KeyMetadata"]
        account_and_region = arn.split(":key/")[0]
        for name in (arn, metadata["KeyId"], alias, f"{account_and_region}:{alias}"):
            key_arns[name] = arn
    account_id = arns["work"].split(":")[4]
    return {"queues": arns, "tables": tables, "key_arns": key_arns, "account_id": account_id}


def _refs(resources: Resources, described: Mapping[str, Any]) -> dict[str, Any]:
    """Values of the Terraform references iam.tf's instance policy uses, for this chain."""
    account = described["account_id"]
    status_arn = next(
        arn for arn in described["tables"] if arn.endswith(f"/{resources.status_table}")
    )
    return {
        "aws_sqs_queue.work.arn": described["queues"]["work"],
        "aws_sqs_queue.dlq.arn": described["queues"]["dlq"],
        "aws_dynamodb_table.status.arn": status_arn,
        "aws_kms_key.data.arn": resources.data_key_arn,
        # A conditional in iam.tf (an existing key or the one it creates): the test's key.
        "local.credstash_key_arn": resources.credstash_key_arn,
        "data.aws_caller_identity.current.account_id": account,
        "data.aws_partition.current.partition": "aws",
        "data.aws_region.current.name": REGION,
        "aws_cloudwatch_log_group.courier.arn": (
            f"arn:aws:logs:{REGION}:{account}:log-group:/courier/{DEPLOYMENT}"
        ),
    }


def _variables(
    resources: Resources, context: Mapping[str, str], targets: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """The module's input variables as this chain's deployment would set them."""
    return {
        "name": DEPLOYMENT,
        "credstash_table_name": resources.secrets_table,
        "credstash_encryption_context": dict(context),
        "jwt_hs256_secret": "courier.jwt.hs256",
        "idm_api_key_secret": "courier.idm.api_key",
        "targets": [dict(target) for target in targets],
    }


def _render(
    resources: Resources,
    described: Mapping[str, Any],
    context: Mapping[str, str],
    targets: Sequence[Mapping[str, str]],
) -> dict[str, Any]:
    """terraform/iam.tf's instance policy with this chain's resources and variables."""
    try:
        module = load_module()
    except ParserUnavailable as exc:
        pytest.skip(str(exc))
    return render_policy(
        module,
        "instance",
        refs=_refs(resources, described),
        variables=_variables(resources, context, targets),
    )


def _targets_variable(settings: Settings) -> list[dict[str, str]]:
    """var.targets as the deployment would set it for these settings."""
    return [
        {"name": t.name, "url": t.url, "format": t.format, "secret": t.secret}
        for t in settings.targets
    ]


async def _store_secrets(admin: AwsClients, resources: Resources) -> None:
    """The chain's secrets, put as an operator would: under the deployment's context."""
    store = CredStash(admin.dynamodb, admin.kms, resources.secrets_table)
    for name, value in SECRETS.items():
        await store.put(name, value, kms_key=resources.credstash_key_arn, context=CONTEXT)


@contextlib.asynccontextmanager
async def running_under_iam() -> AsyncIterator[IamChain]:
    """Everything of ``IamChain``, torn down in reverse on exit."""
    async with contextlib.AsyncExitStack() as stack:
        moto = await stack.enter_async_context(iam_moto(REGION))
        aws = AwsSettings(region=REGION, endpoint_url=moto.url, read_timeout_seconds=25)
        admin = await stack.enter_async_context(admin_clients(moto, aws))
        resources = await bootstrap(admin, ResourceNames(prefix=DEPLOYMENT))
        await _store_secrets(admin, resources)
        described = await _describe(admin, resources)
        idm = IdmStub(api_key=SECRETS["courier.idm.api_key"])
        idm_url = await stack.enter_async_context(idm.serving())
        crm = LegacyStub(name="crm", token=SECRETS[CRM_SECRET])
        stubs = await stack.enter_async_context(serving_stubs({"crm": crm}))
        base = resources.apply_to(load_settings(environ={}).replace(aws=aws))
        base = base.replace(
            secrets=dataclasses.replace(
                base.secrets,
                encryption_context=FrozenMap(CONTEXT),
                kms_key_id=resources.credstash_key_arn,
            )
        )
        settings = chain_settings(
            base,
            idm_url,
            {name: stub.url for name, stub in stubs.items()},
            target_overrides={"crm": {"secret": CRM_SECRET}},
        )
        targets = _targets_variable(settings)
        policy = _render(resources, described, CONTEXT, targets)
        key = await moto.create_user("courier-instance", moto_projection(policy))
        account = AwsAccount(described["account_id"], described["key_arns"], described["tables"])
        try:
            courier = await stack.enter_async_context(courier_process(settings, env=key.env()))
        except HarnessError:  # not ready: a refused secret read or readiness probe says why
            problem = refused_calls(policy, await moto.calls(key), account)
            assert not problem, problem
            raise
        http = await stack.enter_async_context(aiohttp.ClientSession())
        chain = Chain(courier.url, settings, resources, admin, http, idm, stubs)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="courier-iam-")))
        yield IamChain(moto, key, policy, account, chain, courier, directory, described, targets)


@pytest.fixture(scope="module")
async def iam() -> AsyncIterator[IamChain]:
    async with running_under_iam() as running:
        yield running


async def _post(chain: Chain, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {chain.token()}", "Idempotency-Key": key}
    async with chain.http.post(f"{chain.url}/v1/mailboxes", json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


# --------------------------------------------------------------------------------------
# The chain under the policy
# --------------------------------------------------------------------------------------


async def test_startup_and_accepted_requests_need_only_granted_permissions(iam: IamChain) -> None:
    """Secrets prefetch, readiness, create-mailbox through to every target: all allowed."""
    await iam.assert_granted()  # from startup on: secret reads, readiness, the idle worker
    async with iam.granted():
        since = await iam.mark()
        ids = [await iam.chain.create(mailbox(index)) for index in range(4)]
        for request_id in ids:
            await iam.wait_status(request_id, "completed")
        for stub in iam.chain.targets.values():
            assert {f"{request_id}:{stub.name}" for request_id in ids} <= set(stub.effects)
    calls = await iam.calls(since)
    assert {"sqs:SendMessage", "sqs:DeleteMessage"} <= actions_used(calls, iam.account)


async def test_poison_message_is_dead_lettered_and_replayed_with_granted_permissions(
    iam: IamChain,
) -> None:
    """A target answering 400: DLQ; then ``courier replay`` (as the instance role) re-runs it."""
    directory = iam.chain.targets["directory"]
    dlq_url = iam.chain.resources.dlq_url
    async with iam.granted():
        directory.behaviour.fixed_status = 400
        try:
            request_id = await iam.chain.create(mailbox(100))
            await iam.wait_status(request_id, "failed")
            assert await iam.chain.queue_depth(dlq_url) == 1
        finally:
            directory.behaviour.fixed_status = 0
        code, output = await iam.cli("replay", "--rate", "50")
        assert code == 0, output
        await iam.wait_status(request_id, "completed")
        assert await iam.chain.queue_depth(dlq_url) == 0


async def test_secret_read_by_the_cli_needs_only_granted_permissions(iam: IamChain) -> None:
    """``courier secrets get`` on the instance: the CredStash read the role allows."""
    async with iam.granted():
        since = await iam.mark()
        code, output = await iam.cli("secrets", "get", CRM_SECRET)  # secrets.encryption_context
        assert code == 0, output
        assert SECRETS[CRM_SECRET] in output
    calls = await iam.calls(since)
    assert {"dynamodb:Query", "kms:Decrypt"} <= actions_used(calls, iam.account)


async def test_refused_send_to_sqs_needs_only_granted_permissions(iam: IamChain) -> None:
    """SQS refuses the API's send: 503, and whatever courier does about it is allowed; the
    client's retry with the same Idempotency-Key is then accepted and completed."""
    key = f"iam-send-{uuid.uuid4().hex}"
    async with iam.granted():
        await iam.moto.fail_next(
            iam.courier_key, ["SendMessage", "SendMessageBatch"], count=10, status=500
        )
        try:
            status, document = await _post(iam.chain, mailbox(200), key)
        finally:
            await iam.moto.clear_faults()
        await asyncio.sleep(0.5)  # whatever follows the refusal (cleanup, marks) has been sent
        await iam.assert_granted()
        assert status == 503, document
        status, document = await _post(iam.chain, mailbox(200), key)
        assert status == 202, document
        await iam.wait_status(document["request_id"], "completed")


async def test_every_call_of_the_run_is_granted_and_courier_needs_what_it_is_granted(
    iam: IamChain,
) -> None:
    """The whole run's record: nothing refused, and the core actions were all exercised."""
    async with iam.granted():  # requests of its own, so that it also runs alone
        await iam.wait_status(await iam.chain.create(mailbox(300)), "completed")
        status, document = await _post(iam.chain, mailbox(301), f"iam-all-{uuid.uuid4().hex}")
        assert status == 202, document
        await iam.wait_status(document["request_id"], "completed")
    calls = await iam.assert_granted()
    used = actions_used(calls, iam.account)
    assert used >= NEEDED_ACTIONS, f"never called: {sorted(NEEDED_ACTIONS - used)}"
    assert not [c for c in calls if c.status == 403], "moto refused a call courier made"


# --------------------------------------------------------------------------------------
# The check itself fails when a permission is missing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "resource_part"),
    [
        ("sqs:DeleteMessage", ":sqs:"),
        ("dynamodb:UpdateItem", ":table/courier-iam-status"),
        ("dynamodb:BatchWriteItem", ":table/courier-iam-status"),
        ("dynamodb:PutItem", ":table/courier-iam-status"),
        ("dynamodb:GetItem", ":table/courier-iam-status"),
        ("kms:GenerateDataKey", ":key/"),
        ("dynamodb:Query", ":table/credential-store"),
    ],
)
async def test_a_missing_permission_fails_naming_action_and_resource(
    iam: IamChain, action: str, resource_part: str
) -> None:
    calls = await iam.calls()
    violations = unauthorised(without_action(iam.policy, action), calls, iam.account)
    messages = [str(v) for v in violations if v.request.action == action]
    assert messages, f"dropping {action} from the policy went unnoticed"
    assert all(m.startswith(f"{action} on arn:aws:") for m in messages), messages
    assert any(resource_part in m for m in messages), messages


async def test_credstash_decrypt_is_bound_to_the_deployment_encryption_context(
    iam: IamChain,
) -> None:
    """Only exactly the deployment's context decrypts CredStash keys; none without one."""
    key = iam.chain.resources.credstash_key_arn
    assert _decrypt(iam.policy, key, CONTEXT)
    assert not _decrypt(iam.policy, key, {**CONTEXT, "app": "other"})
    assert not _decrypt(iam.policy, key, {"app": "courier"})
    assert not _decrypt(iam.policy, key, {**CONTEXT, "extra": "x"})
    assert not _decrypt(iam.policy, key, {})
    unscoped = iam.render({})
    assert _decrypt(unscoped, key, {})
    assert not _decrypt(unscoped, key, CONTEXT)


def _decrypt(policy: Mapping[str, Any], key_arn: str, context: Mapping[str, str]) -> bool:
    request = AccessRequest(
        "kms:Decrypt",
        key_arn,
        {
            **{f"kms:encryptioncontext:{k}": (v,) for k, v in context.items()},
            **({"kms:encryptioncontextkeys": tuple(context)} if context else {}),
        },
        ("kms:encryptioncontext",),
    )
    return evaluate(policy, request).allowed


def test_moto_projection_keeps_actions_and_sqs_resources_only() -> None:
    """What moto is given: batch aliases for SQS, "*" elsewhere, no conditions, no Deny."""
    policy = {
        "Statement": [
            {"Effect": "Allow", "Action": ["sqs:SendMessage"], "Resource": ["arn:aws:sqs:r:1:q"]},
            {
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": ["arn:aws:kms:r:1:key/k"],
                "Condition": {"StringEquals": {"kms:EncryptionContext:a": ["b"]}},
            },
            {"Effect": "Deny", "Action": ["kms:Decrypt"], "Resource": "*"},
        ]
    }
    projected = moto_projection(policy)["Statement"]
    assert projected == [
        {
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:SendMessageBatch"],
            "Resource": ["arn:aws:sqs:r:1:q"],
        },
        {"Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": "*"},
    ]


# --------------------------------------------------------------------------------------
# The renderer and the evaluator on their own
# --------------------------------------------------------------------------------------


async def test_previous_data_keys_are_decrypt_only(iam: IamChain) -> None:
    """envelope_accepted_key_arns (a dynamic statement): Decrypt on the old key, nothing more."""
    old_key = f"arn:aws:kms:{REGION}:{iam.account.account_id}:key/previous"
    assert not evaluate(iam.policy, AccessRequest("kms:Decrypt", old_key)).allowed
    resources = iam.chain.resources
    refs_policy = render_policy(
        load_module(),
        "instance",
        refs=_refs(resources, iam.described),
        variables={
            **_variables(resources, CONTEXT, iam.targets),
            "envelope_accepted_key_arns": [old_key],
        },
    )
    assert evaluate(refs_policy, AccessRequest("kms:Decrypt", old_key)).allowed
    assert not evaluate(refs_policy, AccessRequest("kms:GenerateDataKey", old_key)).allowed


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ('length(var.m) > 0 ? keys(var.m) : ["true"]', ["a", "b"]),
        ('length(var.none) > 0 ? "ForAllValues:StringEquals" : "Null"', "Null"),
        ('distinct(compact(concat([var.s, ""], [for t in var.ts : t.secret])))', ["x", "y"]),
        ('{for k, v in var.m : k => upper(v) if k != "a"}', {"b": "2"}),
        ('"${var.s}-status"', "x-status"),
        ("coalesce(null, var.s)", "x"),
        ("aws_kms_key.credstash[0].arn", "key-arn"),
        ('!(1 + 2 * 3 == 7) || var.m["a"] == "1"', True),
        ("try(var.m.missing, 5)", 5),
        ("local.name_status", "x-status"),
    ],
)
def test_terraform_expressions_are_evaluated(expression: str, value: Any) -> None:
    definitions = Definitions(
        locals={"name_status": "${var.s}-status"},
        variables={"s": {"default": "x"}, "none": {"default": {}}},
    )
    scope = Scope(
        definitions,
        refs={"aws_kms_key.credstash[0].arn": "key-arn"},
        variables={"m": {"b": "2", "a": "1"}, "ts": [{"secret": "y"}, {"secret": "x"}]},
    )
    assert evaluate_expression(expression, scope) == value


def test_an_expression_the_renderer_cannot_evaluate_is_named() -> None:
    scope = Scope(Definitions(), refs={}, variables={})
    with pytest.raises(ExpressionError, match=r"aws_sqs_queue\.work\.arn"):
        evaluate_expression("aws_sqs_queue.work.arn", scope)
    with pytest.raises(ExpressionError, match=r"cidrsubnet\(\) is not supported"):
        evaluate_expression('cidrsubnet("10.0.0.0/16", 8, 1)', scope)


POLICY = {
    "Statement": [
        {
            "Sid": "Read",
            "Effect": "Allow",
            "Action": ["dynamodb:Get*", "dynamodb:Query"],
            "Resource": "arn:aws:dynamodb:r:1:table/t",
            "Condition": {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["a", "b"]}},
        },
        {
            "Sid": "Decrypt",
            "Effect": "Allow",
            "Action": "kms:Decrypt",
            "Resource": "arn:aws:kms:r:1:key/*",
            "Condition": {"Null": {"kms:EncryptionContextKeys": "true"}},
        },
        {"Sid": "NoOther", "Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*key/deny"},
    ]
}
TABLE = "arn:aws:dynamodb:r:1:table/t"
DDB = ("dynamodb:leadingkeys",)
KMS = ("kms:encryptioncontext",)


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (AccessRequest("dynamodb:GetItem", TABLE, {"dynamodb:leadingkeys": ("a",)}, DDB), True),
        (AccessRequest("DynamoDB:getitem", TABLE, {"dynamodb:leadingkeys": ("a",)}, DDB), True),
        (AccessRequest("dynamodb:Query", TABLE, {"dynamodb:leadingkeys": ("c",)}, DDB), False),
        (
            AccessRequest("dynamodb:Query", TABLE + "2", {"dynamodb:leadingkeys": ("a",)}, DDB),
            False,
        ),
        (AccessRequest("dynamodb:Query", TABLE, {}, DDB), True),  # ForAllValues: vacuous
        (AccessRequest("dynamodb:PutItem", TABLE, {"dynamodb:leadingkeys": ("a",)}, DDB), False),
        (AccessRequest("kms:Decrypt", "arn:aws:kms:r:1:key/k", {}, KMS), True),
        (
            AccessRequest(
                "kms:Decrypt", "arn:aws:kms:r:1:key/k", {"kms:encryptioncontextkeys": ("a",)}, KMS
            ),
            False,
        ),
        (AccessRequest("kms:Decrypt", "arn:aws:kms:r:1:key/deny", {}, KMS), False),
    ],
)
def test_the_evaluator_decides_as_iam_does(request_: AccessRequest, allowed: bool) -> None:
    assert evaluate(POLICY, request_).allowed is allowed


def test_a_condition_the_evaluator_cannot_decide_fails_loudly() -> None:
    policy = {
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:SourceVpc": "vpc-1"}},
            }
        ]
    }
    with pytest.raises(UnevaluableCondition, match="aws:SourceVpc"):
        evaluate(policy, AccessRequest("kms:Decrypt", "arn:aws:kms:r:1:key/k", {}, KMS))
