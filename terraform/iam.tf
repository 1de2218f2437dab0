################################################################################
# IAM: the instance role, least privilege
#
# Every statement names its resources exactly. The only "*" resources are actions that
# support no resource-level permissions (cloudwatch:PutMetricData, restricted by namespace
# instead, and ec2:DescribeTags); tests/test_terraform.py lists and enforces these exceptions.
#
# The actions are the ones courier's code calls (service/), and nothing more; batch calls are
# authorised by their single-message action (SendMessageBatch by sqs:SendMessage,
# DeleteMessageBatch by sqs:DeleteMessage, ChangeMessageVisibilityBatch by
# sqs:ChangeMessageVisibility). The CloudWatch agent's own calls close the list.
################################################################################

locals {
  # The CredStash items courier reads: the same variables that name them in courier.toml.
  # The instances may read these items and no other (dynamodb:LeadingKeys).
  credstash_secret_names = distinct(compact(concat(
    [var.jwt_hs256_secret, var.idm_api_key_secret],
    [for target in var.targets : target.secret],
  )))
}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    sid     = "Ec2AssumesRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "instance" {
  name                 = "${var.name}-instance"
  description          = "courier ${var.name} instances"
  assume_role_policy   = data.aws_iam_policy_document.assume_ec2.json
  max_session_duration = 3600

  tags = merge(local.tags, { Name = "${var.name}-instance" })
}

resource "aws_iam_instance_profile" "instance" {
  name = "${var.name}-instance"
  role = aws_iam_role.instance.name

  tags = merge(local.tags, { Name = "${var.name}-instance" })
}

# Shell access through SSM Session Manager replaces SSH: no key pair, no port 22.
resource "aws_iam_role_policy_attachment" "ssm_core" {
  role       = aws_iam_role.instance.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "instance" {
  statement {
    sid = "WorkQueueAndDlq"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:SendMessage",
      "sqs:GetQueueAttributes",
    ]
    resources = [aws_sqs_queue.work.arn, aws_sqs_queue.dlq.arn]
  }

  # No DeleteItem: a status record is never deleted, it expires (TTL). BatchWriteItem carries
  # the unconditional whole-record puts (completions, unkeyed requests) of many requests at once.
  statement {
    sid = "StatusTable"
    actions = [
      "dynamodb:BatchWriteItem",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
    ]
    resources = [aws_dynamodb_table.status.arn]
  }

  # CredStash reads the latest version with Query, a given version with GetItem, and only
  # the items whose partition key (the secret name) courier is configured with.
  statement {
    sid       = "CredStashTableRead"
    actions   = ["dynamodb:Query", "dynamodb:GetItem"]
    resources = [local.credstash_table_arn]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "dynamodb:LeadingKeys"
      values   = local.credstash_secret_names
    }
  }

  # Envelope data keys and SQS SSE (producers generate, consumers decrypt) use the data CMK.
  # DynamoDB SSE needs nothing here: the key policy lets DynamoDB use the key for callers.
  statement {
    sid       = "DataKeyUse"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.data.arn]
  }

  # After a replacement of the data CMK, envelopes (and SQS SSE) of messages still queued
  # under the previous keys (envelope.accepted_key_ids) must stay readable.
  dynamic "statement" {
    for_each = length(var.envelope_accepted_key_arns) > 0 ? [1] : []

    content {
      sid       = "PreviousDataKeysDecrypt"
      actions   = ["kms:Decrypt"]
      resources = var.envelope_accepted_key_arns
    }
  }

  # CredStash items stored under this deployment's encryption context, and no other: every
  # key of the context must match, and no other context key may be present. With no
  # context configured, only items stored without one (Null: no context keys at all).
  statement {
    sid       = "CredStashDecrypt"
    actions   = ["kms:Decrypt"]
    resources = [local.credstash_key_arn]

    dynamic "condition" {
      for_each = var.credstash_encryption_context

      content {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:${condition.key}"
        values   = [condition.value]
      }
    }

    condition {
      test     = length(var.credstash_encryption_context) > 0 ? "ForAllValues:StringEquals" : "Null"
      variable = "kms:EncryptionContextKeys"
      values   = length(var.credstash_encryption_context) > 0 ? keys(var.credstash_encryption_context) : ["true"]
    }
  }

  # secrets.kms_key_id is rendered as the key ARN, which needs no lookup; an operator who
  # configures the alias instead makes courier resolve it once with DescribeKey.
  statement {
    sid       = "CredStashKeyDescribe"
    actions   = ["kms:DescribeKey"]
    resources = [local.credstash_key_arn]
  }

  # The daemon finishes its drain, then releases its own instance from Terminating:Wait.
  statement {
    sid       = "OwnLifecycleHook"
    actions   = ["autoscaling:CompleteLifecycleAction"]
    resources = [local.asg_arn]
  }

  statement {
    sid       = "CloudWatchAgentLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = [aws_cloudwatch_log_group.courier.arn, "${aws_cloudwatch_log_group.courier.arn}:log-stream:*"]
  }

  # PutMetricData has no resource-level permissions; the namespace condition is its limit.
  statement {
    sid       = "CloudWatchAgentMetrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [var.metrics_namespace, "CWAgent"]
    }
  }

  # The operator console (service/console/) shows each queue's oldest message age, which SQS
  # publishes only as the CloudWatch metric ApproximateAgeOfOldestMessage. GetMetricData is
  # read-only and has no resource-level permissions or namespace condition.
  statement {
    sid       = "ConsoleQueueAge"
    actions   = ["cloudwatch:GetMetricData"]
    resources = ["*"]
  }

  # The agent reads the instance's tags to add the AutoScalingGroupName dimension;
  # Describe* actions have no resource-level permissions.
  statement {
    sid       = "CloudWatchAgentDescribeTags"
    actions   = ["ec2:DescribeTags"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "instance" {
  name   = "courier"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance.json
}
