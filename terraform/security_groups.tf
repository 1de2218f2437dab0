################################################################################
# Security groups: clients -> ALB -> instances -> AWS APIs, IdM and legacy systems
#
# No rule anywhere opens port 22: instances are reached through SSM Session Manager.
################################################################################

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "courier ${var.name} load balancer: HTTPS from clients, API port to the instances"
  vpc_id      = var.vpc_id

  tags = merge(local.tags, { Name = "${var.name}-alb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.alb_ingress_cidr_blocks)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from allowed clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value

  tags = merge(local.tags, { Name = "${var.name}-alb-https" })
}

resource "aws_vpc_security_group_ingress_rule" "alb_http_redirect" {
  for_each = toset(var.alb_ingress_cidr_blocks)

  security_group_id = aws_security_group.alb.id
  description       = "HTTP from allowed clients, answered only with a redirect to HTTPS"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = each.value

  tags = merge(local.tags, { Name = "${var.name}-alb-http-redirect" })
}

resource "aws_vpc_security_group_egress_rule" "alb_to_instances" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Requests and health checks to courier on the API port"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.instance.id

  tags = merge(local.tags, { Name = "${var.name}-alb-to-instances" })
}

resource "aws_security_group" "instance" {
  name        = "${var.name}-instance"
  description = "courier ${var.name} instances: API port from the ALB only; HTTPS to AWS APIs, IdM and legacy systems"
  vpc_id      = var.vpc_id

  tags = merge(local.tags, { Name = "${var.name}-instance" })

  lifecycle {
    create_before_destroy = true
  }
}

# The only ingress of the instances. Metrics ports (9100+N) are scraped locally by the
# CloudWatch agent and are deliberately not reachable from the network.
resource "aws_vpc_security_group_ingress_rule" "instance_from_alb" {
  security_group_id            = aws_security_group.instance.id
  description                  = "courier API from the load balancer only"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.alb.id

  tags = merge(local.tags, { Name = "${var.name}-instance-from-alb" })
}

# Egress choice: the AWS APIs courier needs (SQS, DynamoDB, KMS, CloudWatch, CloudWatch Logs,
# SSM, Auto Scaling) are HTTPS endpoints with no fixed addresses. Only DynamoDB and S3 have
# gateway endpoint prefix lists; the others are interface endpoints (ENIs in the VPC) or
# public endpoints behind a NAT gateway. So the default allows 443 to 0.0.0.0/0 - HTTPS
# only, the instances have no public IP and a NAT/egress firewall is the place for
# destination filtering - and a VPC with interface endpoints for every service and no NAT
# narrows it to the VPC CIDR plus the gateway prefix lists (aws_api_egress_*).
# DNS (VPC resolver), NTP (169.254.169.123) and IMDS are link-local and need no rule.
resource "aws_vpc_security_group_egress_rule" "instance_https_cidr" {
  for_each = toset(var.aws_api_egress_cidr_blocks)

  security_group_id = aws_security_group.instance.id
  description       = "HTTPS to AWS APIs (SQS, DynamoDB, KMS, CloudWatch, Logs, SSM, Auto Scaling) and JWKS"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value

  tags = merge(local.tags, { Name = "${var.name}-instance-https" })
}

resource "aws_vpc_security_group_egress_rule" "instance_https_prefix_list" {
  for_each = toset(var.aws_api_egress_prefix_list_ids)

  security_group_id = aws_security_group.instance.id
  description       = "HTTPS to AWS gateway endpoints (DynamoDB, S3)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = each.value

  tags = merge(local.tags, { Name = "${var.name}-instance-https-endpoint" })
}

resource "aws_vpc_security_group_egress_rule" "instance_extra" {
  for_each = {
    for pair in flatten([
      for index, rule in var.egress_rules : [
        for cidr in rule.cidr_blocks : {
          key  = "${index}-${cidr}"
          rule = rule
          cidr = cidr
        }
      ]
    ]) : pair.key => pair
  }

  security_group_id = aws_security_group.instance.id
  description       = each.value.rule.description
  ip_protocol       = each.value.rule.protocol
  from_port         = each.value.rule.from_port
  to_port           = each.value.rule.to_port
  cidr_ipv4         = each.value.cidr

  tags = merge(local.tags, { Name = "${var.name}-instance-egress-${each.key}" })
}
