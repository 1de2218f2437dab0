################################################################################
# KMS: one CMK for courier's data, one for CredStash
################################################################################

# The data CMK protects everything courier stores: SQS messages (SSE), the DynamoDB tables,
# the envelope data keys of queued events and the log group. Administration and use are
# delegated to IAM (the account statement); services that act without an IAM caller get
# their own narrowly conditioned statements.
#
# Key policies are resource policies written as data (jsonencode) rather than
# aws_iam_policy_document: in a key policy Resource "*" means "this key" and is mandatory,
# which identity-policy linters misread. checkov's key-policy check (CKV_AWS_33, no
# unconditioned wildcard principal) applies to them, and tests/test_terraform.py reads them.
locals {
  key_admin_statement = {
    Sid       = "AccountAdministersKeyThroughIam"
    Effect    = "Allow"
    Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
    Action    = "kms:*"
    Resource  = "*"
  }

  data_key_policy = {
    Version = "2012-10-17"
    Statement = [
      local.key_admin_statement,
      {
        Sid       = "CloudWatchLogsEncryptsCourierLogGroup"
        Effect    = "Allow"
        Principal = { Service = "logs.${local.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnEquals = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:${local.log_group_name}"
          }
        }
      },
      # The AWS-documented statement for DynamoDB tables under a customer managed key:
      # principals of this account that DynamoDB already authorised (e.g. operators running
      # the credstash CLI) may use the key only through DynamoDB, never directly.
      {
        Sid       = "AccountPrincipalsUseKeyThroughDynamoDB"
        Effect    = "Allow"
        Principal = { AWS = "*" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:DescribeKey"]
        Resource  = "*"
        Condition = {
          StringEquals = {
            "kms:CallerAccount" = local.account_id
            "kms:ViaService"    = "dynamodb.${local.region}.amazonaws.com"
          }
        }
      },
    ]
  }

  # CredStash encrypts each secret under a data key from this CMK with the caller's
  # encryption context. Operators who `credstash put` get access through IAM; the instances
  # may only Decrypt (iam.tf), restricted to the configured encryption context.
  credstash_key_policy = {
    Version   = "2012-10-17"
    Statement = [local.key_admin_statement]
  }
}

resource "aws_kms_key" "data" {
  description             = "courier ${var.name}: SQS, DynamoDB, envelope data keys and logs"
  key_usage               = "ENCRYPT_DECRYPT"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = var.key_deletion_window_days
  policy                  = jsonencode(local.data_key_policy)

  tags = merge(local.tags, { Name = "${var.name}-data" })
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.data.key_id
}

resource "aws_kms_key" "credstash" {
  count = var.credstash_kms_key_arn == null ? 1 : 0

  description             = "CredStash secrets (${var.credstash_kms_alias})"
  key_usage               = "ENCRYPT_DECRYPT"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = var.key_deletion_window_days
  policy                  = jsonencode(local.credstash_key_policy)

  tags = merge(local.tags, { Name = "${var.name}-credstash" })
}

resource "aws_kms_alias" "credstash" {
  count = var.credstash_kms_key_arn == null ? 1 : 0

  name          = var.credstash_kms_alias
  target_key_id = aws_kms_key.credstash[0].key_id
}
