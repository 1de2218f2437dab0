################################################################################
# IAM: the instance role, least privilege
#
# Every statement names its resources exactly. The only "*" resources are actions that
# support no resource-level permissions (cloudwatch:PutMetricData, restricted by namespace
# instead, and ec2:DescribeTags); tests/test_terraform.py lists and enforces these exceptions.
################################################################################

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

  statement {
    sid = "StatusTable"
    actions = [
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:Query",
      "dynamodb:ConditionCheckItem",
    ]
    resources = [aws_dynamodb_table.status.arn]
  }

  statement {
    sid       = "CredStashTableRead"
    actions   = ["dynamodb:Query", "dynamodb:GetItem"]
    resources = [local.credstash_table_arn]
  }

  # Envelope data keys, SQS SSE (producers generate, consumers decrypt) and DynamoDB SSE
  # (DynamoDB calls KMS on the caller's behalf) all use the data CMK.
  statement {
    sid       = "DataKeyUse"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"]
    resources = [aws_kms_key.data.arn]
  }

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
  }

  # The daemon finishes its drain, then releases its own instance from Terminating:Wait.
  statement {
    sid = "OwnLifecycleHook"
    actions = [
      "autoscaling:CompleteLifecycleAction",
      "autoscaling:RecordLifecycleActionHeartbeat",
    ]
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
