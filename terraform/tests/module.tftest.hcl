# Offline plan/apply tests of the module against a mocked AWS provider (no account, no
# network): `terraform test` after `terraform init`. check.sh runs them. They exercise what
# `terraform validate` cannot: variable validation, preconditions and rendered values.

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }

  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }

  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }

  mock_data "aws_ami" {
    defaults = { root_device_name = "/dev/xvda", root_device_type = "ebs" }
  }

  mock_data "aws_elb_service_account" {
    defaults = { arn = "arn:aws:iam::156460612806:root" }
  }

  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }

  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555" }
  }

  mock_resource "aws_lb" {
    defaults = {
      arn        = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/courier/0123456789abcdef"
      arn_suffix = "app/courier/0123456789abcdef"
    }
  }

  mock_resource "aws_lb_listener" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/courier/0123456789abcdef/fedcba9876543210" }
  }

  mock_resource "aws_lb_target_group" {
    defaults = {
      arn        = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/courier-api/0123456789abcdef"
      arn_suffix = "targetgroup/courier-api/0123456789abcdef"
    }
  }

  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/courier-instance" }
  }

  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0", latest_version = 3 }
  }

  mock_resource "aws_sqs_queue" {
    defaults = {
      arn = "arn:aws:sqs:eu-west-1:123456789012:courier-work"
      url = "https://sqs.eu-west-1.amazonaws.com/123456789012/courier-work"
    }
  }
}

# Two Availability Zones per subnet list; a run can override one to break that.
override_data {
  target = data.aws_subnet.alb["subnet-0aaaaaaaaaaaaaaa1"]
  values = { id = "subnet-0aaaaaaaaaaaaaaa1", vpc_id = "vpc-0123456789abcdef0", availability_zone = "eu-west-1a" }
}

override_data {
  target = data.aws_subnet.alb["subnet-0aaaaaaaaaaaaaaa2"]
  values = { id = "subnet-0aaaaaaaaaaaaaaa2", vpc_id = "vpc-0123456789abcdef0", availability_zone = "eu-west-1b" }
}

override_data {
  target = data.aws_subnet.private["subnet-0bbbbbbbbbbbbbbb1"]
  values = { id = "subnet-0bbbbbbbbbbbbbbb1", vpc_id = "vpc-0123456789abcdef0", availability_zone = "eu-west-1a", map_public_ip_on_launch = false }
}

override_data {
  target = data.aws_subnet.private["subnet-0bbbbbbbbbbbbbbb2"]
  values = { id = "subnet-0bbbbbbbbbbbbbbb2", vpc_id = "vpc-0123456789abcdef0", availability_zone = "eu-west-1b", map_public_ip_on_launch = false }
}

variables {
  vpc_id                  = "vpc-0123456789abcdef0"
  alb_subnet_ids          = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
  private_subnet_ids      = ["subnet-0bbbbbbbbbbbbbbb1", "subnet-0bbbbbbbbbbbbbbb2"]
  alb_ingress_cidr_blocks = ["203.0.113.0/24"]
  certificate_arn         = "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
  ami_id                  = "ami-0123456789abcdef0"
  jwt_issuer              = "https://login.example.net/"
  jwt_audience            = "courier"
  idm_url                 = "https://idm.example.net"
  alarm_sns_topic_arn     = "arn:aws:sns:eu-west-1:123456789012:courier-alarms"
  targets = [
    { name = "mail", url = "https://mail.example.net/api", secret = "courier.target.mail" },
    { name = "billing", url = "https://billing.example.net/soap", format = "soap" },
  ]
}

run "defaults" {
  command = apply

  assert {
    condition     = aws_lb_target_group.api.deregistration_delay == "20" && aws_lb_target_group.api.health_check[0].path == "/readyz"
    error_message = "The target group must drain for drain_seconds and check /readyz."
  }

  assert {
    condition     = aws_lb_listener.https.default_action[0].type == "fixed-response" && aws_lb_listener.https.default_action[0].fixed_response[0].status_code == "404" && jsondecode(aws_lb_listener.https.default_action[0].fixed_response[0].message_body).type == "urn:courier:problem:not-found"
    error_message = "The HTTPS listener must answer anything no rule forwards with a 404 problem, never reach an instance."
  }

  assert {
    condition     = length(aws_lb_listener_rule.public_api.condition) == 1 && toset(one(aws_lb_listener_rule.public_api.condition).path_pattern[0].values) == toset(["/v1/*", "/openapi.json", "/healthz"])
    error_message = "Exactly /v1/*, /openapi.json and /healthz are forwarded: never /readyz or /metrics."
  }

  assert {
    condition     = aws_lb_listener_rule.public_api.listener_arn == aws_lb_listener.https.arn && aws_lb_listener_rule.public_api.action[0].type == "forward" && aws_lb_listener_rule.public_api.action[0].target_group_arn == aws_lb_target_group.api.arn
    error_message = "The public paths must be forwarded to the API target group by the HTTPS listener."
  }

  assert {
    condition     = aws_launch_template.courier.metadata_options[0].http_tokens == "required" && aws_launch_template.courier.metadata_options[0].http_put_response_hop_limit == 1
    error_message = "IMDSv2 must be required with a hop limit of 1."
  }

  assert {
    condition     = aws_autoscaling_group.courier.instance_refresh[0].preferences[0].checkpoint_percentages == tolist([10, 50, 100]) && aws_autoscaling_group.courier.instance_refresh[0].preferences[0].auto_rollback
    error_message = "The instance refresh must be a canary with auto rollback."
  }

  assert {
    condition     = length(aws_autoscaling_group.courier.instance_refresh[0].preferences[0].alarm_specification[0].alarms) == 4
    error_message = "The rollout alarms must be attached to the instance refresh."
  }

  assert {
    condition     = strcontains(output.courier_config, "port = 8080") && strcontains(output.courier_config, "drain_seconds = 20") && strcontains(output.courier_config, "name = \"billing\"")
    error_message = "courier.toml must carry the API port, the drain bound and every target."
  }

  assert {
    condition     = length(aws_cloudwatch_metric_alarm.circuit_open) == 2
    error_message = "Every target gets a circuit-open alarm."
  }

  assert {
    condition     = length(aws_cloudwatch_metric_alarm.target_constrained) == 2 && aws_cloudwatch_metric_alarm.target_constrained["billing"].dimensions.target == "billing"
    error_message = "Every target gets a target-constrained (bottleneck) alarm."
  }

  assert {
    condition     = anytrue([for m in aws_autoscaling_policy.queue_backlog.target_tracking_configuration[0].customized_metric_specification[0].metrics : m.return_data && m.expression == "IF(FILL(constrained, 0) > 0 AND backlog > 1000, 1000, backlog)"])
    error_message = "Backlog scaling must track the backlog per instance held at the target value (1000) while a legacy target is constrained."
  }

  assert {
    condition     = strcontains(aws_cloudwatch_dashboard.courier.dashboard_body, "courier_target_constrained") && strcontains(aws_cloudwatch_dashboard.courier.dashboard_body, "\"annotations\":{\"horizontal\":[{\"label\":\"target (backlog_per_instance)\",\"value\":1000}]}")
    error_message = "The dashboard must plot the constrained gauge and the backlog per instance against its target."
  }

  assert {
    condition     = aws_sqs_queue.work.name == "courier-work" && aws_sqs_queue.dlq.message_retention_seconds == 1209600
    error_message = "Standard queues by default, and a DLQ that keeps messages 14 days."
  }

  assert {
    condition     = aws_dynamodb_table.credstash[0].hash_key == "name" && aws_dynamodb_table.credstash[0].range_key == "version"
    error_message = "The CredStash table must keep credstash's key schema."
  }

  assert {
    condition     = length(aws_wafv2_web_acl_association.this) == 0 && length(aws_kms_key.credstash) == 1
    error_message = "No WAF association without a web ACL; a CredStash key is created when none is given."
  }
}

run "fifo_existing_credstash_waf_spot" {
  command = plan

  variables {
    fifo_queue             = true
    create_credstash_table = false
    credstash_kms_key_arn  = "arn:aws:kms:eu-west-1:123456789012:key/99999999-2222-3333-4444-555555555555"
    web_acl_arn            = "arn:aws:wafv2:eu-west-1:123456789012:regional/webacl/courier/abc"
    mixed_instances        = { instance_types = ["c6i.large", "c7i.large"] }
  }

  assert {
    condition     = aws_sqs_queue.work.name == "courier-work.fifo" && aws_sqs_queue.work.content_based_deduplication
    error_message = "FIFO queues need the .fifo suffix and content-based deduplication."
  }

  assert {
    condition     = length(aws_dynamodb_table.credstash) == 0 && length(aws_kms_key.credstash) == 0 && length(aws_wafv2_web_acl_association.this) == 1
    error_message = "An existing CredStash store and key are used as given; a web ACL is associated."
  }

  assert {
    condition     = length(aws_autoscaling_group.courier.mixed_instances_policy) == 1 && length(aws_autoscaling_group.courier.launch_template) == 0
    error_message = "mixed_instances replaces the plain launch template with a mixed instances policy."
  }
}

run "backlog_hold_follows_the_target_value" {
  command = plan

  variables {
    backlog_per_instance = 250.5
  }

  assert {
    condition     = anytrue([for m in aws_autoscaling_policy.queue_backlog.target_tracking_configuration[0].customized_metric_specification[0].metrics : m.return_data && m.expression == "IF(FILL(constrained, 0) > 0 AND backlog > 250.5, 250.5, backlog)"])
    error_message = "The hold must be the policy's own target value."
  }
}

run "rejects_drain_beyond_the_unit_stop_timeout" {
  command = plan

  variables {
    drain_seconds = 23
  }

  expect_failures = [var.drain_seconds]
}

run "rejects_warm_pool_with_spot" {
  command = plan

  variables {
    warm_pool       = {}
    mixed_instances = { instance_types = ["c6i.large", "c7i.large"] }
  }

  expect_failures = [aws_autoscaling_group.courier]
}

run "rejects_checkpoints_not_ending_at_100" {
  command = plan

  variables {
    instance_refresh = { checkpoint_percentages = [10, 50] }
  }

  expect_failures = [var.instance_refresh]
}

run "rejects_ssh_egress" {
  command = plan

  variables {
    egress_rules = [{ description = "sftp", cidr_blocks = ["10.0.0.0/8"], from_port = 22, to_port = 22 }]
  }

  expect_failures = [var.egress_rules]
}

run "rejects_duplicate_target_names" {
  command = plan

  variables {
    targets = [
      { name = "mail", url = "https://a.example.net" },
      { name = "mail", url = "https://b.example.net" },
    ]
  }

  expect_failures = [var.targets]
}

run "rejects_plain_http_jwks" {
  command = plan

  variables {
    jwks_url = "http://login.example.net/jwks.json"
  }

  expect_failures = [var.jwks_url]
}

run "rejects_private_subnets_in_one_zone" {
  command = plan

  override_data {
    target = data.aws_subnet.private["subnet-0bbbbbbbbbbbbbbb2"]
    values = { id = "subnet-0bbbbbbbbbbbbbbb2", vpc_id = "vpc-0123456789abcdef0", availability_zone = "eu-west-1a", map_public_ip_on_launch = false }
  }

  expect_failures = [aws_autoscaling_group.courier]
}

run "rejects_subnet_of_another_vpc" {
  command = plan

  override_data {
    target = data.aws_subnet.alb["subnet-0aaaaaaaaaaaaaaa2"]
    values = { id = "subnet-0aaaaaaaaaaaaaaa2", vpc_id = "vpc-0fedcba9876543210", availability_zone = "eu-west-1b" }
  }

  expect_failures = [data.aws_subnet.alb]
}

run "credstash_scope_and_envelope_rotation" {
  command = apply

  variables {
    credstash_kms_key_arn        = "arn:aws:kms:eu-west-1:123456789012:key/99999999-2222-3333-4444-555555555555"
    credstash_encryption_context = { app = "courier", env = "prod" }
    envelope_accepted_key_arns   = ["arn:aws:kms:eu-west-1:123456789012:key/00000000-2222-3333-4444-555555555555"]
  }

  assert {
    condition     = local.credstash_secret_names == tolist(["courier.jwt.hs256", "courier.idm.api_key", "courier.target.mail"])
    error_message = "The CredStash read must be scoped to exactly the secret names in courier.toml (billing has none)."
  }

  assert {
    condition     = strcontains(output.courier_config, "encryption_context = { \"app\" = \"courier\", \"env\" = \"prod\" }") && strcontains(output.courier_config, "kms_key_id = \"arn:aws:kms:eu-west-1:123456789012:key/99999999-2222-3333-4444-555555555555\"")
    error_message = "courier.toml must carry the encryption context and the CredStash key ARN that IAM allows."
  }

  assert {
    condition     = strcontains(output.courier_config, "accepted_key_ids = [\"arn:aws:kms:eu-west-1:123456789012:key/00000000-2222-3333-4444-555555555555\"]")
    error_message = "courier.toml must list the previous data keys as envelope.accepted_key_ids."
  }
}

run "rejects_reserved_encryption_context_key" {
  command = plan

  variables {
    credstash_encryption_context = { "aws:sqs:arn" = "x" }
  }

  expect_failures = [var.credstash_encryption_context]
}

run "rejects_a_worker_only_fleet_behind_the_alb" {
  command = plan

  variables {
    courier_role = "worker"
  }

  expect_failures = [var.courier_role]
}
