################################################################################
# Context and names shared by every file of the module
################################################################################

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

# Subnets are read so that a subnet of another VPC, or subnets all in one Availability
# Zone, fail at plan time instead of half-way through an apply.
data "aws_subnet" "alb" {
  for_each = toset(var.alb_subnet_ids)

  id = each.value

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.vpc_id
      error_message = "alb_subnet_ids: ${self.id} is not in ${var.vpc_id}."
    }
  }
}

data "aws_subnet" "private" {
  for_each = toset(var.private_subnet_ids)

  id = each.value

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.vpc_id
      error_message = "private_subnet_ids: ${self.id} is not in ${var.vpc_id}."
    }

    postcondition {
      condition     = !self.map_public_ip_on_launch
      error_message = "private_subnet_ids: ${self.id} assigns public IPs on launch; use private subnets."
    }
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name

  tags = merge(var.tags, {
    "courier:deployment" = var.name
  })

  # Names are fixed (not prefixes) because other resources and the instances refer to them
  # before the resources exist: the IAM policy names the group ARN, the user data names the hook.
  asg_name            = var.name
  lifecycle_hook_name = "${var.name}-drain"
  log_group_name      = "/courier/${var.name}"
  status_table_name   = coalesce(var.status_table_name, "${var.name}-status")
  queue_suffix        = var.fifo_queue ? ".fifo" : ""

  alb_zones     = distinct([for s in data.aws_subnet.alb : s.availability_zone])
  private_zones = distinct([for s in data.aws_subnet.private : s.availability_zone])

  asg_arn = "arn:${local.partition}:autoscaling:${local.region}:${local.account_id}:autoScalingGroup:*:autoScalingGroupName/${local.asg_name}"

  credstash_table_arn = "arn:${local.partition}:dynamodb:${local.region}:${local.account_id}:table/${var.credstash_table_name}"
  credstash_key_arn   = var.credstash_kms_key_arn != null ? var.credstash_kms_key_arn : aws_kms_key.credstash[0].arn

  # Per-process metrics ports: courier@N serves /metrics on metrics_base_port + N.
  metrics_base_port = 9100
}
