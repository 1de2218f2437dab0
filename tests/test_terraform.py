"""Properties of the Terraform deployment (terraform/) that would be easy to lose in an edit.

The .tf files are parsed with python-hcl2 by terraform/scripts/hcl2json.py, run in its own
virtualenv (.venv-hcl2) because checkov's forked ``hcl2`` must not meet the project's
environment; `make terraform-check` (bash terraform/check.sh) creates it. Assertions read
the parsed attributes, so a renamed or restructured block fails a test instead of passing
silently. The rendered courier.toml is checked against the daemon's own settings loader.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TERRAFORM = REPO / "terraform"
PARSER = TERRAFORM / "scripts" / "hcl2json.py"
PARSER_PYTHON = REPO / ".venv-hcl2" / "bin" / "python"
SETUP_HINT = "run `make terraform-check` (bash terraform/check.sh), which creates .venv-hcl2"

DATA_KEY = "${aws_kms_key.data.arn}"

# Identity-policy statements allowed to use Resource "*", because the action supports no
# resource-level permissions. Each must carry the condition named here, if any.
STAR_RESOURCE_EXCEPTIONS = {
    ("instance", "CloudWatchAgentMetrics"): (
        "cloudwatch:PutMetricData has no resource-level permissions; "
        "it is limited by the cloudwatch:namespace condition instead",
        "cloudwatch:namespace",
    ),
    ("instance", "ConsoleQueueAge"): (
        "cloudwatch:GetMetricData (the console's oldest-message age per queue) has no "
        "resource-level permissions",
        None,
    ),
    ("instance", "CloudWatchAgentDescribeTags"): (
        "ec2:DescribeTags (read by the CloudWatch agent for the AutoScalingGroupName "
        "dimension) has no resource-level permissions",
        None,
    ),
}
# KMS key policies (locals passed to aws_kms_key.policy) must use Resource "*": in a key
# policy it means the key itself, and AWS rejects anything else.
KEY_POLICY_LOCALS = {"data_key_policy", "credstash_key_policy"}

# Resource types that take no tags; every other resource must merge local.tags.
UNTAGGABLE = {
    "aws_autoscaling_policy",
    "aws_cloudwatch_dashboard",
    "aws_cloudwatch_log_metric_filter",
    "aws_iam_role_policy",
    "aws_iam_role_policy_attachment",
    "aws_kms_alias",
    "aws_s3_bucket_lifecycle_configuration",
    "aws_s3_bucket_ownership_controls",
    "aws_s3_bucket_policy",
    "aws_s3_bucket_public_access_block",
    "aws_s3_bucket_server_side_encryption_configuration",
    "aws_s3_bucket_versioning",
    "aws_sqs_queue_policy",
    "aws_sqs_queue_redrive_allow_policy",
    "aws_wafv2_web_acl_association",
}


@dataclass
class Module:
    """The blocks of one Terraform module, keyed for lookup."""

    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resource(self, kind: str, name: str) -> dict[str, Any]:
        assert (kind, name) in self.resources, f"resource {kind}.{name} is missing"
        return self.resources[(kind, name)]

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for (k, name), body in self.resources.items() if k == kind}


def _add_file(module: Module, parsed: dict[str, Any]) -> None:
    for section, target in (("resource", module.resources), ("data", module.data)):
        for entry in parsed.get(section, []):
            for kind, named in entry.items():
                for name, body in named.items():
                    assert (kind, name) not in target, f"{kind}.{name} declared twice"
                    target[(kind, name)] = body
    for entry in parsed.get("locals", []):
        module.locals.update(entry)
    for entry in parsed.get("variable", []):
        module.variables.update(entry)
    for entry in parsed.get("module", []):
        module.modules.update(entry)


@pytest.fixture(scope="module")
def parsed_files() -> dict[str, Any]:
    if not PARSER_PYTHON.exists():
        pytest.skip(
            f"python-hcl2 parser environment {PARSER_PYTHON.parent.parent} is missing: {SETUP_HINT}"
        )
    result = subprocess.run(
        [str(PARSER_PYTHON), str(PARSER), str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hcl2json failed:\n{result.stderr}"
    files: dict[str, Any] = json.loads(result.stdout)["files"]
    return files


@pytest.fixture(scope="module")
def tf(parsed_files: dict[str, Any]) -> Module:
    """The root module: the .tf files directly in terraform/."""
    module = Module()
    for path, parsed in parsed_files.items():
        if "/" not in path:
            _add_file(module, parsed)
    assert module.resources, "no resources parsed from terraform/*.tf"
    return module


def one(blocks: Any, what: str) -> dict[str, Any]:
    """The single block of a nested block list (HCL blocks parse as lists)."""
    assert isinstance(blocks, list), f"{what}: expected a block, got {blocks!r}"
    assert len(blocks) == 1, f"{what}: expected exactly one block, got {len(blocks)}"
    block: dict[str, Any] = blocks[0]
    return block


def resolve(module: Module, value: Any) -> Any:
    """Follow a value that is exactly a "${local.x}" reference to the local's definition."""
    while isinstance(value, str) and value.startswith("${local.") and value.endswith("}"):
        name = value[len("${local.") : -1]
        if name not in module.locals:
            break
        value = module.locals[name]
    return value


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------


def test_launch_template_requires_imdsv2_with_hop_limit_1(tf: Module) -> None:
    template = tf.resource("aws_launch_template", "courier")
    metadata = one(template.get("metadata_options"), "metadata_options")
    assert metadata["http_endpoint"] == "enabled"
    assert metadata["http_tokens"] == "required"
    assert metadata["http_put_response_hop_limit"] == 1


def test_launch_template_has_no_public_ip_no_key_pair_and_an_encrypted_gp3_root(tf: Module) -> None:
    template = tf.resource("aws_launch_template", "courier")
    assert "key_name" not in template, "no key pair: shell access is SSM Session Manager"
    interface = one(template.get("network_interfaces"), "network_interfaces")
    assert interface["associate_public_ip_address"] is False
    assert interface["security_groups"] == ["${aws_security_group.instance.id}"]
    ebs = one(one(template.get("block_device_mappings"), "block_device_mappings")["ebs"], "ebs")
    assert ebs["encrypted"] is True
    assert ebs["volume_type"] == "gp3"
    assert one(template.get("iam_instance_profile"), "iam_instance_profile")["arn"] == (
        "${aws_iam_instance_profile.instance.arn}"
    )


def test_asg_uses_elb_health_checks_and_a_pinned_launch_template_version(tf: Module) -> None:
    asg = tf.resource("aws_autoscaling_group", "courier")
    assert asg["health_check_type"] == "ELB"
    assert asg["target_group_arns"] == ["${aws_lb_target_group.api.arn}"]
    assert {"GroupInServiceInstances", "GroupDesiredCapacity"} <= set(asg["enabled_metrics"])
    # Auto rollback needs a concrete version, never $Latest/$Default.
    dynamic = {name: body for entry in asg["dynamic"] for name, body in entry.items()}
    plain = one(dynamic["launch_template"]["content"], "launch_template content")
    assert plain["version"] == "${aws_launch_template.courier.latest_version}"
    mixed = one(dynamic["mixed_instances_policy"]["content"], "mixed_instances_policy content")
    spec = one(
        one(mixed["launch_template"], "launch_template")["launch_template_specification"], "spec"
    )
    assert spec["version"] == "${aws_launch_template.courier.latest_version}"


def test_termination_lifecycle_hook_outlasts_the_drain(tf: Module) -> None:
    asg = tf.resource("aws_autoscaling_group", "courier")
    hook = one(asg.get("initial_lifecycle_hook"), "initial_lifecycle_hook")
    assert hook["lifecycle_transition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["default_result"] == "CONTINUE"
    assert hook["heartbeat_timeout"] == "${var.lifecycle_hook_heartbeat_seconds}"
    preconditions = one(asg["lifecycle"], "lifecycle")["precondition"]
    assert any(
        p["condition"] == "${var.lifecycle_hook_heartbeat_seconds > var.drain_seconds}"
        for p in preconditions
    ), "a precondition must keep the hook heartbeat longer than the drain bound"


def test_instance_refresh_is_a_canary_that_rolls_back_on_alarms(tf: Module) -> None:
    asg = tf.resource("aws_autoscaling_group", "courier")
    refresh = one(asg.get("instance_refresh"), "instance_refresh")
    assert refresh["strategy"] == "Rolling"
    preferences = one(refresh["preferences"], "preferences")
    assert preferences["checkpoint_percentages"] == "${var.instance_refresh.checkpoint_percentages}"
    assert preferences["auto_rollback"] == "${var.instance_refresh.auto_rollback}"
    alarms = one(preferences["alarm_specification"], "alarm_specification")["alarms"]
    assert alarms == "${local.rollout_alarm_names}"
    names = resolve(tf, alarms)
    assert isinstance(names, list)
    assert len(names) >= 3
    for name in names:
        kind, resource, attribute = name.strip("${}").split(".")
        assert (kind, attribute) == ("aws_cloudwatch_metric_alarm", "alarm_name")
        tf.resource(kind, resource)
    variable_type = tf.variables["instance_refresh"]["type"]
    assert "checkpoint_percentages = optional(list(number), [10, 50, 100])" in variable_type
    assert "auto_rollback = optional(bool, true)" in variable_type


def _backlog_policy(tf: Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The customized (backlog per instance) target tracking configuration, and its metric
    queries by id."""
    policies = tf.of_type("aws_autoscaling_policy")
    backlog = [
        one(p["target_tracking_configuration"], "target_tracking_configuration")
        for p in policies.values()
        if "customized_metric_specification" in p["target_tracking_configuration"][0]
    ]
    assert len(backlog) == 1, "exactly one customized (backlog per instance) target tracking policy"
    spec = one(backlog[0]["customized_metric_specification"], "customized_metric_specification")
    return backlog[0], {query["id"]: query for query in spec["metrics"]}


def _metric(query: dict[str, Any]) -> dict[str, Any]:
    stat: dict[str, Any] = one(query["metric_stat"], "metric_stat")
    metric: dict[str, Any] = one(stat["metric"], "metric")
    return {**metric, "stat": stat["stat"]}


def test_backlog_per_instance_policy_divides_visible_messages_by_in_service_instances(
    tf: Module,
) -> None:
    config, queries = _backlog_policy(tf)
    assert config["target_value"] == "${var.backlog_per_instance}"
    by_metric = {_metric(q)["metric_name"]: q for q in queries.values() if "metric_stat" in q}
    for query in by_metric.values():
        assert query["return_data"] is False
    visible = by_metric["ApproximateNumberOfMessagesVisible"]
    in_service = by_metric["GroupInServiceInstances"]
    assert _metric(visible)["namespace"] == "AWS/SQS"
    assert _metric(visible)["dimensions"] == [
        {"name": "QueueName", "value": "${aws_sqs_queue.work.name}"}
    ]
    assert _metric(in_service)["namespace"] == "AWS/AutoScaling"
    assert _metric(in_service)["dimensions"] == [
        {"name": "AutoScalingGroupName", "value": "${aws_autoscaling_group.courier.name}"}
    ]
    divisions = [
        q
        for q in queries.values()
        if q.get("expression") == f"{visible['id']} / {in_service['id']}"
    ]
    assert len(divisions) == 1, "one expression: visible messages / instances in service"
    returned = [q for q in queries.values() if q["return_data"] is True]
    assert len(returned) == 1, "exactly one query returns the tracked value"
    assert divisions[0]["id"] in resolve(tf, returned[0]["expression"])


def _constrained_metric_name() -> str:
    """courier_target_constrained as service/metrics.py declares it (the name is not copied)."""
    metrics = pytest.importorskip("service.metrics")
    [family] = metrics.target_constrained.describe()
    name: str = family.name
    return name


# A CloudWatch metric math expression as Python: enough for the tracked backlog (numbers,
# query ids, IF, FILL, comparisons, AND/OR, arithmetic). A missing data point is None.
_MATH_TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|[A-Za-z_]\w*|>=|<=|==|!=|&&|\|\||[-+*/(),<>])")
_MATH_WORDS = {"IF": "_if", "FILL": "_fill", "AND": " and ", "OR": " or ", "&&": " and "}


def _metric_math(expression: str, values: dict[str, float | None]) -> float | None:
    python = []
    position = 0
    while position < len(expression.rstrip()):
        match = _MATH_TOKEN.match(expression, position)
        assert match, f"cannot read {expression[position:]!r}"
        token = match.group(1)
        position = match.end()
        if token in _MATH_WORDS:
            python.append(_MATH_WORDS[token])
        elif token == "||":
            python.append(" or ")
        elif token[0].isalpha() or token[0] == "_":
            assert token in values, f"{token} is neither a function nor a query id"
            python.append(f"v[{token!r}]")
        else:
            python.append(token)
    scope = {
        "_if": lambda condition, when_true, when_false: when_true if condition else when_false,
        "_fill": lambda value, filler: filler if value is None else value,
        "v": values,
    }
    # Only the tokens above reach eval: numbers, known ids, the two helpers, operators.
    result = eval("".join(python), {"__builtins__": {}}, scope)
    return None if result is None else float(result)


def _tracked_backlog(
    tf: Module, visible: float, in_service: float, constrained: float | None
) -> float | None:
    """What the backlog policy reports to target tracking for one minute of data."""
    _, queries = _backlog_policy(tf)
    target = tf.variables["backlog_per_instance"]["default"]
    values: dict[str, float | None] = {}
    for query_id, query in queries.items():
        if "metric_stat" in query:
            name = _metric(query)["metric_name"]
            values[query_id] = {
                "ApproximateNumberOfMessagesVisible": visible,
                "GroupInServiceInstances": in_service,
            }.get(name, constrained)
    result = None
    for query_id, query in queries.items():  # expressions in the order they are declared
        if "expression" in query:
            expression = resolve(tf, query["expression"])
            expression = expression.replace("${var.backlog_per_instance}", str(target))
            assert "${" not in expression, f"unexpected reference in {expression!r}"
            values[query_id] = _metric_math(expression, values)
            if query["return_data"]:
                result = values[query_id]
    return result


def test_backlog_scaling_reads_the_fleet_wide_constrained_gauge(tf: Module) -> None:
    _, queries = _backlog_policy(tf)
    stats = [_metric(q) for q in queries.values() if "metric_stat" in q]
    [constrained] = [m for m in stats if m["namespace"] == "${var.metrics_namespace}"]
    assert resolve(tf, constrained["metric_name"]) == _constrained_metric_name()
    # One series for the whole fleet: the agent's `job` dimension set (every process of every
    # instance), Maximum = 1 while any process sees any target constrained.
    assert constrained["stat"] == "Maximum"
    [dimension] = constrained["dimensions"]
    assert (dimension["name"], resolve(tf, dimension["value"])) == ("job", "courier")


def test_backlog_scaling_holds_at_the_target_while_a_legacy_target_is_the_bottleneck(
    tf: Module,
) -> None:
    target = tf.variables["backlog_per_instance"]["default"]
    # Not constrained: the backlog per instance as before, so the group scales out.
    assert _tracked_backlog(tf, 5 * target, 2, 0) == 2.5 * target
    # No data from the gauge (an older image, no agent yet): as before, never no data.
    assert _tracked_backlog(tf, 5 * target, 2, None) == 2.5 * target
    # Constrained with a large backlog: exactly the target, so neither the scale-out alarm
    # (above it) nor the scale-in alarm (below it) fires.
    assert _tracked_backlog(tf, 5 * target, 2, 1) == target
    # Constrained with a small backlog: passes through, so scale-in still happens.
    assert _tracked_backlog(tf, 0.6 * target, 2, 1) == 0.3 * target


def test_request_count_per_target_policy_tracks_the_api_target_group(tf: Module) -> None:
    specs = [
        one(p["target_tracking_configuration"], "ttc").get("predefined_metric_specification")
        for p in tf.of_type("aws_autoscaling_policy").values()
    ]
    predefined = [one(s, "predefined_metric_specification") for s in specs if s]
    assert [p["predefined_metric_type"] for p in predefined] == ["ALBRequestCountPerTarget"]
    assert (
        predefined[0]["resource_label"]
        == "${aws_lb.this.arn_suffix}/${aws_lb_target_group.api.arn_suffix}"
    )


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


def _rules(tf: Module) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for kind in ("aws_vpc_security_group_ingress_rule", "aws_vpc_security_group_egress_rule"):
        for name, body in tf.of_type(kind).items():
            yield kind, name, body


def test_instance_security_group_admits_only_the_alb_on_the_api_port(tf: Module) -> None:
    assert not tf.of_type("aws_security_group_rule"), (
        "use aws_vpc_security_group_*_rule resources only"
    )
    for name, group in tf.of_type("aws_security_group").items():
        assert "ingress" not in group, f"inline ingress in aws_security_group.{name}"
        assert "egress" not in group, f"inline egress in aws_security_group.{name}"
    ingress = {
        name: body
        for kind, name, body in _rules(tf)
        if kind.endswith("ingress_rule")
        and body["security_group_id"] == "${aws_security_group.instance.id}"
    }
    assert list(ingress) == ["instance_from_alb"]
    rule = ingress["instance_from_alb"]
    assert rule["referenced_security_group_id"] == "${aws_security_group.alb.id}"
    assert "cidr_ipv4" not in rule
    assert "cidr_ipv6" not in rule
    assert "prefix_list_id" not in rule
    assert (rule["from_port"], rule["to_port"], rule["ip_protocol"]) == (
        "${var.api_port}",
        "${var.api_port}",
        "tcp",
    )


def _literal_port(value: Any, tf: Module) -> list[int]:
    """Literal ports, or the default of a variable port; [] for ports validated elsewhere."""
    if isinstance(value, int):
        return [value]
    if value == "${var.api_port}":
        return [tf.variables["api_port"]["default"]]
    assert value.startswith("${each.value.rule."), f"unexpected port expression {value!r}"
    return []


def test_no_rule_opens_port_22_and_every_rule_is_described(tf: Module) -> None:
    for kind, name, body in _rules(tf):
        assert str(body.get("description", "")).strip(), f"{kind}.{name} has no description"
        assert body["ip_protocol"] in {"tcp", "udp", "${each.value.rule.protocol}"}, (
            f"{kind}.{name}: all ports"
        )
        low, high = _literal_port(body["from_port"], tf), _literal_port(body["to_port"], tf)
        if low and high:
            assert not (low[0] <= 22 <= high[0]), f"{kind}.{name} opens port 22"
    # Variable-driven egress rules are kept off 22 by the variable's validation.
    conditions = [v["condition"] for v in tf.variables["egress_rules"]["validation"]]
    assert any("r.from_port <= 22 && r.to_port >= 22" in c for c in conditions)


def test_no_ingress_from_anywhere_except_the_configured_alb_clients(tf: Module) -> None:
    for kind, name, body in _rules(tf):
        if kind.endswith("ingress_rule"):
            assert body.get("cidr_ipv4") in (None, "${each.value}"), (
                f"{kind}.{name}: literal CIDR ingress"
            )
            if body.get("cidr_ipv4"):
                assert body["security_group_id"] == "${aws_security_group.alb.id}"
                assert body["for_each"] == "${toset(var.alb_ingress_cidr_blocks)}"
    assert "default" not in tf.variables["alb_ingress_cidr_blocks"], (
        "clients must be chosen explicitly"
    )


# --------------------------------------------------------------------------------------
# Load balancer
# --------------------------------------------------------------------------------------


def test_the_largest_drain_allowed_still_stops_before_systemd_kills(tf: Module) -> None:
    """drain_seconds goes into courier.toml; the unit's TimeoutStopSec is fixed. The largest
    value the variable accepts, plus the worker's release and the exit, must fit in it."""
    import re

    from service import daemon
    from service.settings import load_settings

    conditions = " ".join(v["condition"] for v in tf.variables["drain_seconds"]["validation"])
    bound = re.search(r"var\.drain_seconds <= (\d+)", conditions)
    assert bound, f"drain_seconds needs an upper bound: {conditions}"
    unit = (REPO / "systemd" / "courier@.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)", unit, flags=re.MULTILINE)
    assert stop, "courier@.service must set TimeoutStopSec"
    timeout = float(stop[1])
    settings = load_settings(environ={"COURIER_HTTP_DRAIN_SECONDS": bound[1]})
    assert daemon.stop_bound_seconds(settings) < timeout


def test_target_group_drains_for_the_drain_bound_and_checks_readyz(tf: Module) -> None:
    group = tf.resource("aws_lb_target_group", "api")
    assert group["deregistration_delay"] == "${var.drain_seconds}"
    assert group["port"] == "${var.api_port}"
    health = one(group.get("health_check"), "health_check")
    assert health["path"] == "/readyz"
    assert "drain_seconds = var.drain_seconds" in tf.locals["courier_config"], (
        "courier.toml must get the same bound"
    )


def test_alb_serves_modern_tls_redirects_http_and_logs(tf: Module) -> None:
    alb = tf.resource("aws_lb", "this")
    assert alb["drop_invalid_header_fields"] is True
    assert alb["enable_deletion_protection"] == "${var.deletion_protection}"
    assert one(alb["access_logs"], "access_logs")["enabled"] is True
    https = tf.resource("aws_lb_listener", "https")
    assert (https["protocol"], https["port"], https["ssl_policy"]) == (
        "HTTPS",
        443,
        "${var.ssl_policy}",
    )
    assert tf.variables["ssl_policy"]["default"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    redirect = one(
        tf.resource("aws_lb_listener", "http_redirect")["default_action"], "default_action"
    )
    assert redirect["type"] == "redirect"
    assert one(redirect["redirect"], "redirect")["protocol"] == "HTTPS"


PUBLIC_PATHS = {"/v1/*", "/openapi.json", "/healthz"}


def test_https_listener_answers_404_for_anything_but_the_public_api(tf: Module) -> None:
    # /readyz (readiness details) and /metrics must not be reachable through the ALB.
    https = tf.resource("aws_lb_listener", "https")
    default = one(https["default_action"], "default_action")
    assert default["type"] == "fixed-response"
    assert "target_group_arn" not in default
    fixed = one(default["fixed_response"], "fixed_response")
    assert str(fixed["status_code"]) == "404"
    assert fixed["content_type"] == "application/json"  # the rendered body: module.tftest.hcl


def test_listener_rules_forward_exactly_the_public_paths_to_the_api(tf: Module) -> None:
    rules = {
        name: rule
        for name, rule in tf.of_type("aws_lb_listener_rule").items()
        if rule["listener_arn"] == "${aws_lb_listener.https.arn}"
    }
    assert rules, "no listener rule forwards the public API"
    paths: list[str] = []
    for name, rule in rules.items():
        action = one(rule["action"], f"{name}.action")
        assert action["type"] == "forward", f"{name} must forward"
        assert action["target_group_arn"] == "${aws_lb_target_group.api.arn}"
        for condition in as_list(rule["condition"]):
            assert set(condition) == {"path_pattern"}, f"{name}: conditions on paths only"
            paths += resolve(tf, one(condition["path_pattern"], "path_pattern")["values"])
    assert sorted(paths) == sorted(PUBLIC_PATHS)
    # The health check reaches /readyz on the instance's port directly, not via the listener.
    health = one(tf.resource("aws_lb_target_group", "api")["health_check"], "health_check")
    assert (health["path"], health["port"]) == ("/readyz", "traffic-port")


# --------------------------------------------------------------------------------------
# Queue and data
# --------------------------------------------------------------------------------------


def test_queues_are_encrypted_with_the_data_cmk(tf: Module) -> None:
    queues = tf.of_type("aws_sqs_queue")
    assert set(queues) == {"work", "dlq"}
    for name, queue in queues.items():
        assert queue["kms_master_key_id"] == DATA_KEY, (
            f"aws_sqs_queue.{name} is not encrypted with the CMK"
        )
        assert (
            queue["kms_data_key_reuse_period_seconds"] == "${var.kms_data_key_reuse_period_seconds}"
        )
        assert "sqs_managed_sse_enabled" not in queue
    assert queues["dlq"]["message_retention_seconds"] == 1209600


def test_work_queue_redrives_to_the_dlq_and_only_it_may(tf: Module) -> None:
    work = tf.resource("aws_sqs_queue", "work")
    redrive = work["redrive_policy"]["__jsonencode__"]
    assert redrive == {
        "deadLetterTargetArn": "${aws_sqs_queue.dlq.arn}",
        "maxReceiveCount": "${var.max_receive_count}",
    }
    allow = tf.resource("aws_sqs_queue_redrive_allow_policy", "dlq")
    assert allow["queue_url"] == "${aws_sqs_queue.dlq.id}"
    assert allow["redrive_allow_policy"]["__jsonencode__"] == {
        "redrivePermission": "byQueue",
        "sourceQueueArns": ["${aws_sqs_queue.work.arn}"],
    }


def test_tables_are_encrypted_with_the_cmk_and_recoverable(tf: Module) -> None:
    tables = tf.of_type("aws_dynamodb_table")
    assert set(tables) == {"status", "credstash"}
    for name, table in tables.items():
        sse = one(table.get("server_side_encryption"), f"{name} server_side_encryption")
        assert sse["enabled"] is True, f"table {name} has no server-side encryption"
        assert sse["kms_key_arn"] == DATA_KEY, f"table {name} is not encrypted with the CMK"
        assert one(table.get("point_in_time_recovery"), "point_in_time_recovery")["enabled"] is True
        assert table["billing_mode"] == "PAY_PER_REQUEST"


def test_credstash_table_keeps_the_credstash_key_schema(tf: Module) -> None:
    table = tf.resource("aws_dynamodb_table", "credstash")
    assert (table["hash_key"], table["range_key"]) == ("name", "version")
    assert sorted((a["name"], a["type"]) for a in table["attribute"]) == [
        ("name", "S"),
        ("version", "S"),
    ]
    assert tf.variables["credstash_table_name"]["default"] == "credential-store"


def test_status_table_has_pk_and_expires_at_ttl(tf: Module) -> None:
    table = tf.resource("aws_dynamodb_table", "status")
    assert table["hash_key"] == "pk"
    assert "range_key" not in table
    assert [(a["name"], a["type"]) for a in table["attribute"]] == [("pk", "S")]
    ttl = one(table.get("ttl"), "ttl")
    assert (ttl["attribute_name"], ttl["enabled"]) == ("expires_at", True)


def test_kms_keys_rotate(tf: Module) -> None:
    keys = tf.of_type("aws_kms_key")
    assert set(keys) == {"data", "credstash"}
    for name, key in keys.items():
        assert key["enable_key_rotation"] is True, f"aws_kms_key.{name} does not rotate"
        policy = key["policy"]["__jsonencode__"]
        assert isinstance(policy, str)
        assert policy.removeprefix("${local.").removesuffix("}") in KEY_POLICY_LOCALS


# --------------------------------------------------------------------------------------
# IAM
# --------------------------------------------------------------------------------------


def _identity_statements(tf: Module) -> Iterator[tuple[str, dict[str, Any]]]:
    for (kind, name), body in tf.data.items():
        if kind == "aws_iam_policy_document":
            for statement in body.get("statement", []):
                yield name, statement


def test_identity_policies_name_their_resources_except_listed_exceptions(tf: Module) -> None:
    seen = set()
    for document, statement in _identity_statements(tf):
        assert "*" not in as_list(statement.get("actions", [])), f"{document}: Action '*'"
        if "*" not in as_list(statement.get("resources", [])):
            continue
        key = (document, statement.get("sid"))
        assert key in STAR_RESOURCE_EXCEPTIONS, (
            f"{document}/{statement.get('sid')}: Resource '*' not allowed"
        )
        seen.add(key)
        _, required_condition = STAR_RESOURCE_EXCEPTIONS[key]
        if required_condition:
            variables = [c["variable"] for c in statement.get("condition", [])]
            assert required_condition in variables, (
                f"{key} needs its {required_condition} condition"
            )
    assert seen == set(STAR_RESOURCE_EXCEPTIONS), (
        f"stale exceptions: {set(STAR_RESOURCE_EXCEPTIONS) - seen}"
    )


def test_key_policies_use_star_only_as_this_key_and_never_an_open_principal(tf: Module) -> None:
    for local_name in KEY_POLICY_LOCALS:
        statements = [resolve(tf, s) for s in tf.locals[local_name]["Statement"]]
        assert statements, f"{local_name} has no statements"
        for statement in statements:
            assert statement["Resource"] == "*"  # the key itself: the only value AWS accepts
            principal = statement["Principal"]
            if principal.get("AWS") == "*":
                assert "kms:CallerAccount" in statement["Condition"]["StringEquals"], (
                    "open principal"
                )
                assert "kms:ViaService" in statement["Condition"]["StringEquals"], "open principal"


def test_instance_role_has_exactly_the_access_courier_needs(tf: Module) -> None:
    statements = {s["sid"]: s for d, s in _identity_statements(tf) if d == "instance"}
    assert set(statements["WorkQueueAndDlq"]["resources"]) == {
        "${aws_sqs_queue.work.arn}",
        "${aws_sqs_queue.dlq.arn}",
    }
    assert set(statements["WorkQueueAndDlq"]["actions"]) == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:SendMessage",
        "sqs:GetQueueAttributes",
    }
    # No DeleteItem, no Query, no transactions: courier never calls them on the status table.
    assert set(statements["StatusTable"]["actions"]) == {
        "dynamodb:BatchWriteItem",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
    }
    assert statements["StatusTable"]["resources"] == ["${aws_dynamodb_table.status.arn}"]
    assert set(statements["CredStashTableRead"]["actions"]) == {
        "dynamodb:Query",
        "dynamodb:GetItem",
    }
    assert statements["DataKeyUse"]["resources"] == [DATA_KEY]
    assert set(statements["DataKeyUse"]["actions"]) == {"kms:GenerateDataKey", "kms:Decrypt"}
    assert statements["CredStashDecrypt"]["actions"] == ["kms:Decrypt"]
    assert statements["CredStashKeyDescribe"]["actions"] == ["kms:DescribeKey"]
    assert statements["CredStashKeyDescribe"]["resources"] == ["${local.credstash_key_arn}"]
    lifecycle = statements["OwnLifecycleHook"]
    assert lifecycle["actions"] == ["autoscaling:CompleteLifecycleAction"]
    assert lifecycle["resources"] == ["${local.asg_arn}"]
    assert tf.locals["asg_arn"].endswith(":autoScalingGroupName/${local.asg_name}")
    attachments = tf.of_type("aws_iam_role_policy_attachment")
    assert [a["policy_arn"] for a in attachments.values()] == [
        "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
    ]


def _instance_statements(tf: Module) -> dict[str, dict[str, Any]]:
    return {s["sid"]: s for d, s in _identity_statements(tf) if d == "instance"}


def test_credstash_read_is_limited_to_the_secret_names_courier_is_configured_with(
    tf: Module,
) -> None:
    read = _instance_statements(tf)["CredStashTableRead"]
    [condition] = read["condition"]
    assert (condition["test"], condition["variable"]) == (
        "ForAllValues:StringEquals",
        "dynamodb:LeadingKeys",
    )
    assert condition["values"] == "${local.credstash_secret_names}"
    # The names come from the same variables that put them into courier.toml.
    names = tf.locals["credstash_secret_names"]
    for source in (
        "var.jwt_hs256_secret",
        "var.idm_api_key_secret",
        "for target in var.targets : target.secret",
    ):
        assert source in names, f"credstash_secret_names does not include {source}"
    assert "compact(" in names  # an empty name (e.g. a target without a secret) is no grant


def test_credstash_decrypt_requires_exactly_the_deployment_encryption_context(
    tf: Module,
) -> None:
    decrypt = _instance_statements(tf)["CredStashDecrypt"]
    assert decrypt["resources"] == ["${local.credstash_key_arn}"]
    dynamic_condition = decrypt["dynamic"][0]["condition"]
    assert dynamic_condition["for_each"] == "${var.credstash_encryption_context}"
    content = dynamic_condition["content"][0]
    assert (content["test"], content["variable"], content["values"]) == (
        "StringEquals",
        "kms:EncryptionContext:${condition.key}",
        ["${condition.value}"],
    )
    # No context key beyond the configured ones; with none configured, no context at all.
    [keys] = decrypt["condition"]
    assert keys["variable"] == "kms:EncryptionContextKeys"
    assert "ForAllValues:StringEquals" in keys["test"]
    assert "Null" in keys["test"]
    assert "keys(var.credstash_encryption_context)" in keys["values"]


def test_previous_data_keys_may_only_be_decrypted(tf: Module) -> None:
    document = tf.data[("aws_iam_policy_document", "instance")]
    [dynamic] = [d["statement"] for d in document["dynamic"] if "statement" in d]
    assert "var.envelope_accepted_key_arns" in dynamic["for_each"]
    content = dynamic["content"][0]
    assert content["actions"] == ["kms:Decrypt"]
    assert content["resources"] == "${var.envelope_accepted_key_arns}"


def test_credstash_settings_are_rendered_from_what_iam_allows(tf: Module) -> None:
    config = tf.locals["courier_config"]
    assert "secrets_encryption_context = var.credstash_encryption_context" in _squash(config)
    assert "secrets_kms_key_id = local.credstash_key_arn" in _squash(config)
    assert "accepted_key_ids = var.envelope_accepted_key_arns" in _squash(config)


def _squash(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------


def test_every_taggable_resource_merges_the_module_tags(tf: Module) -> None:
    assert tf.locals["tags"].startswith("${merge(var.tags,")
    for (kind, name), body in tf.resources.items():
        if kind in UNTAGGABLE:
            continue
        if kind == "aws_autoscaling_group":
            tags = {n: b for entry in body["dynamic"] for n, b in entry.items()}["tag"]["for_each"]
        else:
            assert "tags" in body, f"{kind}.{name} has no tags"
            tags = body["tags"]
        assert tags.startswith("${merge(local.tags"), f"{kind}.{name} does not merge local.tags"


def test_every_variable_is_typed_and_described(parsed_files: dict[str, Any]) -> None:
    count = 0
    for path, parsed in parsed_files.items():
        for entry in parsed.get("variable", []):
            for name, body in entry.items():
                count += 1
                assert body.get("type"), f"{path}: variable {name} has no type"
                assert str(body.get("description", "")).strip(), (
                    f"{path}: variable {name} has no description"
                )
    assert count > 40


def test_example_calls_the_module_from_the_repository(parsed_files: dict[str, Any]) -> None:
    modules = {}
    for entry in parsed_files["examples/complete/main.tf"]["module"]:
        modules.update(entry)
    assert modules["courier"]["source"] == "../../"


def test_provider_is_pinned(parsed_files: dict[str, Any]) -> None:
    for path in ("versions.tf", "examples/complete/versions.tf"):
        terraform = one(parsed_files[path]["terraform"], f"{path} terraform")
        assert terraform["required_version"] == ">= 1.5"
        aws = terraform["required_providers"][0]["aws"]
        assert (aws["source"], aws["version"]) == ("hashicorp/aws", "~> 5.100")


# --------------------------------------------------------------------------------------
# Rendered templates (needs the terraform binary; no providers, no network)
# --------------------------------------------------------------------------------------

TEMPLATE_VALUES: dict[str, Any] = {
    "role": "all",
    "api_port": 8080,
    "drain_seconds": 20,
    "log_level": "INFO",
    "region": "eu-west-1",
    "queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/courier-work",
    "dlq_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/courier-dlq",
    "status_table": "courier-status",
    "secrets_table": "credential-store",
    "secrets_ttl_seconds": 300,
    "kms_key_id": "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555",
    "jwt_issuer": "https://login.example.net/",
    # Quotes, backslashes and non-ASCII must survive the TOML rendering.
    "jwt_audience": 'courier "prod" \\ é <&>',
    "jwks_url": "",
    "jwt_hs256_secret": "courier.jwt.hs256",
    "idm_url": "https://idm.example.net",
    "idm_api_key_secret": "courier.idm.api_key",
    "max_in_flight": 100,
    "secrets_encryption_context": {"app": "courier", "env": 'prod "eu"'},
    "secrets_kms_key_id": "arn:aws:kms:eu-west-1:123456789012:key/99999999-2222-3333-4444-555555555555",
    "accepted_key_ids": [
        "arn:aws:kms:eu-west-1:123456789012:key/00000000-2222-3333-4444-555555555555"
    ],
    "metrics_base_port": 9100,
    "asg_name": "courier-asg",
    "lifecycle_hook_name": "courier-drain",
    "targets": [
        {
            "name": "mail",
            "url": "https://mail.example.net/api",
            "format": "json",
            "secret": "courier.target.mail",
            "timeout_seconds": 0.5,
            "concurrency": 32,
        },
        {
            "name": "billing",
            "url": "https://billing.example.net/soap",
            "format": "soap",
            "secret": "",
            "timeout_seconds": 5,
            "concurrency": 8,
        },
    ],
}


def _render(template: str, values: dict[str, Any], tmp_path: Path) -> str:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed: the templates cannot be rendered")
    env = {**os.environ, "CHECKPOINT_DISABLE": "1"}
    if env.get("TF_CLI_CONFIG_FILE") and not Path(env["TF_CLI_CONFIG_FILE"]).exists():
        del env["TF_CLI_CONFIG_FILE"]
    # JSON is valid HCL expression syntax; escape template sequences inside its strings.
    literal = json.dumps(values).replace("${", "$${").replace("%{", "%%{")
    expression = f"base64encode(templatefile({json.dumps(str(TERRAFORM / 'templates' / template))}, {literal}))"
    result = subprocess.run(
        [terraform, "console", "-no-color"],
        input=expression,
        cwd=tmp_path,  # an empty directory: no configuration, no providers
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"terraform console failed:\n{result.stderr}"
    return base64.b64decode(result.stdout.strip().strip('"')).decode()


def test_rendered_courier_toml_is_accepted_by_the_daemon(tmp_path: Path) -> None:
    settings_module = pytest.importorskip("service.settings")
    rendered = _render("courier.toml.tftpl", TEMPLATE_VALUES, tmp_path)
    document = tomllib.loads(rendered)
    assert document["auth"]["audience"] == TEMPLATE_VALUES["jwt_audience"]
    assert [t["name"] for t in document["targets"]] == ["mail", "billing"]
    path = tmp_path / "courier.toml"
    path.write_text(rendered)
    settings = settings_module.load_settings(path, environ={})
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == 8080
    assert settings.http.drain_seconds == 20
    assert settings.queue.dlq_url == TEMPLATE_VALUES["dlq_url"]
    assert settings.envelope.kms_key_id == TEMPLATE_VALUES["kms_key_id"]
    assert [(t.name, t.format) for t in settings.targets] == [("mail", "json"), ("billing", "soap")]
    assert settings.http.metrics_port == 9100
    assert (settings.ec2.enabled, settings.ec2.asg_name, settings.ec2.lifecycle_hook) == (
        "on",
        "courier-asg",
        "courier-drain",
    )


def test_rendered_courier_toml_carries_the_credstash_context_key_and_accepted_keys(
    tmp_path: Path,
) -> None:
    settings_module = pytest.importorskip("service.settings")
    path = tmp_path / "courier.toml"
    for context in (TEMPLATE_VALUES["secrets_encryption_context"], {}):
        values = {**TEMPLATE_VALUES, "secrets_encryption_context": context}
        path.write_text(_render("courier.toml.tftpl", values, tmp_path))
        settings = settings_module.load_settings(path, environ={})
        assert dict(settings.secrets.encryption_context) == context
        assert settings.secrets.kms_key_id == TEMPLATE_VALUES["secrets_kms_key_id"]
        assert settings.envelope.accepted_key_ids == tuple(TEMPLATE_VALUES["accepted_key_ids"])


def test_rendered_user_data_is_valid_bash_with_valid_agent_config(tmp_path: Path) -> None:
    config = _render("courier.toml.tftpl", TEMPLATE_VALUES, tmp_path)
    agent = _render(
        "cloudwatch-agent.json.tftpl",
        {"log_group_name": "/courier/courier", "metrics_namespace": "Courier"},
        tmp_path,
    )
    agent_config = json.loads(agent)
    assert (
        agent_config["metrics"]["append_dimensions"]["AutoScalingGroupName"]
        == "${aws:AutoScalingGroupName}"
    )
    # The agent reads Prometheus scraping from logs.metrics_collected (AWS's documented layout).
    emf = agent_config["logs"]["metrics_collected"]["prometheus"]["emf_processor"]
    assert emf["metric_namespace"] == "Courier"
    assert any(
        "^courier_target_circuit_open$" in d["metric_selectors"] and d["dimensions"] == [["target"]]
        for d in emf["metric_declaration"]
    )
    user_data = _render(
        "user_data.sh.tftpl",
        {
            "courier_config": config,
            "cloudwatch_agent_config": agent,
            "metrics_base_port": 9100,
            "asg_name": "courier",
            "lifecycle_hook_name": "courier-drain",
            "region": "eu-west-1",
        },
        tmp_path,
    )
    assert user_data.startswith("#!/bin/bash\n")
    assert config in user_data
    assert "systemctl restart courier.target" in user_data
    script = tmp_path / "user_data.sh"
    script.write_text(user_data)
    check = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert check.returncode == 0, check.stderr
    assert len(user_data.encode()) < 16 * 1024 * 3 // 4, (
        "user data must stay below 16 KiB once base64-encoded"
    )


# --------------------------------------------------------------------------------------
# The constrained-target signal: shipped, alarmed on, plotted
# --------------------------------------------------------------------------------------


def _constrained_declarations(agent_config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    processor = agent_config["logs"]["metrics_collected"]["prometheus"]["emf_processor"]
    return [
        d
        for d in processor["metric_declaration"]
        if any(re.fullmatch(selector.strip("^$"), name) for selector in d["metric_selectors"])
    ]


def test_both_agent_configs_ship_the_constrained_gauge_per_target_and_fleet_wide(
    tf: Module, tmp_path: Path
) -> None:
    """The AMI's agent configuration and the one Terraform's user data installs declare the
    gauge the same way: per target (alarms, dashboard) and under the scrape job alone (one
    fleet-wide series, what the backlog scaling policy reads)."""
    name = _constrained_metric_name()
    job = resolve(tf, "${local.prometheus_job}")
    rendered = json.loads(
        _render(
            "cloudwatch-agent.json.tftpl",
            {"log_group_name": "/courier/courier", "metrics_namespace": "Courier"},
            tmp_path,
        )
    )
    baked = json.loads((REPO / "packer" / "files" / "cloudwatch-agent.json").read_text())
    declarations = []
    for config in (rendered, baked):
        [declaration] = _constrained_declarations(config, name)
        assert declaration["source_labels"] == ["job"]
        assert re.fullmatch(declaration["label_matcher"], job)
        assert sorted(declaration["dimensions"]) == [["job"], ["target"]]
        declarations.append(declaration)
    assert declarations[0] == declarations[1], "the two agent configurations disagree"
    # `job` is the scrape job's name in both scrape configurations.
    user_data = (TERRAFORM / "templates" / "user_data.sh.tftpl").read_text()
    scrape = (REPO / "packer" / "files" / "prometheus.yaml").read_text()
    for text in (user_data, scrape):
        assert re.findall(r"job_name: (\S+)", text) == [job]


def test_every_target_gets_a_bottleneck_alarm_that_does_not_roll_back_a_release(
    tf: Module,
) -> None:
    alarm = tf.resource("aws_cloudwatch_metric_alarm", "target_constrained")
    # One per configured target, like the circuit-open alarms.
    assert (
        alarm["for_each"] == tf.resource("aws_cloudwatch_metric_alarm", "circuit_open")["for_each"]
    )
    assert resolve(tf, alarm["metric_name"]) == _constrained_metric_name()
    assert alarm["namespace"] == "${var.metrics_namespace}"
    assert alarm["dimensions"] == {"target": "${each.key}"}
    assert (alarm["statistic"], alarm["threshold"]) == ("Maximum", 1)
    assert alarm["comparison_operator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["alarm_actions"] == "${local.alarm_actions}"
    rollout = resolve(tf, "${local.rollout_alarm_names}")
    assert not any("target_constrained" in name for name in rollout)


def test_dashboard_plots_the_constrained_gauge_and_the_tracked_backlog(tf: Module) -> None:
    widgets = resolve(tf, "${local.dashboard_widgets}")
    text = json.dumps(widgets)
    assert "${local.metric_target_constrained}" in text
    assert "${local.backlog_tracked_expression}" in text, "the dashboard plots what scaling tracks"
    _, queries = _backlog_policy(tf)
    [returned] = [q for q in queries.values() if q["return_data"] is True]
    assert returned["expression"] == "${local.backlog_tracked_expression}"
