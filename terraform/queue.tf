################################################################################
# SQS: the work queue and its dead-letter queue
################################################################################

# The DLQ keeps messages for the SQS maximum (14 days) so that an operator has time to
# inspect and replay them (`courier replay`); for standard queues SQS keeps a message's
# original enqueue time when it moves, so the DLQ must outlive the source retention.
resource "aws_sqs_queue" "dlq" {
  name                        = "${var.name}-dlq${local.queue_suffix}"
  fifo_queue                  = var.fifo_queue ? true : null
  content_based_deduplication = var.fifo_queue ? true : null

  message_retention_seconds = 1209600
  receive_wait_time_seconds = 20

  kms_master_key_id                 = aws_kms_key.data.arn
  kms_data_key_reuse_period_seconds = var.kms_data_key_reuse_period_seconds

  tags = merge(local.tags, { Name = "${var.name}-dlq" })
}

resource "aws_sqs_queue" "work" {
  name                        = "${var.name}-work${local.queue_suffix}"
  fifo_queue                  = var.fifo_queue ? true : null
  content_based_deduplication = var.fifo_queue ? true : null

  message_retention_seconds  = var.message_retention_seconds
  visibility_timeout_seconds = var.visibility_timeout_seconds
  receive_wait_time_seconds  = 20

  kms_master_key_id                 = aws_kms_key.data.arn
  kms_data_key_reuse_period_seconds = var.kms_data_key_reuse_period_seconds

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq.arn
    maxReceiveCount     = var.max_receive_count
  })

  tags = merge(local.tags, { Name = "${var.name}-work" })
}

# Only the work queue may use the DLQ as its dead-letter queue. A separate resource, because
# the DLQ cannot name the work queue's ARN before the work queue exists.
resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  queue_url = aws_sqs_queue.dlq.id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.work.arn]
  })
}

# Refuse plain-HTTP access to both queues, whoever the caller.
data "aws_iam_policy_document" "queue_tls_only" {
  for_each = {
    work = aws_sqs_queue.work.arn
    dlq  = aws_sqs_queue.dlq.arn
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [each.value]

    principals {
      type        = "AWS"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "tls_only" {
  for_each = {
    work = aws_sqs_queue.work.id
    dlq  = aws_sqs_queue.dlq.id
  }

  queue_url = each.value
  policy    = data.aws_iam_policy_document.queue_tls_only[each.key].json
}
