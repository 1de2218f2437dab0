################################################################################
# DynamoDB: request status / idempotency records and the CredStash store
################################################################################

resource "aws_dynamodb_table" "status" {
  name                        = local.status_table_name
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  deletion_protection_enabled = var.deletion_protection

  attribute {
    name = "pk"
    type = "S"
  }

  # courier writes expires_at (epoch seconds) on every record; DynamoDB deletes expired ones.
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.data.arn
  }

  tags = merge(local.tags, { Name = local.status_table_name })
}

# The key schema is the one the credstash CLI creates and queries (`credstash setup`):
# name (HASH, S) + version (RANGE, S, zero-padded). Do not change it, or `credstash get/put`
# and courier's reader stop working against this table.
resource "aws_dynamodb_table" "credstash" {
  count = var.create_credstash_table ? 1 : 0

  name                        = var.credstash_table_name
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "name"
  range_key                   = "version"
  deletion_protection_enabled = var.deletion_protection

  attribute {
    name = "name"
    type = "S"
  }

  attribute {
    name = "version"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  # Items are already encrypted by CredStash under its own key; the table itself is encrypted
  # at rest with the data CMK (not the CredStash key, whose use is limited to CredStash's
  # encryption context).
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.data.arn
  }

  tags = merge(local.tags, { Name = var.credstash_table_name })
}
