################################################################################
# Launch template and Auto Scaling group
################################################################################

# The root device name differs between AMI families (/dev/xvda, /dev/sda1): read it from
# the AMI instead of guessing.
data "aws_ami" "courier" {
  filter {
    name   = "image-id"
    values = [var.ami_id]
  }
}

locals {
  courier_config = templatefile("${path.module}/templates/courier.toml.tftpl", {
    role                = var.courier_role
    api_port            = var.api_port
    drain_seconds       = var.drain_seconds
    log_level           = var.log_level
    region              = local.region
    queue_url           = aws_sqs_queue.work.url
    dlq_url             = aws_sqs_queue.dlq.url
    status_table        = aws_dynamodb_table.status.name
    secrets_table       = var.credstash_table_name
    secrets_ttl_seconds = var.secrets_ttl_seconds
    kms_key_id          = aws_kms_key.data.arn
    jwt_issuer          = var.jwt_issuer
    jwt_audience        = var.jwt_audience
    jwks_url            = var.jwks_url
    jwt_hs256_secret    = var.jwt_hs256_secret
    idm_url             = var.idm_url
    idm_api_key_secret  = var.idm_api_key_secret
    max_in_flight       = var.max_in_flight
    targets             = var.targets
    metrics_base_port   = local.metrics_base_port
    asg_name            = local.asg_name
    lifecycle_hook_name = local.lifecycle_hook_name

    # secrets.encryption_context and secrets.kms_key_id: what IAM allows (iam.tf).
    secrets_encryption_context = var.credstash_encryption_context
    secrets_kms_key_id         = local.credstash_key_arn
    accepted_key_ids           = var.envelope_accepted_key_arns
  })

  cloudwatch_agent_config = templatefile("${path.module}/templates/cloudwatch-agent.json.tftpl", {
    log_group_name    = local.log_group_name
    metrics_namespace = var.metrics_namespace
  })

  # What the queue_backlog policy tracks (see there; the dashboard plots the same): the
  # backlog per instance, held at (never above) the target value while a legacy target is
  # the bottleneck. `constrained` and `backlog` are that policy's metric ids.
  backlog_tracked_expression = "IF(FILL(constrained, 0) > 0 AND backlog > ${var.backlog_per_instance}, ${var.backlog_per_instance}, backlog)"

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    courier_config          = local.courier_config
    cloudwatch_agent_config = local.cloudwatch_agent_config
    metrics_base_port       = local.metrics_base_port
    region                  = local.region
  })
}

resource "aws_launch_template" "courier" {
  name                   = var.name
  description            = "courier ${var.name}"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  # No public IP; the only security group is the instance group.
  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.instance.id]
  }

  # IMDSv2 only, and a hop limit of 1 so that nothing behind another network hop
  # (a container, a forwarded request) can reach the instance credentials.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    # Tags in IMDS would make launches fail on tag keys with spaces or "/"; nothing needs them.
    instance_metadata_tags = "disabled"
  }

  block_device_mappings {
    device_name = data.aws_ami.courier.root_device_name

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size
      encrypted             = true
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "network-interface"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = merge(local.tags, { Name = var.name })

  lifecycle {
    precondition {
      condition     = data.aws_ami.courier.root_device_type == "ebs"
      error_message = "ami_id must be an EBS-backed AMI."
    }
  }
}

resource "aws_autoscaling_group" "courier" {
  name                = local.asg_name
  vpc_zone_identifier = var.private_subnet_ids
  min_size            = var.min_size
  max_size            = var.max_size
  # desired_capacity is left to the scaling policies: setting it here would reset the
  # group on every apply.

  target_group_arns         = [aws_lb_target_group.api.arn]
  health_check_type         = "ELB"
  health_check_grace_period = var.health_check_grace_period
  default_instance_warmup   = var.instance_warmup_seconds
  capacity_rebalance        = var.mixed_instances != null
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  wait_for_capacity_timeout = "15m"
  protect_from_scale_in     = false

  enabled_metrics = [
    "GroupMinSize",
    "GroupMaxSize",
    "GroupDesiredCapacity",
    "GroupInServiceInstances",
    "GroupPendingInstances",
    "GroupStandbyInstances",
    "GroupTerminatingInstances",
    "GroupTotalInstances",
  ]
  metrics_granularity = "1Minute"

  # A pinned version (not $Latest): auto rollback of an instance refresh needs it, and
  # every launch template change becomes an explicit refresh.
  dynamic "launch_template" {
    for_each = var.mixed_instances == null ? [1] : []

    content {
      id      = aws_launch_template.courier.id
      version = aws_launch_template.courier.latest_version
    }
  }

  dynamic "mixed_instances_policy" {
    for_each = var.mixed_instances == null ? [] : [var.mixed_instances]

    content {
      instances_distribution {
        on_demand_base_capacity                  = mixed_instances_policy.value.on_demand_base_capacity
        on_demand_percentage_above_base_capacity = mixed_instances_policy.value.on_demand_percentage_above_base_capacity
        spot_allocation_strategy                 = mixed_instances_policy.value.spot_allocation_strategy
      }

      launch_template {
        launch_template_specification {
          launch_template_id = aws_launch_template.courier.id
          version            = aws_launch_template.courier.latest_version
        }

        dynamic "override" {
          for_each = mixed_instances_policy.value.instance_types

          content {
            instance_type = override.value
          }
        }
      }
    }
  }

  # Terminating instances wait here while courier stops accepting and polling, finishes
  # in-flight work, releases unfinished messages and calls CompleteLifecycleAction.
  # CONTINUE on timeout: a hung drain must not block scale-in or a refresh.
  initial_lifecycle_hook {
    name                 = local.lifecycle_hook_name
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = var.lifecycle_hook_heartbeat_seconds
    default_result       = "CONTINUE"
  }

  # A launch template change (new AMI, new config) rolls out as a canary: the refresh stops
  # at each checkpoint for checkpoint_delay, and rolls back by itself if a rollout alarm fires.
  instance_refresh {
    strategy = "Rolling"

    preferences {
      checkpoint_percentages       = var.instance_refresh.checkpoint_percentages
      checkpoint_delay             = tostring(var.instance_refresh.checkpoint_delay_seconds)
      min_healthy_percentage       = var.instance_refresh.min_healthy_percentage
      max_healthy_percentage       = var.instance_refresh.max_healthy_percentage
      instance_warmup              = tostring(var.instance_warmup_seconds)
      auto_rollback                = var.instance_refresh.auto_rollback
      skip_matching                = false
      scale_in_protected_instances = "Refresh"
      standby_instances            = "Terminate"

      alarm_specification {
        alarms = local.rollout_alarm_names
      }
    }
  }

  dynamic "warm_pool" {
    for_each = var.warm_pool == null ? [] : [var.warm_pool]

    content {
      pool_state                  = warm_pool.value.pool_state
      min_size                    = warm_pool.value.min_size
      max_group_prepared_capacity = warm_pool.value.max_group_prepared_capacity

      instance_reuse_policy {
        reuse_on_scale_in = warm_pool.value.reuse_on_scale_in
      }
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  timeouts {
    delete = "20m"
  }

  lifecycle {
    precondition {
      condition     = length(local.private_zones) >= 2
      error_message = "private_subnet_ids must span at least two Availability Zones."
    }

    precondition {
      condition     = var.lifecycle_hook_heartbeat_seconds > var.drain_seconds
      error_message = "lifecycle_hook_heartbeat_seconds must be greater than drain_seconds, or instances are terminated before courier has drained."
    }

    precondition {
      condition     = var.max_size >= var.min_size
      error_message = "max_size must be at least min_size."
    }

    precondition {
      condition     = !(var.warm_pool != null && var.mixed_instances != null)
      error_message = "warm_pool cannot be combined with mixed_instances: Auto Scaling warm pools do not support mixed instances policies or Spot."
    }

    precondition {
      condition     = var.mixed_instances == null || try(var.mixed_instances.on_demand_base_capacity, 0) <= var.max_size
      error_message = "mixed_instances.on_demand_base_capacity must not exceed max_size."
    }
  }

  depends_on = [aws_iam_role_policy.instance, aws_iam_role_policy_attachment.ssm_core]
}

################################################################################
# Scaling: the group follows whichever policy asks for more instances
################################################################################

resource "aws_autoscaling_policy" "request_count" {
  name                   = "${var.name}-requests-per-target"
  autoscaling_group_name = aws_autoscaling_group.courier.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    target_value = var.requests_per_target

    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.this.arn_suffix}/${aws_lb_target_group.api.arn_suffix}"
    }
  }
}

# AWS's recommended metric for queue workers: backlog per instance = visible messages /
# instances in service, tracked against the backlog one instance can clear within the
# acceptable latency.
#
# Except while a legacy target is the bottleneck. Then the backlog grows because that target
# is slow, not because the fleet is short of workers, and every added instance would add its
# own concurrent calls to the struggling target (issue 16). courier publishes
# courier_target_constrained{target} (1 while a target's circuit is open, its Retry-After
# pause holds, or its adaptive limit, below its ceiling, has held calls back without a break
# for 2 minutes); the CloudWatch agent ships it once more under the fleet-wide
# `job` dimension (templates/cloudwatch-agent.json.tftpl), and its Maximum is 1 while any
# process sees any target constrained. While it is 1, the tracked value is held at
# min(backlog per instance, target value):
# - a backlog above the target is reported as exactly the target: the scale-out alarm
#   (above the target) never fires, and neither does the scale-in alarm (below it), so the
#   group keeps its size: no instance is added for a backlog more instances cannot clear,
#   and none is removed while the backlog is still large and must be drained as soon as the
#   target recovers;
# - a backlog below the target passes through, so scale-in still happens as usual: fewer
#   processes only relieve the target (each remaining one's adaptive limit and fleet share
#   grow back), and the group shrinks to what the work needs.
# FILL(.., 0): until instances ship the gauge (an older image, the agent not yet running) the
# policy behaves as before instead of receiving no data at all. The queue is shared by all
# targets, so one constrained target holds scale-out for the whole backlog: the
# "<name>-target-constrained-<target>" alarms (observability.tf) say when that lasts.
resource "aws_autoscaling_policy" "queue_backlog" {
  name                   = "${var.name}-backlog-per-instance"
  autoscaling_group_name = aws_autoscaling_group.courier.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    target_value = var.backlog_per_instance

    customized_metric_specification {
      metrics {
        id          = "visible"
        label       = "Messages visible in the work queue"
        return_data = false

        metric_stat {
          stat = "Sum"

          metric {
            namespace   = "AWS/SQS"
            metric_name = "ApproximateNumberOfMessagesVisible"

            dimensions {
              name  = "QueueName"
              value = aws_sqs_queue.work.name
            }
          }
        }
      }

      metrics {
        id          = "in_service"
        label       = "Instances in service"
        return_data = false

        metric_stat {
          stat = "Average"

          metric {
            namespace   = "AWS/AutoScaling"
            metric_name = "GroupInServiceInstances"

            dimensions {
              name  = "AutoScalingGroupName"
              value = aws_autoscaling_group.courier.name
            }
          }
        }
      }

      metrics {
        id          = "constrained"
        label       = "A legacy target is the bottleneck (any process, any target)"
        return_data = false

        metric_stat {
          stat = "Maximum"

          metric {
            namespace   = var.metrics_namespace
            metric_name = local.metric_target_constrained

            dimensions {
              name  = "job"
              value = local.prometheus_job
            }
          }
        }
      }

      metrics {
        id          = "backlog"
        label       = "Backlog per instance"
        expression  = "visible / in_service"
        return_data = false
      }

      metrics {
        id          = "backlog_per_instance"
        label       = "Backlog per instance, held at the target while a legacy target is the bottleneck"
        expression  = local.backlog_tracked_expression
        return_data = true
      }
    }
  }
}
