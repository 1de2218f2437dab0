# courier AMI: a Debian 12 (or Amazon Linux 2023) image with courier in /opt/courier/venv,
# its systemd units (one process per vCPU), and the CloudWatch agent.
#
#   scripts/build-wheelhouse.sh          # dist/wheelhouse: courier + runtime wheels
#   packer init packer/ && packer build packer/
#
# This template only orchestrates: it uploads the inputs and runs
# packer/scripts/provision.sh, which does all the work (and which the test-suite runs
# in a fresh Debian root). Paths are relative to this directory, so it builds from any
# working directory.

locals {
  timestamp = formatdate("YYYYMMDD-hhmmss", timestamp())
  repo      = "${path.root}/.."
  tags = merge(var.tags, {
    Name            = "${var.ami_name_prefix}-${var.version}"
    Application     = "courier"
    CourierVersion  = var.version
    SourceAMI       = "{{ .SourceAMI }}"
    SourceAMIName   = "{{ .SourceAMIName }}"
    BuiltWithPacker = "true"
  })
}

source "amazon-ebs" "courier" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id != "" ? var.subnet_id : null

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = var.source_ami_owners
    most_recent = true
  }

  ami_name        = "${var.ami_name_prefix}-${var.version}-${local.timestamp}"
  ami_description = "courier ${var.version}: one process per vCPU under systemd, CloudWatch agent"
  ami_users       = var.ami_users

  # Encrypted gp3 root; its snapshot, and so the AMI, stays encrypted.
  launch_block_device_mappings {
    device_name           = var.root_device_name
    volume_size           = var.root_volume_size_gb
    volume_type           = "gp3"
    iops                  = 3000 # gp3 baseline, stated: some Packer releases require both
    throughput            = 125
    encrypted             = true
    kms_key_id            = var.kms_key_id != "" ? var.kms_key_id : null
    delete_on_termination = true
  }

  # packer>=1.7: begin (older Packer does not know these; tests/test_packer.py strips them)
  # IMDSv2 only, for the build instance and for every instance launched from the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"
  # packer>=1.7: end

  communicator  = "ssh"
  ssh_username  = var.ssh_username
  ssh_interface = var.ssh_interface
  ssh_timeout   = "10m"

  # Session Manager needs an instance profile allowing SSM; Packer creates a temporary one.
  dynamic "temporary_iam_instance_profile_policy_document" {
    for_each = var.ssh_interface == "session_manager" ? [1] : []
    content {
      Version = "2012-10-17"
      Statement {
        Effect = "Allow"
        Action = [
          "ssm:UpdateInstanceInformation",
          "ssmmessages:CreateControlChannel",
          "ssmmessages:CreateDataChannel",
          "ssmmessages:OpenControlChannel",
          "ssmmessages:OpenDataChannel",
        ]
        Resource = ["*"]
      }
    }
  }

  tags          = local.tags
  snapshot_tags = local.tags
  run_tags      = merge(local.tags, { Name = "packer-${var.ami_name_prefix}-${var.version}" })
}

build {
  sources = ["source.amazon-ebs.courier"]

  # Inputs land in /tmp as /tmp/wheelhouse and /tmp/systemd (directories without a
  # trailing slash are uploaded as themselves).
  provisioner "file" {
    source      = "${local.repo}/dist/wheelhouse"
    destination = "/tmp"
  }

  provisioner "file" {
    source      = "${local.repo}/systemd"
    destination = "/tmp"
  }

  provisioner "file" {
    source      = "${path.root}/files/cloudwatch-agent.json"
    destination = "/tmp/courier-cloudwatch-agent.json"
  }

  provisioner "file" {
    source      = "${path.root}/files/prometheus.yaml"
    destination = "/tmp/courier-prometheus.yaml"
  }

  provisioner "shell" {
    script          = "${path.root}/scripts/provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "WHEELHOUSE=/tmp/wheelhouse",
      "SYSTEMD_SRC=/tmp/systemd",
      "CW_CONFIG=/tmp/courier-cloudwatch-agent.json",
      "CW_PROMETHEUS_CONFIG=/tmp/courier-prometheus.yaml",
      "AWS_REGION=${var.region}",
      "SKIP_CLOUDWATCH_AGENT=${var.install_cloudwatch_agent ? "" : "1"}",
    ]
  }

  # The AMI id for terraform (var.ami_id), in dist/packer-manifest.json.
  post-processor "manifest" {
    output     = "${local.repo}/dist/packer-manifest.json"
    strip_path = true
    custom_data = {
      version = var.version
    }
  }
}
