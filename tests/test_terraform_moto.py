"""The parts of courier_testkit/terraform_moto.py that decide pass or fail, checked fast.

The full cycle (apply, plan, destroy against moto; ~3-5 minutes) runs in
`make terraform-check`, not here. These tests check its judgement: how a second plan's
changes become (address, attribute, kind) triples compared with KNOWN_DRIFT, how the apply
summary is read, and that the moto patches make SQS return RedriveAllowPolicy and EC2
answer a revoke of a gone rule id with its own error code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from courier_testkit import terraform_moto
from courier_testkit.terraform_moto import (
    KNOWN_DRIFT,
    CheckFailed,
    created_count,
    plan_drift,
    run_terraform,
    slowest,
    state_resources,
)

REPO = Path(__file__).resolve().parents[1]


def change(
    address: str, actions: list[str], before: object, after: object, unknown: object
) -> dict[str, object]:
    """One entry of a plan's resource_changes."""
    return {
        "address": address,
        "change": {"actions": actions, "before": before, "after": after, "after_unknown": unknown},
    }


def test_plan_drift_names_each_changed_attribute_and_any_other_action() -> None:
    plan = {
        "resource_changes": [
            change("a.kept", ["no-op"], {"x": 1}, {"x": 1}, {}),
            change("data.d", ["read"], None, {}, {"json": True}),
            change(
                "a.updated",
                ["update"],
                {"same": 1, "moved": 0, "gone": "x", "later": "1", "nested": [{"v": 1}]},
                {"same": 1, "moved": 90, "later": None, "nested": [{"v": 1}]},
                {"later": True, "nested": [{"v": False}]},
            ),
            change("a.replaced", ["delete", "create"], {}, {}, {}),
            change("a.new", ["create"], None, {"x": 1}, {}),
        ]
    }

    assert plan_drift(plan) == {
        ("a.updated", "moved", "changed"),
        ("a.updated", "gone", "changed"),
        ("a.updated", "later", "unknown"),
        ("a.replaced", "delete+create", "action"),
        ("a.new", "create", "action"),
    }


def test_known_drift_holds_only_in_place_attribute_changes_of_the_module() -> None:
    # A create/delete/replace can never be "known": plan_drift names those by their action.
    for address, attribute, kind in KNOWN_DRIFT:
        assert address.startswith("module.courier.aws_")
        assert kind in {"changed", "unknown"}
        assert attribute not in {"create", "delete", "delete+create", "create+delete"}


def test_apply_summary_and_slowest_resources_are_read_from_terraform_output() -> None:
    output = textwrap.dedent(
        """\
        module.courier.aws_kms_key.data: Creation complete after 3s [id=k]
        module.courier.aws_autoscaling_group.courier: Creation complete after 1m12s [id=courier]
        module.courier.aws_lb.this: Creation complete after 31s [id=arn]

        Apply complete! Resources: 55 added, 0 changed, 0 destroyed.
        """
    )

    assert created_count(output) == 55
    assert slowest(output, 2) == "aws_autoscaling_group.courier 72 s, aws_lb.this 31 s"


def test_state_resources_lists_managed_resources_of_every_module() -> None:
    state = {
        "values": {
            "root_module": {
                "resources": [{"address": "data.x.y", "mode": "data", "type": "x", "values": {}}],
                "child_modules": [
                    {
                        "resources": [
                            {
                                "address": 'module.courier.aws_sqs_queue_policy.tls_only["dlq"]',
                                "mode": "managed",
                                "type": "aws_sqs_queue_policy",
                                "values": {"policy": "{}"},
                            }
                        ]
                    }
                ],
            }
        }
    }

    found = state_resources(state)

    assert list(found) == ['module.courier.aws_sqs_queue_policy.tls_only["dlq"]']
    assert (
        found['module.courier.aws_sqs_queue_policy.tls_only["dlq"]'].type == "aws_sqs_queue_policy"
    )


# Run in a child process (moto_script): the patches change moto's classes for the whole
# interpreter, and the rest of the suite's moto servers run in this one.
REDRIVE_ALLOW_SCRIPT = """
import json, sys
from courier_testkit import terraform_moto as tm
if sys.argv[1] == "patched":
    tm.patch_moto()
from service.local import EmbeddedAws
with EmbeddedAws() as aws:
    sqs = tm.client(aws.endpoint_url, "sqs")
    url = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    policy = json.dumps({"redrivePermission": "denyAll"})
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedriveAllowPolicy": policy})
    first = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedriveAllowPolicy": ""})
    cleared = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    print(json.dumps([first.get("RedriveAllowPolicy"), "RedriveAllowPolicy" in cleared]))
"""


def moto_script(script: str, mode: str) -> list[object]:
    """What ``script`` prints last (a JSON list), run against moto ``mode`` ("plain" or
    "patched") in a child: the patches change moto's classes for the whole interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", script, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    parsed: list[object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def redrive_allow_policy_read_back(mode: str) -> list[object]:
    """[RedriveAllowPolicy returned after setting it, whether it is returned after clearing]."""
    return moto_script(REDRIVE_ALLOW_SCRIPT, mode)


def test_moto_alone_does_not_return_redrive_allow_policy() -> None:
    # The gap the patch exists for; when moto fixes it, patch_moto can go.
    assert redrive_allow_policy_read_back("plain") == [None, False]


def test_patched_moto_returns_redrive_allow_policy_until_cleared() -> None:
    assert redrive_allow_policy_read_back("patched") == ['{"redrivePermission": "denyAll"}', False]


RULE_ID_SCRIPT = """
import json, sys
from botocore.exceptions import ClientError
from courier_testkit import terraform_moto as tm
if sys.argv[1] == "patched":
    tm.patch_moto()
    tm.patch_moto()  # twice, as two cycles in one process would: wrapped once
    from moto.ec2.models.security_groups import SecurityGroupBackend
    for revoke in (SecurityGroupBackend.revoke_security_group_ingress,
                   SecurityGroupBackend.revoke_security_group_egress):
        assert not hasattr(revoke.__wrapped__, "checks_rule_ids"), "revoke wrapped twice"
from service.local import EmbeddedAws
with EmbeddedAws() as aws:
    ec2 = tm.client(aws.endpoint_url, "ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    group = ec2.create_security_group(GroupName="g", Description="g", VpcId=vpc)["GroupId"]
    def error_code(call, **arguments):
        try:
            call(GroupId=group, **arguments)
        except ClientError as error:
            return error.response["Error"]["Code"]
        return None
    seen = []
    for direction in ("ingress", "egress"):
        authorize = getattr(ec2, f"authorize_security_group_{direction}")
        revoke = getattr(ec2, f"revoke_security_group_{direction}")
        permission = {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080,
                      "IpRanges": [{"CidrIp": "10.1.0.0/16"}]}
        rule = authorize(GroupId=group, IpPermissions=[permission])["SecurityGroupRules"][0]
        rule_ids = [rule["SecurityGroupRuleId"]]
        assert error_code(revoke, SecurityGroupRuleIds=rule_ids) is None  # the first revoke
        seen.append(error_code(revoke, SecurityGroupRuleIds=rule_ids))
        # Revoking by the rule's content, not its id, keeps moto's own answer.
        seen.append(error_code(revoke, IpPermissions=[permission]))
    print(json.dumps(seen))
"""


def revoke_twice(mode: str) -> list[object]:
    """Per direction: the error of revoking a rule by id again, then by its content."""
    return moto_script(RULE_ID_SCRIPT, mode)


def test_the_patch_refuses_a_moto_revoke_whose_parameters_moved() -> None:
    def revoke(self: object, group_id: str, rule_ids: list[str]) -> None:
        """A moto that renamed the parameters the patch reads."""

    with pytest.raises(CheckFailed, match=r"has no \['group_name_or_id', 'security_rule_ids',"):
        terraform_moto._checking_rule_ids(revoke, "egress_rules")


def test_moto_alone_answers_a_gone_rule_id_with_the_wrong_error_code() -> None:
    # The gap: the provider's destroy takes only EC2's code as "already gone".
    assert revoke_twice("plain") == ["InvalidPermission.NotFound"] * 4


def test_patched_moto_answers_a_gone_rule_id_as_ec2_does() -> None:
    gone, by_content = "InvalidSecurityGroupRuleId.NotFound", "InvalidPermission.NotFound"
    assert revoke_twice("patched") == [gone, by_content, gone, by_content]


# A terraform that hangs like a provider waiter, with a child that ignores SIGINT (as a
# background job of a shell does), recording both pids.
HANGING_TERRAFORM = """#!/bin/sh
sleep 300 &
echo $$ $! > "$PIDS.tmp" && mv "$PIDS.tmp" "$PIDS"
wait
"""


def written_pids(path: Path, within: float = 30) -> list[int]:
    """The two pids the fake terraform wrote (atomically: it renames a whole file in)."""
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, "the fake terraform never wrote its pids"
        time.sleep(0.05)
    pids = [int(p) for p in path.read_text().split()]
    assert len(pids) == 2, pids
    return pids


def alive(pid: int) -> bool:
    """Whether a process with this pid still exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hanging_terraform_command_fails_and_its_process_group_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "terraform"
    fake.parent.mkdir()
    fake.write_text(HANGING_TERRAFORM)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
    monkeypatch.setattr(terraform_moto, "STOP_GRACE_SECONDS", 1.0)

    # 5 s: on a loaded machine the shell must have started and written its pids by then.
    with pytest.raises(CheckFailed, match=r"terraform apply did not finish in 5 s \(killed\)"):
        run_terraform(["apply"], tmp_path, timeout=5.0)

    pids = written_pids(tmp_path / "pids", within=0)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]


def test_sigterm_stops_the_terraform_command_it_interrupts(tmp_path: Path) -> None:
    # What `timeout` in terraform/check.sh sends when the whole cycle overruns.
    fake = tmp_path / "bin" / "terraform"
    fake.parent.mkdir()
    fake.write_text(HANGING_TERRAFORM)
    fake.chmod(0o755)
    pids_file = tmp_path / "pids"
    script = (
        "import sys; from pathlib import Path; from courier_testkit import terraform_moto as tm; "
        "tm.STOP_GRACE_SECONDS = 1.0; tm.exit_on_sigterm(); "
        "tm.run_terraform(['apply'], Path(sys.argv[1]), timeout=300)"
    )
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env["PIDS"] = str(pids_file)
    runner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env)
    pids = written_pids(pids_file)

    runner.terminate()
    assert runner.wait(timeout=30) == 128 + 15

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]
