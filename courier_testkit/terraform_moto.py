"""``terraform apply`` of terraform/examples/complete against moto, then plan, checks, destroy.

Run by ``make terraform-check`` (terraform/check.sh) as
``python -m courier_testkit.terraform_moto --plugin-dir <mirror>``. One cycle:

1. moto's server in a thread on 127.0.0.1, with AWS managed IAM policies loaded and the
   SQS ``RedriveAllowPolicy`` read-back and EC2's error for an unknown rule id patched in
   (moto's gaps, see ``patch_moto``);
2. the module's inputs created in moto with boto3: a VPC, subnets in two Availability
   Zones, an ACM certificate, an SNS topic, and one of moto's built-in EBS AMIs;
3. a copy of terraform/ in a temporary directory, with an override file pointing every
   AWS service the module uses at moto, and the inputs as a tfvars file;
4. ``terraform init`` (offline, from the provider mirror), ``apply``: exactly
   ``EXPECTED_CREATED`` resources;
5. a second ``plan``: its changes must be exactly ``KNOWN_DRIFT``, attributes moto reads
   back differently from what it was sent, so a new drift from courier's own code fails;
6. boto3 checks that what exists is what was intended (``verify_deployment``);
7. ``terraform destroy``, then checks that nothing of courier's is left.

Every terraform command has a timeout (provider waiters can hang on an emulator's gap);
on expiry its whole process group is killed. The exit status is 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parents[1]
TERRAFORM_DIR = REPO / "terraform"
EXAMPLE = Path("examples/complete")
REGION = "eu-west-1"
# moto accepts any credentials; the provider only needs something to sign with.
FAKE_KEY = "courier-terraform-check"

# Every AWS API the module calls (autoscaling, cloudwatch, dynamodb, ec2, elbv2, iam, kms,
# logs, s3, sqs; wafv2 with a web ACL; sts for the provider's GetCallerIdentity, which must
# stay on: see terraform/README.md), plus the ones its inputs live in (acm, sns) and two it
# might reach (elb, ssm): none of them may go to real AWS.
SERVICES = (
    "acm",
    "autoscaling",
    "cloudwatch",
    "dynamodb",
    "ec2",
    "elb",
    "elbv2",
    "iam",
    "kms",
    "logs",
    "s3",
    "sns",
    "sqs",
    "ssm",
    "sts",
    "wafv2",
)

# terraform/examples/complete with its defaults: `terraform state list` after apply.
EXPECTED_CREATED = 57

_M = "module.courier."
# (resource address, top-level attribute, "changed" or "unknown") of every change the plan
# after apply shows ("12 to change"), each because moto reads back something other than
# what it was sent. "unknown" (a value known only at apply) is accepted only where it is
# listed so; a listed attribute whose new value is known and different fails. (A document
# that is unknown as a whole, like the policies below, cannot be compared here at all.)
# Anything else in that plan is a drift of courier's own and fails the check.
KNOWN_DRIFT: frozenset[tuple[str, str, str]] = frozenset(
    {
        # moto reads back: no warm-up (0), a null capacity reservation preference ("" sent),
        # policies disabled, an empty predictive scaling block, rotation period 0, an extra
        # "launch-template" tag specification, the redrive JSON re-serialised (whitespace),
        # and no description on rules that reference a security group.
        (_M + "aws_autoscaling_group.courier", "default_instance_warmup", "changed"),
        (_M + "aws_autoscaling_group.courier", "capacity_reservation_specification", "changed"),
        (_M + "aws_autoscaling_policy.queue_backlog", "enabled", "changed"),
        (
            _M + "aws_autoscaling_policy.queue_backlog",
            "predictive_scaling_configuration",
            "changed",
        ),
        (_M + "aws_autoscaling_policy.request_count", "enabled", "changed"),
        (
            _M + "aws_autoscaling_policy.request_count",
            "predictive_scaling_configuration",
            "changed",
        ),
        (_M + "aws_kms_key.credstash[0]", "rotation_period_in_days", "changed"),
        (_M + "aws_kms_key.data", "rotation_period_in_days", "changed"),
        (_M + "aws_launch_template.courier", "tag_specifications", "changed"),
        (_M + "aws_sqs_queue.work", "redrive_policy", "changed"),
        (_M + "aws_vpc_security_group_egress_rule.alb_to_instances", "description", "changed"),
        (_M + "aws_vpc_security_group_ingress_rule.instance_from_alb", "description", "changed"),
        # Knock-on, unknown until apply: the tag specification change makes a new launch
        # template version, which the group pins; the policy documents naming the keys and
        # queues above are read again at apply time.
        (_M + "aws_launch_template.courier", "default_version", "unknown"),
        (_M + "aws_launch_template.courier", "latest_version", "unknown"),
        (_M + "aws_autoscaling_group.courier", "launch_template", "unknown"),
        (_M + "aws_iam_role_policy.instance", "policy", "unknown"),
        (_M + 'aws_sqs_queue_policy.tls_only["dlq"]', "policy", "unknown"),
        (_M + 'aws_sqs_queue_policy.tls_only["work"]', "policy", "unknown"),
    }
)

# How long terraform gets to stop after SIGINT, and the group after SIGKILL.
STOP_GRACE_SECONDS = 15.0
TIMEOUTS = {"init": 120.0, "apply": 600.0, "plan": 300.0, "show": 120.0, "destroy": 600.0}


class CheckFailed(Exception):
    """A step of the cycle found something other than what was intended."""


# --------------------------------------------------------------------------------------------
# moto
# --------------------------------------------------------------------------------------------


def patch_moto() -> None:
    """Close the two gaps of moto's that a terraform apply/destroy cycle falls into."""
    _return_redrive_allow_policy()
    _reject_unknown_rule_ids_as_aws_does()


def _return_redrive_allow_policy() -> None:
    """Make moto's SQS return the ``RedriveAllowPolicy`` it stores.

    moto keeps the attribute when it is set but never lists it in GetQueueAttributes, so
    the provider's waiter for ``aws_sqs_queue_redrive_allow_policy`` polls until it times
    out. Add it to the attributes moto returns; absent (None) or cleared ("", as the
    provider's delete sends) means not returned, as in SQS.
    """
    from moto.sqs import models

    # Any: the patch adds what moto's own types do not declare.
    queue: Any = models.Queue
    if "RedriveAllowPolicy" in queue.BASE_ATTRIBUTES:
        return
    queue.BASE_ATTRIBUTES.append("RedriveAllowPolicy")
    queue.redrive_allow_policy = None
    original = queue.attributes.fget

    def attributes(self: Any) -> dict[str, Any]:
        result: dict[str, Any] = original(self)
        if result.get("RedriveAllowPolicy") in (None, ""):
            result.pop("RedriveAllowPolicy", None)
        return result

    queue.attributes = property(attributes)


def _reject_unknown_rule_ids_as_aws_does() -> None:
    """Revoking a security group rule by an id the group lacks: AWS's error code, not moto's.

    EC2 answers ``InvalidSecurityGroupRuleId.NotFound``, which the provider's delete of
    ``aws_vpc_security_group_{ingress,egress}_rule`` takes as "already gone". moto answers
    ``InvalidPermission.NotFound``. CI saw that fail ``terraform destroy`` on a rule that was
    already gone, most likely because the SDK retried a revoke whose first attempt had
    reached moto.
    """
    from moto.ec2.models.security_groups import SecurityGroupBackend

    backend: Any = SecurityGroupBackend
    rules_of = {f"revoke_security_group_{d}": f"{d}_rules" for d in ("ingress", "egress")}
    wrapped = {
        name: _checking_rule_ids(getattr(backend, name), rules)
        for name, rules in rules_of.items()
        if not getattr(getattr(backend, name), "checks_rule_ids", False)
    }
    for name, revoke in wrapped.items():  # only once both could be wrapped
        setattr(backend, name, revoke)


def _checking_rule_ids(revoke: Any, rules: str) -> Any:
    """moto's ``revoke``, first raising EC2's error for an id not in the group's ``rules``."""
    import inspect

    from moto.ec2.exceptions import InvalidSecurityGroupRuleIdNotFoundError

    signature = inspect.signature(revoke)
    missing = {"group_name_or_id", "security_rule_ids", "vpc_id"} - set(signature.parameters)
    if missing:  # moto changed its backend: say so here, not as a 500 in the middle of a destroy
        raise CheckFailed(f"moto's {revoke.__qualname__} has no {sorted(missing)} any more")

    @functools.wraps(revoke)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs).arguments
        group = self.get_security_group_by_name_or_id(call["group_name_or_id"], call.get("vpc_id"))
        if group is not None:
            known = {rule.id for rule in getattr(group, rules)}
            for rule_id in call.get("security_rule_ids") or ():
                if rule_id not in known:
                    raise InvalidSecurityGroupRuleIdNotFoundError(rule_id)
        return revoke(self, *args, **kwargs)

    checked.checks_rule_ids = True  # type: ignore[attr-defined]
    return checked


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto on a free loopback port, set up for the module; yields its endpoint URL."""
    # Read when moto creates its IAM backend: AmazonSSMManagedInstanceCore must exist, or
    # the role policy attachment fails with NoSuchEntity.
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    patch_moto()
    from service.local import EmbeddedAws

    with EmbeddedAws() as aws:
        yield aws.endpoint_url


def client(endpoint: str, service: str) -> Any:
    """A boto3 client of ``service`` talking to moto."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=FAKE_KEY,
        aws_secret_access_key=FAKE_KEY,
    )


@dataclass(frozen=True)
class Inputs:
    """What the module expects to exist already: the example's required variables."""

    vpc_id: str
    alb_subnet_ids: list[str]
    private_subnet_ids: list[str]
    certificate_arn: str
    alarm_sns_topic_arn: str
    ami_id: str

    def tfvars(self) -> dict[str, Any]:
        """The example's variables, with deletion protection off so destroy can run."""
        return {
            "region": REGION,
            "vpc_id": self.vpc_id,
            "alb_subnet_ids": self.alb_subnet_ids,
            "private_subnet_ids": self.private_subnet_ids,
            "certificate_arn": self.certificate_arn,
            "alarm_sns_topic_arn": self.alarm_sns_topic_arn,
            "ami_id": self.ami_id,
            "deletion_protection": False,
        }


def create_inputs(endpoint: str) -> Inputs:
    """Create the VPC, subnets (two AZs, public and private), certificate and topic."""
    ec2 = client(endpoint, "ec2")
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets: dict[str, list[str]] = {"public": [], "private": []}
    for index, (kind, zone) in enumerate(
        [("public", "a"), ("public", "b"), ("private", "a"), ("private", "b")]
    ):
        subnet = ec2.create_subnet(
            VpcId=vpc_id, CidrBlock=f"10.0.{index}.0/24", AvailabilityZone=f"{REGION}{zone}"
        )["Subnet"]
        subnets[kind].append(subnet["SubnetId"])
    certificate_arn = client(endpoint, "acm").request_certificate(
        DomainName="courier.example.net", ValidationMethod="DNS"
    )["CertificateArn"]
    topic_arn = client(endpoint, "sns").create_topic(Name="courier-alarms")["TopicArn"]
    return Inputs(
        vpc_id=vpc_id,
        alb_subnet_ids=subnets["public"],
        private_subnet_ids=subnets["private"],
        certificate_arn=certificate_arn,
        alarm_sns_topic_arn=topic_arn,
        ami_id=builtin_ebs_ami(ec2),
    )


def builtin_ebs_ami(ec2: Any) -> str:
    """One of moto's built-in EBS-backed x86_64 AMIs with a root block device.

    Not a registered image: moto's ``register_image`` ignores block device mappings, and
    the launch template reads the root device name from the AMI.
    """
    images = ec2.describe_images(
        Owners=["amazon"],
        Filters=[
            {"Name": "root-device-type", "Values": ["ebs"]},
            {"Name": "architecture", "Values": ["x86_64"]},
            {"Name": "virtualization-type", "Values": ["hvm"]},
        ],
    )["Images"]
    for image in sorted(images, key=lambda i: i["ImageId"]):
        if image.get("BlockDeviceMappings") and re.fullmatch(
            r"ami-[0-9a-f]{8,17}", image["ImageId"]
        ):
            return str(image["ImageId"])
    raise CheckFailed("moto has no built-in EBS-backed x86_64 AMI")


# --------------------------------------------------------------------------------------------
# Terraform
# --------------------------------------------------------------------------------------------


def prepare_workspace(work: Path, endpoint: str, inputs: Inputs) -> Path:
    """Copy terraform/ into ``work``; returns the example's directory, pointed at moto."""
    shutil.copytree(
        TERRAFORM_DIR,
        work,
        ignore=shutil.ignore_patterns(
            ".terraform", "*.tfstate*", ".terraform.lock.hcl", "*.tfvars", "*.tfvars.json"
        ),
        dirs_exist_ok=True,
    )
    example = work / EXAMPLE
    provider = {
        "access_key": FAKE_KEY,
        "secret_key": FAKE_KEY,
        "skip_credentials_validation": True,
        "skip_metadata_api_check": True,
        "skip_region_validation": True,
        "s3_use_path_style": True,
        "endpoints": {service: endpoint for service in SERVICES},
    }
    # An override file merges into the example's provider block (region, default_tags stay).
    (example / "moto_override.tf.json").write_text(
        json.dumps({"provider": {"aws": provider}}, indent=2)
    )
    (example / "moto.auto.tfvars.json").write_text(json.dumps(inputs.tfvars(), indent=2))
    return example


def terraform_env() -> dict[str, str]:
    """The environment terraform runs in: offline, non-interactive, no stray AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1", TF_INPUT="0")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    config = env.get("TF_CLI_CONFIG_FILE")
    if config and not Path(config).exists():
        del env["TF_CLI_CONFIG_FILE"]
    return env


def run_terraform(
    args: list[str], cwd: Path, timeout: float, ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``terraform ARGS`` in ``cwd``; kill its process group after ``timeout`` seconds."""
    command = ["terraform", *args, "-no-color"]
    process = subprocess.Popen(  # noqa: S603 - terraform with our own arguments
        command,
        cwd=cwd,
        env=terraform_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = stop_group(process)
        raise CheckFailed(
            f"terraform {args[0]} did not finish in {timeout:.0f} s (killed)\n"
            f"{tail(stdout)}\n{tail(stderr)}"
        ) from None
    except BaseException:
        # Ctrl-C, or SIGTERM from an outer timeout (see main): terraform runs in a session
        # of its own, so nothing else would stop it.
        stop_group(process)
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode not in ok_codes:
        raise CheckFailed(
            f"terraform {args[0]} exited {result.returncode}\n{tail(stdout)}\n{tail(stderr)}"
        )
    return result


def stop_group(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Interrupt terraform (it stops its providers), then kill whatever is left of the group."""
    output = ("", "")
    for sig in (signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            output = process.communicate(timeout=STOP_GRACE_SECONDS)
            break
        except subprocess.TimeoutExpired:
            continue
    # A provider that outlived terraform is still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return output


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``: terraform's error is at the end."""
    return "\n".join(text.strip().splitlines()[-lines:])


def show_json(example: Path, *target: str) -> dict[str, Any]:
    """``terraform show -json`` of the state, or of a saved plan."""
    result = run_terraform(["show", "-json", *target], example, TIMEOUTS["show"])
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@dataclass(frozen=True)
class Resource:
    """One managed resource of the state: its type and attribute values."""

    type: str
    values: dict[str, Any]


def state_resources(state: Mapping[str, Any]) -> dict[str, Resource]:
    """Managed resources of a ``show -json`` state, by address."""
    found: dict[str, Resource] = {}

    def walk(module: Mapping[str, Any]) -> None:
        for resource in module.get("resources", []):
            if resource.get("mode") == "managed":
                found[resource["address"]] = Resource(resource["type"], resource["values"])
        for child in module.get("child_modules", []):
            walk(child)

    walk(state.get("values", {}).get("root_module", {}))
    return found


def has_unknown(marks: Any) -> bool:
    """Whether an ``after_unknown`` entry marks any part of the value unknown."""
    if isinstance(marks, dict):
        return any(has_unknown(v) for v in marks.values())
    if isinstance(marks, list):
        return any(has_unknown(v) for v in marks)
    return marks is True


def plan_drift(plan: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """(address, attribute, kind) of every change a saved plan would make.

    Updates name each top-level attribute that differs, as "unknown" when its new value is
    known only at apply, else "changed"; any other action (create, delete, replace) names
    the action instead, so it can never match ``KNOWN_DRIFT``.
    """
    drift: set[tuple[str, str, str]] = set()
    for change in plan.get("resource_changes", []):
        actions = change["change"]["actions"]
        if actions in (["no-op"], ["read"]):
            continue
        address = change["address"]
        if actions != ["update"]:
            drift.add((address, "+".join(actions), "action"))
            continue
        before = change["change"].get("before") or {}
        after = change["change"].get("after") or {}
        unknown = change["change"].get("after_unknown") or {}
        for key in sorted(set(before) | set(after)):
            if has_unknown(unknown.get(key)):
                drift.add((address, key, "unknown"))
            elif before.get(key) != after.get(key):
                drift.add((address, key, "changed"))
    return drift


# --------------------------------------------------------------------------------------------
# What exists after apply, and after destroy
# --------------------------------------------------------------------------------------------


class Checks:
    """Collects failed expectations so one run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, condition: bool, message: str) -> None:
        """Record ``message`` unless ``condition`` holds."""
        if not condition:
            self.failures.append(message)

    def raise_if_failed(self, what: str) -> None:
        """Fail the step with every recorded message."""
        if self.failures:
            raise CheckFailed(f"{what}:\n  " + "\n  ".join(self.failures))


def by_type(resources: Mapping[str, Resource], kind: str) -> list[dict[str, Any]]:
    """Attribute values of the state's resources of one type."""
    return [r.values for r in resources.values() if r.type == kind]


def verify_deployment(endpoint: str, resources: Mapping[str, Resource], topic_arn: str) -> None:
    """Check with boto3 that what exists in moto is what the module intended; ``topic_arn`` is
    the SNS topic given as the ``alarm_sns_topic_arn`` input."""
    checks = Checks()
    check_autoscaling(endpoint, resources, checks)
    check_queues(endpoint, resources, checks)
    check_tables(endpoint, resources, checks)
    check_keys(endpoint, resources, checks)
    check_observability(endpoint, resources, topic_arn, checks)
    checks.raise_if_failed("deployment differs from the module's intent")


def check_autoscaling(endpoint: str, resources: Mapping[str, Resource], checks: Checks) -> None:
    """The group launches from the launch template, with the drain hook and target group."""
    (group,) = by_type(resources, "aws_autoscaling_group")
    (template,) = by_type(resources, "aws_launch_template")
    (target_group,) = by_type(resources, "aws_lb_target_group")
    autoscaling = client(endpoint, "autoscaling")
    found = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group["name"]])
    groups = found["AutoScalingGroups"]
    checks.expect(len(groups) == 1, f"Auto Scaling group {group['name']} not found")
    if not groups:
        return
    actual = groups[0]
    spec = actual.get("LaunchTemplate", {})
    checks.expect(
        spec.get("LaunchTemplateId") == template["id"]
        and str(spec.get("Version")) == str(template["latest_version"]),
        f"group launches from {spec}, not {template['id']} v{template['latest_version']}",
    )
    checks.expect(
        actual.get("TargetGroupARNs") == [target_group["arn"]],
        f"group target groups {actual.get('TargetGroupARNs')} != [{target_group['arn']}]",
    )
    checks.expect(actual.get("HealthCheckType") == "ELB", "group health check is not ELB")
    hooks = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group["name"])
    drain = [
        h
        for h in hooks["LifecycleHooks"]
        if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
        and h.get("DefaultResult") == "CONTINUE"
    ]
    checks.expect(len(drain) == 1, f"no TERMINATING/CONTINUE lifecycle hook: {hooks}")
    versions = client(endpoint, "ec2").describe_launch_template_versions(
        LaunchTemplateId=template["id"], Versions=[str(template["latest_version"])]
    )["LaunchTemplateVersions"]
    data = versions[0]["LaunchTemplateData"] if versions else {}
    checks.expect(
        data.get("MetadataOptions", {}).get("HttpTokens") == "required",
        "launch template does not require IMDSv2",
    )
    checks.expect(bool(data.get("UserData")), "launch template has no user data")


def check_queues(endpoint: str, resources: Mapping[str, Resource], checks: Checks) -> None:
    """The work queue dead-letters to the DLQ after maxReceiveCount; the DLQ allows only it."""
    queues = {q["name"]: q for q in by_type(resources, "aws_sqs_queue")}
    work = next(q for name, q in queues.items() if "-work" in name)
    dlq = next(q for name, q in queues.items() if "-dlq" in name)
    sqs = client(endpoint, "sqs")
    attributes = sqs.get_queue_attributes(QueueUrl=work["url"], AttributeNames=["All"])
    redrive = json.loads(attributes["Attributes"].get("RedrivePolicy", "{}"))
    wanted = json.loads(work["redrive_policy"])
    checks.expect(
        redrive.get("deadLetterTargetArn") == dlq["arn"],
        f"work queue dead-letters to {redrive.get('deadLetterTargetArn')}, not {dlq['arn']}",
    )
    checks.expect(
        int(redrive.get("maxReceiveCount", -1)) == int(wanted["maxReceiveCount"]),
        f"maxReceiveCount {redrive.get('maxReceiveCount')} != {wanted['maxReceiveCount']}",
    )
    for queue in (work, dlq):
        found = sqs.get_queue_attributes(QueueUrl=queue["url"], AttributeNames=["All"])
        checks.expect(
            bool(found["Attributes"].get("KmsMasterKeyId")), f"{queue['name']} is not SSE-KMS"
        )
    allow = sqs.get_queue_attributes(QueueUrl=dlq["url"], AttributeNames=["All"])["Attributes"]
    allowed = json.loads(allow.get("RedriveAllowPolicy", "{}"))
    checks.expect(
        allowed.get("sourceQueueArns") == [work["arn"]],
        f"DLQ redrive-allow policy {allowed} does not name only the work queue",
    )


def check_tables(endpoint: str, resources: Mapping[str, Resource], checks: Checks) -> None:
    """Both tables have PITR and SSE with the module's CMK; the status table has its TTL."""
    dynamodb = client(endpoint, "dynamodb")
    tables = by_type(resources, "aws_dynamodb_table")
    with_ttl = [t for t in tables if t.get("ttl") and t["ttl"][0].get("enabled")]
    checks.expect(bool(with_ttl), f"no table of {[t['name'] for t in tables]} has TTL on")
    for table in tables:
        name = table["name"]
        sse = dynamodb.describe_table(TableName=name)["Table"].get("SSEDescription", {})
        wanted_key = table["server_side_encryption"][0]["kms_key_arn"]
        checks.expect(
            sse.get("Status") == "ENABLED" and sse.get("KMSMasterKeyArn") == wanted_key,
            f"table {name} SSE {sse}, not with {wanted_key}",
        )
        backups = dynamodb.describe_continuous_backups(TableName=name)
        pitr = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
        checks.expect(
            pitr.get("PointInTimeRecoveryStatus") == "ENABLED", f"table {name} PITR {pitr}"
        )
    for table in with_ttl:
        ttl = dynamodb.describe_time_to_live(TableName=table["name"])["TimeToLiveDescription"]
        checks.expect(
            ttl.get("TimeToLiveStatus") == "ENABLED"
            and ttl.get("AttributeName") == table["ttl"][0]["attribute_name"],
            f"table {table['name']} TTL {ttl}",
        )


def check_keys(endpoint: str, resources: Mapping[str, Resource], checks: Checks) -> None:
    """Every KMS key the module created rotates."""
    kms = client(endpoint, "kms")
    keys = by_type(resources, "aws_kms_key")
    checks.expect(len(keys) >= 1, "no KMS key in the state")
    for key in keys:
        status = kms.get_key_rotation_status(KeyId=key["key_id"])
        checks.expect(
            status.get("KeyRotationEnabled") is True, f"key {key['key_id']} does not rotate"
        )


def check_observability(
    endpoint: str, resources: Mapping[str, Resource], topic_arn: str, checks: Checks
) -> None:
    """Every alarm and the dashboard exist; every alarm notifies the input SNS topic (and
    exactly what the state says it does)."""
    cloudwatch = client(endpoint, "cloudwatch")
    wanted = {a["alarm_name"]: a for a in by_type(resources, "aws_cloudwatch_metric_alarm")}
    found = cloudwatch.describe_alarms(AlarmNames=sorted(wanted))["MetricAlarms"]
    names = {a["AlarmName"] for a in found}
    checks.expect(names == set(wanted), f"alarms missing: {sorted(set(wanted) - names)}")
    for alarm in found:
        actions = set(wanted[alarm["AlarmName"]]["alarm_actions"])
        checks.expect(
            topic_arn in actions and set(alarm.get("AlarmActions", [])) == actions,
            f"alarm {alarm['AlarmName']} notifies {alarm.get('AlarmActions')}, not {topic_arn}",
        )
    for dashboard in by_type(resources, "aws_cloudwatch_dashboard"):
        name = dashboard["dashboard_name"]
        try:
            body = cloudwatch.get_dashboard(DashboardName=name)["DashboardBody"]
        except ClientError as error:
            checks.expect(False, f"dashboard {name}: {error}")
            continue
        checks.expect(bool(json.loads(body).get("widgets")), f"dashboard {name} has no widgets")


def verify_destroyed(endpoint: str, resources: Mapping[str, Resource]) -> None:
    """After destroy: group, queues, tables, load balancer, alarms, bucket and role are gone."""
    checks = Checks()
    groups = client(endpoint, "autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
    checks.expect(
        not groups, f"Auto Scaling groups left: {[g['AutoScalingGroupName'] for g in groups]}"
    )
    queues = client(endpoint, "sqs").list_queues().get("QueueUrls", [])
    checks.expect(not queues, f"queues left: {queues}")
    tables = client(endpoint, "dynamodb").list_tables()["TableNames"]
    checks.expect(not tables, f"tables left: {tables}")
    balancers = client(endpoint, "elbv2").describe_load_balancers()["LoadBalancers"]
    checks.expect(
        not balancers, f"load balancers left: {[b['LoadBalancerName'] for b in balancers]}"
    )
    alarms = client(endpoint, "cloudwatch").describe_alarms()["MetricAlarms"]
    checks.expect(not alarms, f"alarms left: {[a['AlarmName'] for a in alarms]}")
    buckets = client(endpoint, "s3").list_buckets()["Buckets"]
    checks.expect(not buckets, f"buckets left: {[b['Name'] for b in buckets]}")
    roles = {r["RoleName"] for r in client(endpoint, "iam").list_roles()["Roles"]}
    ours = {r["name"] for r in by_type(resources, "aws_iam_role")}
    checks.expect(not roles & ours, f"roles left: {sorted(roles & ours)}")
    kms = client(endpoint, "kms")
    for key in by_type(resources, "aws_kms_key"):
        state = kms.describe_key(KeyId=key["key_id"])["KeyMetadata"]["KeyState"]
        checks.expect(state == "PendingDeletion", f"key {key['key_id']} is {state}")
    checks.raise_if_failed("left behind after destroy")


# --------------------------------------------------------------------------------------------
# The cycle
# --------------------------------------------------------------------------------------------


def step(name: str, action: Callable[[], str]) -> None:
    """Run one step and print one line with its result and duration."""
    started = time.monotonic()
    print(f"-- {name} ...", flush=True)
    try:
        summary = action()
    except Exception:
        print(f"FAIL {name} ({time.monotonic() - started:.1f} s)", flush=True)
        raise
    print(f"ok   {name}: {summary} ({time.monotonic() - started:.1f} s)", flush=True)


def created_count(apply_output: str) -> int:
    """The ``N added`` of terraform apply's summary line."""
    found = re.search(r"Apply complete! Resources: (\d+) added", apply_output)
    if not found:
        raise CheckFailed(f"no summary line in apply output:\n{tail(apply_output)}")
    return int(found.group(1))


def slowest(apply_output: str, count: int = 3) -> str:
    """The resources that took longest to create, from apply's "Creation complete" lines."""
    found = re.findall(r"^(\S+): Creation complete after (?:(\d+)m)?(\d+)s", apply_output, re.M)
    times = sorted(((int(m or 0) * 60 + int(s), a) for a, m, s in found), reverse=True)
    return ", ".join(
        f"{address.removeprefix('module.courier.')} {t} s" for t, address in times[:count]
    )


class Cycle:
    """One apply/plan/check/destroy cycle in ``work`` against the moto at ``endpoint``."""

    def __init__(self, work: Path, endpoint: str, plugin_dir: Path) -> None:
        self.work = work
        self.endpoint = endpoint
        self.plugin_dir = plugin_dir
        self.example = work / EXAMPLE
        self.resources: dict[str, Resource] = {}
        self.created = 0
        self.drift: set[tuple[str, str, str]] = set()
        self.topic_arn = ""  # the alarm topic created as an input

    def run(self) -> None:
        """Every step in order; raises CheckFailed if any failed.

        Up to apply, a failure stops the cycle. The plan and boto3 checks only look, so
        a failure there is reported and destroy still runs: one run shows every problem.
        """
        step("inputs in moto", self.inputs)
        step("terraform init", self.init)
        step("terraform apply", self.apply)
        failed: list[str] = []
        for name, action in (("terraform plan (drift)", self.plan), ("boto3 checks", self.verify)):
            try:
                step(name, action)
            # Anything, a boto3 error included: these steps only look, destroy must still run.
            except Exception as error:
                print(textwrap.indent(str(error), "     "), flush=True)
                failed.append(name)
        step("terraform destroy", self.destroy)
        if failed:
            raise CheckFailed(f"failed: {', '.join(failed)} (details above)")

    def terraform(self, *args: str, ok_codes: tuple[int, ...] = (0,)) -> str:
        """Run a terraform command in the example, with its timeout; returns its stdout.

        The output is kept in the workspace as <command>.log (see ``--keep``).
        """
        output = run_terraform([*args], self.example, TIMEOUTS[args[0]], ok_codes).stdout
        (self.work / f"{args[0]}.log").write_text(output)
        return output

    def inputs(self) -> str:
        """Create the inputs in moto and the workspace that uses them."""
        made = create_inputs(self.endpoint)
        self.topic_arn = made.alarm_sns_topic_arn
        prepare_workspace(self.work, self.endpoint, made)
        return (
            f"moto at {self.endpoint}; {made.vpc_id}, 4 subnets, certificate, topic, {made.ami_id}"
        )

    def init(self) -> str:
        """terraform init from the local provider mirror."""
        self.terraform("init", "-input=false", f"-plugin-dir={self.plugin_dir}")
        return f"plugins from {self.plugin_dir}"

    def apply(self) -> str:
        """terraform apply: exactly EXPECTED_CREATED resources, all in the state."""
        output = self.terraform("apply", "-auto-approve", "-input=false")
        self.created = created_count(output)
        self.resources = state_resources(show_json(self.example))
        if self.created != EXPECTED_CREATED or len(self.resources) != EXPECTED_CREATED:
            raise CheckFailed(
                f"created {self.created}, state holds {len(self.resources)}; "
                f"expected {EXPECTED_CREATED}"
            )
        return f"{self.created} created; slowest: {slowest(output)}"

    def plan(self) -> str:
        """A second plan: its changes must be exactly KNOWN_DRIFT."""
        output = self.terraform(
            "plan", "-input=false", "-detailed-exitcode", "-out=drift.tfplan", ok_codes=(0, 2)
        )
        self.drift = plan_drift(show_json(self.example, "drift.tfplan"))
        new, gone = self.drift - KNOWN_DRIFT, KNOWN_DRIFT - self.drift
        if new or gone:
            raise CheckFailed(
                "the second plan's changes differ from the known moto read-backs\n"
                f"  new (courier's own, or an unlisted moto gap): {sorted(new)}\n"
                f"  listed but not seen (remove from KNOWN_DRIFT): {sorted(gone)}"
            )
        summary = re.search(r"Plan: .*", output)
        changed = len({address for address, _, _ in self.drift})
        return (
            f"{summary.group(0) if summary else 'No changes.'} "
            f"{len(self.drift)} attributes on {changed} resources, all known moto read-backs"
        )

    def verify(self) -> str:
        """boto3: what exists is what the module intended."""
        verify_deployment(self.endpoint, self.resources, self.topic_arn)
        return (
            "ASG on the launch template with hook and target group; redrive; "
            "TTL/PITR/SSE; key rotation; alarms; dashboard"
        )

    def destroy(self) -> str:
        """terraform destroy: an empty state and nothing of courier's left in moto."""
        self.terraform("destroy", "-auto-approve", "-input=false")
        left = state_resources(show_json(self.example))
        if left:
            raise CheckFailed(f"state still holds {sorted(left)}")
        verify_destroyed(self.endpoint, self.resources)
        return (
            "state empty; no group, queue, table, ALB, alarm, bucket, role; keys pending deletion"
        )


def run_cycle(plugin_dir: Path, keep: bool = False) -> Cycle:
    """The whole cycle in a temporary directory, against a moto of its own."""
    work = Path(tempfile.mkdtemp(prefix="courier-terraform-apply."))
    try:
        with moto_server() as endpoint:
            cycle = Cycle(work, endpoint, plugin_dir)
            cycle.run()
            return cycle
    finally:
        if keep:
            print(f"workspace kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def exit_on_sigterm() -> None:
    """Make SIGTERM (from an outer ``timeout``) exit through the cleanups, not abruptly.

    Python's default for SIGTERM ends the process at once: no ``finally``, so the terraform
    of the moment, in a session of its own, would outlive it.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main(argv: list[str] | None = None) -> int:
    """Command line: run the cycle, print a summary line, exit 0 only if all steps passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--plugin-dir", type=Path, required=True, help="local provider mirror")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if shutil.which("terraform") is None:
        print("FAIL terraform is not installed", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        cycle = run_cycle(args.plugin_dir, keep=args.keep)
    except CheckFailed as error:
        print(f"FAIL {error}", file=sys.stderr)
        return 1
    print(
        f"terraform apply against moto: OK - {cycle.created} created, "
        f"{len(cycle.drift)} known drift attributes, destroyed clean "
        f"({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
