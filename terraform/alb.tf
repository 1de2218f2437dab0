################################################################################
# Application Load Balancer
################################################################################

resource "aws_lb" "this" {
  #checkov:skip=CKV2_AWS_76:The web ACL is optional and owned by the caller (web_acl_arn); its rule sets, Log4j AMR included, are managed with it, outside this module.
  name               = var.name
  load_balancer_type = "application"
  internal           = var.internal
  subnets            = var.alb_subnet_ids
  security_groups    = [aws_security_group.alb.id]

  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  desync_mitigation_mode     = "defensive"

  access_logs {
    enabled = true
    bucket  = aws_s3_bucket.alb_logs.id
    prefix  = var.name
  }

  tags = merge(local.tags, { Name = var.name })

  lifecycle {
    precondition {
      condition     = length(local.alb_zones) >= 2
      error_message = "alb_subnet_ids must span at least two Availability Zones (an ALB requires it)."
    }
  }

  # The ALB checks that it can write to the bucket when logging is turned on.
  depends_on = [aws_s3_bucket_policy.alb_logs]
}

resource "aws_lb_target_group" "api" {
  #checkov:skip=CKV_AWS_378:TLS terminates at the ALB; ALB-to-instance traffic stays in the VPC, admitted only from the ALB security group, and courier serves plain HTTP.
  name                 = "${var.name}-api"
  port                 = var.api_port
  protocol             = "HTTP"
  protocol_version     = "HTTP1"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = var.drain_seconds

  health_check {
    enabled             = true
    path                = "/readyz"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = merge(local.tags, { Name = "${var.name}-api" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  # Only the public API is public: anything no rule below matches (/readyz, /metrics, ...)
  # is answered by the ALB itself and never reaches an instance.
  default_action {
    type = "fixed-response"

    fixed_response {
      status_code  = "404"
      content_type = "application/json" # ALB fixed responses cannot say application/problem+json
      message_body = local.not_found_body
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-https" })
}

locals {
  # Path patterns the ALB forwards to courier (case-sensitive; the query string is not matched).
  public_paths = ["/v1/*", "/openapi.json", "/healthz"]

  # The same RFC 9457 shape courier answers its own 404s with.
  not_found_body = jsonencode({
    type   = "urn:courier:problem:not-found"
    title  = "Not Found"
    status = 404
    detail = "no such resource"
  })
}

resource "aws_lb_listener_rule" "public_api" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 100

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }

  condition {
    path_pattern {
      values = local.public_paths
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-public-api" })
}

resource "aws_lb_listener" "http_redirect" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-http-redirect" })
}

resource "aws_wafv2_web_acl_association" "this" {
  count = var.web_acl_arn == null ? 0 : 1

  resource_arn = aws_lb.this.arn
  web_acl_arn  = var.web_acl_arn
}

################################################################################
# Access logs bucket
################################################################################

resource "aws_s3_bucket" "alb_logs" {
  #checkov:skip=CKV_AWS_145:ELB access log delivery supports only SSE-S3 (AES256), not SSE-KMS.
  #checkov:skip=CKV_AWS_18:This is the log bucket itself; logging its access would log into itself.
  #checkov:skip=CKV_AWS_144:Access logs are short-lived operational data; cross-region replication is not worth its cost.
  #checkov:skip=CKV2_AWS_62:Nothing consumes new-object events of access logs; there is no notification target.
  bucket = "${var.name}-alb-logs-${local.account_id}-${local.region}"

  tags = merge(local.tags, { Name = "${var.name}-alb-logs" })
}

resource "aws_s3_bucket_ownership_controls" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"

    filter {}

    expiration {
      days = var.access_logs_expiration_days
    }

    # Versioning keeps an expired log as a noncurrent version: remove those too.
    noncurrent_version_expiration {
      noncurrent_days = 1
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.alb_logs]
}

# ELB log delivery: regions launched before August 2022 deliver as a regional ELB account,
# newer regions as the logdelivery.elasticloadbalancing.amazonaws.com service principal.
data "aws_elb_service_account" "this" {}

data "aws_iam_policy_document" "alb_logs" {
  statement {
    sid       = "ElbLogDeliveryAccount"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.alb_logs.arn}/${var.name}/AWSLogs/${local.account_id}/*"]

    principals {
      type        = "AWS"
      identifiers = [data.aws_elb_service_account.this.arn]
    }
  }

  statement {
    sid       = "ElbLogDeliveryService"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.alb_logs.arn}/${var.name}/AWSLogs/${local.account_id}/*"]

    principals {
      type        = "Service"
      identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.alb_logs.arn, "${aws_s3_bucket.alb_logs.arn}/*"]

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

resource "aws_s3_bucket_policy" "alb_logs" {
  bucket = aws_s3_bucket.alb_logs.id
  policy = data.aws_iam_policy_document.alb_logs.json

  depends_on = [aws_s3_bucket_public_access_block.alb_logs]
}
