################################################################################
# Logs, metrics, alarms and the dashboard
################################################################################

locals {
  alarm_actions = [var.alarm_sns_topic_arn]

  alb_dimensions = { LoadBalancer = aws_lb.this.arn_suffix }
  tg_dimensions = {
    LoadBalancer = aws_lb.this.arn_suffix
    TargetGroup  = aws_lb_target_group.api.arn_suffix
  }

  # courier's own metrics as the CloudWatch agent ships them (see
  # templates/cloudwatch-agent.json.tftpl); names follow service/metrics.py.
  metric_circuit_open       = "courier_target_circuit_open"
  metric_target_constrained = "courier_target_constrained"
  metric_target_latency     = "courier_target_call_duration_seconds"
  metric_messages           = "courier_messages_processed_total"
  metric_error_log_lines    = "ErrorLogLines"
  metric_dlq_moves          = "DlqMoves"
  metric_dlq_moves_reason   = "DlqMovesByReason"

  # The Prometheus job the agent scrapes courier under (job_name in user_data.sh.tftpl and
  # packer/files/prometheus.yaml): the value of the fleet-wide `job` dimension.
  prometheus_job = "courier"

  # The gauge already means "for minutes"; the alarm adds ten more before paging anyone.
  target_constrained_alarm_minutes = 10

  # Alarms that judge a new release: any of them in ALARM during an instance refresh rolls
  # it back (instance_refresh.preferences.alarm_specification in compute.tf).
  rollout_alarm_names = [
    aws_cloudwatch_metric_alarm.target_5xx_rate.alarm_name,
    aws_cloudwatch_metric_alarm.target_p99_latency.alarm_name,
    aws_cloudwatch_metric_alarm.unhealthy_hosts.alarm_name,
    aws_cloudwatch_metric_alarm.error_log_lines.alarm_name,
  ]
}

resource "aws_cloudwatch_log_group" "courier" {
  name              = local.log_group_name
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.data.arn

  tags = merge(local.tags, { Name = local.log_group_name })
}

################################################################################
# Metric filters over courier's JSON log lines
################################################################################

resource "aws_cloudwatch_log_metric_filter" "error_log_lines" {
  name           = "${var.name}-error-log-lines"
  log_group_name = aws_cloudwatch_log_group.courier.name
  pattern        = "{ $.level = \"ERROR\" }"

  metric_transformation {
    name          = local.metric_error_log_lines
    namespace     = var.metrics_namespace
    value         = "1"
    default_value = "0"
    unit          = "Count"
  }
}

# Two filters over the same lines: a metric filter with dimensions publishes only the
# dimensioned metric, and an alarm needs one series, so one counts all moves (for the
# alarm) and one counts them by reason (for the dashboard and for triage).
resource "aws_cloudwatch_log_metric_filter" "dlq_moves" {
  name           = "${var.name}-dlq-moves"
  log_group_name = aws_cloudwatch_log_group.courier.name
  pattern        = "{ $.event = \"dlq_move\" }"

  metric_transformation {
    name          = local.metric_dlq_moves
    namespace     = var.metrics_namespace
    value         = "1"
    default_value = "0"
    unit          = "Count"
  }
}

resource "aws_cloudwatch_log_metric_filter" "dlq_moves_by_reason" {
  name           = "${var.name}-dlq-moves-by-reason"
  log_group_name = aws_cloudwatch_log_group.courier.name
  pattern        = "{ $.event = \"dlq_move\" }"

  metric_transformation {
    name      = local.metric_dlq_moves_reason
    namespace = var.metrics_namespace
    value     = "1"
    unit      = "Count"
    dimensions = {
      reason = "$.reason"
    }
  }
}

################################################################################
# Load balancer alarms
################################################################################

resource "aws_cloudwatch_metric_alarm" "target_5xx_rate" {
  alarm_name          = "${var.name}-target-5xx-rate"
  alarm_description   = "More than ${var.alarm_thresholds.target_5xx_percent}% of requests answered 5xx by courier for 3 of 5 minutes."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_thresholds.target_5xx_percent
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id          = "rate"
    label       = "Target 5xx (% of requests)"
    expression  = "IF(requests > 0, 100 * FILL(errors, 0) / requests, 0)"
    return_data = true
  }

  metric_query {
    id = "errors"

    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "HTTPCode_Target_5XX_Count"
      dimensions  = local.tg_dimensions
      period      = 60
      stat        = "Sum"
    }
  }

  metric_query {
    id = "requests"

    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "RequestCount"
      dimensions  = local.tg_dimensions
      period      = 60
      stat        = "Sum"
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-target-5xx-rate" })
}

resource "aws_cloudwatch_metric_alarm" "target_p99_latency" {
  alarm_name          = "${var.name}-target-p99-latency"
  alarm_description   = "p99 of courier's response time above ${var.alarm_thresholds.p99_latency_seconds} s for 3 of 5 minutes."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "TargetResponseTime"
  dimensions          = local.tg_dimensions
  extended_statistic  = "p99"
  period              = 60
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_thresholds.p99_latency_seconds
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-target-p99-latency" })
}

resource "aws_cloudwatch_metric_alarm" "unhealthy_hosts" {
  alarm_name          = "${var.name}-unhealthy-hosts"
  alarm_description   = "At least one courier instance has failed /readyz for 3 consecutive minutes."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = local.tg_dimensions
  statistic           = "Maximum"
  period              = 60
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-unhealthy-hosts" })
}

################################################################################
# Queue alarms
################################################################################

resource "aws_cloudwatch_metric_alarm" "oldest_message_age" {
  alarm_name          = "${var.name}-queue-oldest-message-age"
  alarm_description   = "The oldest message in the work queue has waited more than ${var.alarm_thresholds.oldest_message_age_seconds} s: workers are not keeping up or are stuck."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.work.name }
  statistic           = "Maximum"
  period              = 60
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_thresholds.oldest_message_age_seconds
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-queue-oldest-message-age" })
}

resource "aws_cloudwatch_metric_alarm" "dlq_not_empty" {
  alarm_name          = "${var.name}-dlq-not-empty"
  alarm_description   = "Messages are waiting in the dead-letter queue: inspect them and replay (courier replay) or discard."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.dlq.name }
  statistic           = "Maximum"
  period              = 300
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-dlq-not-empty" })
}

################################################################################
# Capacity alarm
################################################################################

resource "aws_cloudwatch_metric_alarm" "capacity_shortfall" {
  alarm_name          = "${var.name}-in-service-below-desired"
  alarm_description   = "Fewer instances in service than desired for ${var.alarm_thresholds.capacity_shortfall_minutes} minutes: launches or health checks are failing."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = var.alarm_thresholds.capacity_shortfall_minutes
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id          = "shortfall"
    label       = "Desired minus in-service instances"
    expression  = "desired - in_service"
    return_data = true
  }

  metric_query {
    id = "desired"

    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupDesiredCapacity"
      dimensions  = { AutoScalingGroupName = aws_autoscaling_group.courier.name }
      period      = 60
      stat        = "Minimum"
    }
  }

  metric_query {
    id = "in_service"

    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupInServiceInstances"
      dimensions  = { AutoScalingGroupName = aws_autoscaling_group.courier.name }
      period      = 60
      stat        = "Maximum"
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-in-service-below-desired" })
}

################################################################################
# Alarms on courier's own metrics and logs
################################################################################

# Shipped by the CloudWatch agent from each process's /metrics; the series of all processes
# and instances share the target dimension, so Maximum is "open anywhere".
resource "aws_cloudwatch_metric_alarm" "circuit_open" {
  for_each = { for t in var.targets : t.name => t }

  alarm_name          = "${var.name}-circuit-open-${each.key}"
  alarm_description   = "courier's circuit breaker towards legacy target ${each.key} has been open for 5 minutes: the target is failing or unreachable; deliveries wait in the queue."
  namespace           = var.metrics_namespace
  metric_name         = local.metric_circuit_open
  dimensions          = { target = each.key }
  statistic           = "Maximum"
  period              = 60
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 5
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-circuit-open-${each.key}" })
}

# courier_target_constrained{target}: the target's circuit is open, a Retry-After pause holds,
# or its concurrency limit, below its ceiling, has held calls back without a break for 2
# minutes. Deliveries to it wait in the queue and the backlog-per-instance policy
# holds instead of scaling out (compute.tf). Not a rollout alarm: a slow legacy system is
# no reason to roll back courier.
resource "aws_cloudwatch_metric_alarm" "target_constrained" {
  for_each = { for t in var.targets : t.name => t }

  alarm_name          = "${var.name}-target-constrained-${each.key}"
  alarm_description   = "Legacy target ${each.key} has been the bottleneck for ${local.target_constrained_alarm_minutes} minutes (circuit open, Retry-After pause, or courier's concurrency limit for it pinned at its floor or fleet share): its deliveries wait in the queue, and backlog-per-instance scaling holds instead of adding instances, which would only add load. Check the target's health with its owners; the group scales out again when it recovers."
  namespace           = var.metrics_namespace
  metric_name         = local.metric_target_constrained
  dimensions          = { target = each.key }
  statistic           = "Maximum"
  period              = 60
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = local.target_constrained_alarm_minutes
  datapoints_to_alarm = local.target_constrained_alarm_minutes
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-target-constrained-${each.key}" })
}

resource "aws_cloudwatch_metric_alarm" "error_log_lines" {
  alarm_name          = "${var.name}-error-log-lines"
  alarm_description   = "More than ${var.alarm_thresholds.error_log_lines_per_minute} ERROR log lines per minute for 3 of 5 minutes (log group ${local.log_group_name})."
  namespace           = var.metrics_namespace
  metric_name         = aws_cloudwatch_log_metric_filter.error_log_lines.metric_transformation[0].name
  statistic           = "Sum"
  period              = 60
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_thresholds.error_log_lines_per_minute
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-error-log-lines" })
}

resource "aws_cloudwatch_metric_alarm" "dlq_moves" {
  alarm_name          = "${var.name}-dlq-moves"
  alarm_description   = "courier moved messages to the DLQ in the last 5 minutes; the DlqMovesByReason metric and the dlq_move log lines tell why."
  namespace           = var.metrics_namespace
  metric_name         = aws_cloudwatch_log_metric_filter.dlq_moves.metric_transformation[0].name
  statistic           = "Sum"
  period              = 300
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  tags = merge(local.tags, { Name = "${var.name}-dlq-moves" })
}

################################################################################
# Dashboard
################################################################################

locals {
  dashboard_widgets = [
    {
      title = "Requests (per minute)"
      metrics = [
        ["AWS/ApplicationELB", "RequestCount", "LoadBalancer", aws_lb.this.arn_suffix, { stat = "Sum", label = "requests" }],
      ]
    },
    {
      title = "Target response time (s)"
      metrics = [
        ["AWS/ApplicationELB", "TargetResponseTime", "LoadBalancer", aws_lb.this.arn_suffix, "TargetGroup", aws_lb_target_group.api.arn_suffix, { stat = "p50", label = "p50" }],
        ["...", { stat = "p99", label = "p99" }],
      ]
    },
    {
      title = "Errors (per minute)"
      metrics = [
        ["AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", "LoadBalancer", aws_lb.this.arn_suffix, "TargetGroup", aws_lb_target_group.api.arn_suffix, { stat = "Sum", label = "target 5xx" }],
        [".", "HTTPCode_Target_4XX_Count", ".", ".", ".", ".", { stat = "Sum", label = "target 4xx" }],
        ["AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", "LoadBalancer", aws_lb.this.arn_suffix, { stat = "Sum", label = "ALB 5xx" }],
        [var.metrics_namespace, local.metric_error_log_lines, { stat = "Sum", label = "ERROR log lines" }],
      ]
    },
    {
      title = "Work queue depth"
      metrics = [
        ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.work.name, { stat = "Maximum", label = "visible" }],
        [".", "ApproximateNumberOfMessagesNotVisible", ".", ".", { stat = "Maximum", label = "in flight" }],
        [".", "ApproximateNumberOfMessagesDelayed", ".", ".", { stat = "Maximum", label = "delayed" }],
      ]
    },
    {
      title = "Age of oldest message (s)"
      metrics = [
        ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", aws_sqs_queue.work.name, { stat = "Maximum", label = "work queue" }],
        ["...", aws_sqs_queue.dlq.name, { stat = "Maximum", label = "DLQ" }],
      ]
    },
    {
      title = "DLQ depth and moves"
      metrics = [
        ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.dlq.name, { stat = "Maximum", label = "DLQ visible" }],
        [{ expression = "SEARCH('{${var.metrics_namespace},reason} MetricName=\"${local.metric_dlq_moves_reason}\"', 'Sum', 300)", label = "moves by reason", id = "moves" }],
      ]
    },
    {
      title = "Messages processed by outcome (per minute)"
      metrics = [
        [{ expression = "SEARCH('{${var.metrics_namespace},outcome} MetricName=\"${local.metric_messages}\"', 'Sum', 60)", label = "", id = "outcomes" }],
      ]
    },
    {
      # Mean per target = duration sum / count; metric math cannot divide two SEARCH arrays,
      # so each configured target gets its own pair of series.
      title = "Legacy target latency, mean (s)"
      metrics = concat(
        [for index, target in var.targets : [var.metrics_namespace, "${local.metric_target_latency}_sum", "target", target.name, { stat = "Sum", id = "lsum${index}", visible = false }]],
        [for index, target in var.targets : [var.metrics_namespace, "${local.metric_target_latency}_count", "target", target.name, { stat = "Sum", id = "lcount${index}", visible = false }]],
        [for index, target in var.targets : [{ expression = "lsum${index} / lcount${index}", label = target.name, id = "lmean${index}" }]],
      )
    },
    {
      # 1 while the target is the bottleneck; "any target" is the series the backlog scaling
      # policy holds on (compute.tf).
      title = "Legacy target is the bottleneck (1 = constrained)"
      metrics = concat(
        [for target in var.targets : [var.metrics_namespace, local.metric_target_constrained, "target", target.name, { stat = "Maximum", label = target.name }]],
        [[var.metrics_namespace, local.metric_target_constrained, "job", local.prometheus_job, { stat = "Maximum", label = "any target (holds scale-out)" }]],
      )
    },
    {
      # The queue_backlog policy's own metric math, with its target value as a line.
      title = "Backlog per instance: raw and as scaling tracks it"
      metrics = [
        ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.work.name, { stat = "Sum", id = "visible", visible = false }],
        ["AWS/AutoScaling", "GroupInServiceInstances", "AutoScalingGroupName", aws_autoscaling_group.courier.name, { stat = "Average", id = "in_service", visible = false }],
        [var.metrics_namespace, local.metric_target_constrained, "job", local.prometheus_job, { stat = "Maximum", id = "constrained", visible = false }],
        [{ expression = "visible / in_service", label = "backlog per instance", id = "backlog" }],
        [{ expression = local.backlog_tracked_expression, label = "tracked by scaling", id = "tracked" }],
      ]
      annotations = { horizontal = [{ label = "target (backlog_per_instance)", value = var.backlog_per_instance }] }
    },
    {
      title = "Instances"
      metrics = [
        ["AWS/AutoScaling", "GroupInServiceInstances", "AutoScalingGroupName", aws_autoscaling_group.courier.name, { stat = "Maximum", label = "in service" }],
        [".", "GroupDesiredCapacity", ".", ".", { stat = "Maximum", label = "desired" }],
        ["AWS/ApplicationELB", "UnHealthyHostCount", "LoadBalancer", aws_lb.this.arn_suffix, "TargetGroup", aws_lb_target_group.api.arn_suffix, { stat = "Maximum", label = "unhealthy" }],
      ]
    },
  ]
}

resource "aws_cloudwatch_dashboard" "courier" {
  dashboard_name = var.name

  dashboard_body = jsonencode({
    widgets = [for index, widget in local.dashboard_widgets : {
      type   = "metric"
      x      = (index % 3) * 8
      y      = floor(index / 3) * 6
      width  = 8
      height = 6
      # Only some widgets carry annotations (a horizontal target line).
      properties = merge({
        title   = widget.title
        region  = local.region
        view    = "timeSeries"
        stacked = false
        period  = 60
        metrics = widget.metrics
      }, try({ annotations = widget.annotations }, {}))
    }]
  })
}
