variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name of the deployment."
  type        = string
  default     = "courier"
}

variable "environment" {
  description = "Environment tag value."
  type        = string
  default     = "production"
}

variable "deletion_protection" {
  description = "Protect the load balancer and the DynamoDB tables from deletion; set false before terraform destroy."
  type        = bool
  default     = true
}

variable "vpc_id" {
  description = "ID of the existing VPC."
  type        = string
}

variable "alb_subnet_ids" {
  description = "Public subnets of the load balancer (two or more AZs)."
  type        = list(string)
}

variable "private_subnet_ids" {
  description = "Private subnets of the instances (two or more AZs)."
  type        = list(string)
}

variable "alb_ingress_cidr_blocks" {
  description = "Client networks allowed to call the API."
  type        = list(string)
  default     = ["203.0.113.0/24"]
}

variable "certificate_arn" {
  description = "ACM certificate of the API's host name."
  type        = string
}

variable "web_acl_arn" {
  description = "Optional REGIONAL WAFv2 web ACL for the load balancer."
  type        = string
  default     = null
}

variable "idm_cidr_blocks" {
  description = "Addresses of the IdM back-end."
  type        = list(string)
  default     = ["10.20.0.0/24"]
}

variable "legacy_cidr_blocks" {
  description = "Addresses of the legacy systems."
  type        = list(string)
  default     = ["10.30.0.0/16"]
}

variable "ami_id" {
  description = "courier AMI from packer build packer/."
  type        = string
}

variable "jwt_issuer" {
  description = "Issuer of the API's bearer tokens."
  type        = string
  default     = "https://login.example.net/"
}

variable "jwks_url" {
  description = "JWKS URL of the token issuer."
  type        = string
  default     = "https://login.example.net/.well-known/jwks.json"
}

variable "idm_url" {
  description = "Base URL of the IdM back-end."
  type        = string
  default     = "https://idm.corp.internal:8443"
}

variable "alarm_sns_topic_arn" {
  description = "SNS topic the alarms notify."
  type        = string
}
