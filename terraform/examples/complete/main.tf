# A complete courier deployment into an existing VPC: every option of the module that a
# production deployment usually sets. Fill in terraform.tfvars (see variables.tf) and run
# terraform init && terraform apply in this directory.

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      ManagedBy = "terraform"
    }
  }
}

module "courier" {
  source = "../../"

  name                = var.name
  deletion_protection = var.deletion_protection

  vpc_id                  = var.vpc_id
  alb_subnet_ids          = var.alb_subnet_ids
  private_subnet_ids      = var.private_subnet_ids
  alb_ingress_cidr_blocks = var.alb_ingress_cidr_blocks
  certificate_arn         = var.certificate_arn
  web_acl_arn             = var.web_acl_arn

  # Legacy systems and IdM inside the corporate network, reached through the VPC's routes.
  egress_rules = [
    {
      description = "IdM back-end (HTTPS on 8443)"
      cidr_blocks = var.idm_cidr_blocks
      from_port   = 8443
      to_port     = 8443
    },
    {
      description = "Legacy systems (HTTP/SOAP on 8080)"
      cidr_blocks = var.legacy_cidr_blocks
      from_port   = 8080
      to_port     = 8080
    },
  ]

  ami_id        = var.ami_id
  instance_type = "c6i.large"
  min_size      = 2
  max_size      = 12

  instance_refresh = {
    checkpoint_percentages   = [10, 50, 100]
    checkpoint_delay_seconds = 900
  }

  requests_per_target  = 3000
  backlog_per_instance = 1000

  # Store courier's secrets with this context (credstash put NAME VALUE app=courier): the
  # instances decrypt with it, and IAM lets them decrypt nothing else.
  credstash_table_name         = "credential-store"
  credstash_encryption_context = { app = "courier" }

  # After a replacement of the data CMK: the previous key's ARN, until the queues drain.
  envelope_accepted_key_arns = []

  courier_role  = "all"
  log_level     = "INFO"
  jwt_issuer    = var.jwt_issuer
  jwt_audience  = "courier"
  jwks_url      = var.jwks_url
  idm_url       = var.idm_url
  drain_seconds = 20
  max_in_flight = 100

  targets = [
    {
      name   = "mail"
      url    = "http://mail.legacy.internal:8080/api/mailboxes"
      format = "json"
      secret = "courier.target.mail"
    },
    {
      name            = "billing"
      url             = "http://billing.legacy.internal:8080/soap"
      format          = "soap"
      secret          = "courier.target.billing"
      timeout_seconds = 10
    },
  ]

  alarm_sns_topic_arn = var.alarm_sns_topic_arn

  tags = {
    Project     = "courier"
    Environment = var.environment
  }
}
