variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region the AMI is built in (and the CloudWatch agent downloaded from)."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Instance type of the temporary build instance (any x86_64 type)."
}

variable "version" {
  type        = string
  default     = "dev"
  description = "courier version recorded in the AMI name and tags, e.g. the git tag."
}

variable "ami_name_prefix" {
  type        = string
  default     = "courier"
  description = "AMI names are <prefix>-<version>-<UTC timestamp>."
}

variable "source_ami_name" {
  type        = string
  default     = "debian-12-amd64-*"
  description = "Name filter of the base image; the newest match is used. Amazon Linux 2023: al2023-ami-2023.*-x86_64."
}

variable "source_ami_owners" {
  type        = list(string)
  default     = ["136693071363"]
  description = "Owners of the base image: 136693071363 is Debian's official account; Amazon Linux: [\"amazon\"]."
}

variable "ssh_username" {
  type        = string
  default     = "admin"
  description = "Login user of the base image: admin (Debian), ec2-user (Amazon Linux)."
}

variable "root_device_name" {
  type        = string
  default     = "/dev/xvda"
  description = "Root device of the base image (/dev/xvda for Debian 12 and Amazon Linux 2023)."
}

variable "root_volume_size_gb" {
  type        = number
  default     = 8
  description = "Size of the encrypted gp3 root volume."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key (ARN, ID or alias) encrypting the root volume and AMI snapshot; empty = the account's default EBS key."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet of the build instance; empty = the default VPC."
}

variable "ssh_interface" {
  type        = string
  default     = "public_ip"
  description = "How Packer reaches the build instance: public_ip, private_ip, or session_manager (no inbound port; needs the SSM agent in the base image and an instance profile, which Packer creates)."
}

variable "install_cloudwatch_agent" {
  type        = bool
  default     = true
  description = "Download (from AWS's S3 bucket of the region, signature-checked) and configure the CloudWatch agent."
}

variable "ami_users" {
  type        = list(string)
  default     = []
  description = "Other AWS accounts allowed to launch the AMI."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags for the AMI, its snapshot and the build instance."
}
