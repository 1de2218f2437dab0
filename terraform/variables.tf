################################################################################
# General
################################################################################

variable "name" {
  description = "Name of this deployment. Prefixes every resource name (ALB, ASG, queues, tables, alarms, log group /courier/<name>)."
  type        = string
  default     = "courier"

  validation {
    # The longest derived names are the ALB access-log bucket (<name>-alb-logs-<account>-<region>,
    # at most 63 characters) and the target group (<name>-api, at most 32).
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lower-case letters, digits and hyphens, starting with a letter and not ending with a hyphen."
  }
}

variable "tags" {
  description = "Tags merged into every resource this module creates (in addition to any provider default_tags)."
  type        = map(string)
  default     = {}
}

variable "deletion_protection" {
  description = "Protect the load balancer and the DynamoDB tables from deletion. Turn off only to tear a deployment down."
  type        = bool
  default     = true
}

################################################################################
# Network
################################################################################

variable "vpc_id" {
  description = "ID of the existing VPC to deploy into."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]{8,17}$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "alb_subnet_ids" {
  description = "Subnets of the load balancer: public subnets for an internet-facing ALB, private ones when internal = true. At least two, in different Availability Zones."
  type        = list(string)

  validation {
    condition     = length(var.alb_subnet_ids) >= 2 && alltrue([for s in var.alb_subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", s))])
    error_message = "alb_subnet_ids needs at least two subnet IDs (subnet-...) in different Availability Zones."
  }
}

variable "private_subnet_ids" {
  description = "Private subnets of the instances (no public IPs are assigned). At least two, in different Availability Zones; they need a route to the AWS APIs (NAT gateway or VPC endpoints)."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2 && alltrue([for s in var.private_subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", s))])
    error_message = "private_subnet_ids needs at least two subnet IDs (subnet-...) in different Availability Zones."
  }
}

variable "internal" {
  description = "Make the load balancer internal (reachable only inside the VPC and connected networks) instead of internet-facing."
  type        = bool
  default     = false
}

variable "alb_ingress_cidr_blocks" {
  description = "IPv4 CIDR blocks allowed to reach the load balancer on 443 (and on 80, which only redirects to 443)."
  type        = list(string)

  validation {
    condition     = length(var.alb_ingress_cidr_blocks) > 0 && alltrue([for c in var.alb_ingress_cidr_blocks : can(cidrhost(c, 0)) && !can(regex(":", c))])
    error_message = "alb_ingress_cidr_blocks must be a non-empty list of IPv4 CIDR blocks such as 203.0.113.0/24."
  }
}

variable "aws_api_egress_cidr_blocks" {
  description = "Where instances may open HTTPS (443) connections for the AWS APIs (SQS, DynamoDB, KMS, CloudWatch, Logs, SSM, Auto Scaling) and JWKS. The default 0.0.0.0/0 fits a NAT gateway; with interface VPC endpoints for every service and no NAT, set the VPC CIDR instead. Set to [] to rely on aws_api_egress_prefix_list_ids and egress_rules only."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.aws_api_egress_cidr_blocks : can(cidrhost(c, 0)) && !can(regex(":", c))])
    error_message = "aws_api_egress_cidr_blocks must contain IPv4 CIDR blocks."
  }
}

variable "aws_api_egress_prefix_list_ids" {
  description = "Managed prefix lists instances may reach on 443, e.g. the DynamoDB and S3 gateway endpoint prefix lists (pl-...) when aws_api_egress_cidr_blocks is narrowed."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for p in var.aws_api_egress_prefix_list_ids : can(regex("^pl-[0-9a-f]{8,17}$", p))])
    error_message = "aws_api_egress_prefix_list_ids must contain prefix list IDs (pl-...)."
  }
}

variable "egress_rules" {
  description = "Extra egress from the instances: the IdM back-end and the legacy systems. One rule per system, each with a description, a TCP/UDP port range and CIDR blocks."
  type = list(object({
    description = string
    cidr_blocks = list(string)
    from_port   = number
    to_port     = number
    protocol    = optional(string, "tcp")
  }))
  default = []

  validation {
    condition = alltrue([for r in var.egress_rules :
      length(trimspace(r.description)) > 0 && length(r.cidr_blocks) > 0 &&
      alltrue([for c in r.cidr_blocks : can(cidrhost(c, 0)) && !can(regex(":", c))]) &&
      contains(["tcp", "udp"], r.protocol) &&
      r.from_port >= 1 && r.to_port <= 65535 && r.from_port <= r.to_port
    ])
    error_message = "Each egress rule needs a description, IPv4 cidr_blocks, protocol tcp or udp and 1 <= from_port <= to_port <= 65535."
  }

  validation {
    # courier talks HTTP(S) to its peers; nothing in this deployment uses SSH.
    condition     = alltrue([for r in var.egress_rules : !(r.from_port <= 22 && r.to_port >= 22)])
    error_message = "egress_rules must not open port 22: this deployment uses no SSH anywhere."
  }
}

################################################################################
# Load balancer
################################################################################

variable "certificate_arn" {
  description = "ARN of the ACM certificate served by the HTTPS listener."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN (arn:aws:acm:<region>:<account>:certificate/<id>)."
  }
}

variable "ssl_policy" {
  description = "TLS policy of the HTTPS listener. The default allows TLS 1.3 and 1.2 with modern ciphers only."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  validation {
    condition     = startswith(var.ssl_policy, "ELBSecurityPolicy-TLS13-") || startswith(var.ssl_policy, "ELBSecurityPolicy-FS-1-2-")
    error_message = "ssl_policy must be a TLS 1.2+ policy (ELBSecurityPolicy-TLS13-* or ELBSecurityPolicy-FS-1-2-*)."
  }
}

variable "web_acl_arn" {
  description = "ARN of a WAFv2 web ACL (REGIONAL scope) to associate with the load balancer; null for none."
  type        = string
  default     = null

  validation {
    condition     = var.web_acl_arn == null || can(regex("^arn:aws[a-z-]*:wafv2:[a-z0-9-]+:[0-9]{12}:regional/webacl/.+$", var.web_acl_arn))
    error_message = "web_acl_arn must be a REGIONAL WAFv2 web ACL ARN (arn:aws:wafv2:<region>:<account>:regional/webacl/...) or null."
  }
}

variable "access_logs_expiration_days" {
  description = "Days the load balancer access logs are kept in their S3 bucket before they expire."
  type        = number
  default     = 90

  validation {
    condition     = var.access_logs_expiration_days >= 1 && floor(var.access_logs_expiration_days) == var.access_logs_expiration_days
    error_message = "access_logs_expiration_days must be a whole number of days, at least 1."
  }
}

variable "api_port" {
  description = "Port the courier API listens on (all processes of an instance share it with SO_REUSEPORT). The target group and the ALB-to-instance rule use it."
  type        = number
  default     = 8080

  validation {
    condition     = var.api_port >= 1024 && var.api_port <= 65535 && floor(var.api_port) == var.api_port && (var.api_port < 9100 || var.api_port > 9199)
    error_message = "api_port must be an unprivileged port (1024-65535) outside 9100-9199, where the per-process metrics ports live."
  }
}

variable "drain_seconds" {
  description = "Bound on finishing in-flight work at shutdown (courier [http] drain_seconds). The target group deregistration delay equals it and the termination lifecycle hook waits longer."
  type        = number
  default     = 20

  # courier@.service stops with TimeoutStopSec=30: the drain, then up to 5 s to release and
  # flush the worker (worker.release_seconds), then 2 s to close must fit with a margin, or systemd's
  # SIGKILL skips the release (tests/test_systemd_units.py checks the same sum).
  validation {
    condition     = var.drain_seconds >= 1 && var.drain_seconds <= 22 && floor(var.drain_seconds) == var.drain_seconds
    error_message = "drain_seconds must be a whole number between 1 and 22 (the unit's TimeoutStopSec=30 minus release and exit time)."
  }
}

################################################################################
# Compute
################################################################################

variable "ami_id" {
  description = "ID of the courier AMI built by Packer (packer build packer/). Changing it starts a canary instance refresh."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "instance_type" {
  description = "Instance type (its architecture must match the AMI). courier runs one process per vCPU."
  type        = string
  default     = "c6i.large"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must look like c6i.large."
  }
}

variable "root_volume_size" {
  description = "Size in GiB of the encrypted gp3 root volume."
  type        = number
  default     = 16

  validation {
    condition     = var.root_volume_size >= 8 && var.root_volume_size <= 1024
    error_message = "root_volume_size must be between 8 and 1024 GiB."
  }
}

variable "min_size" {
  description = "Minimum number of instances. At least 2 keeps the service up through the loss of an Availability Zone or an instance."
  type        = number
  default     = 2

  validation {
    condition     = var.min_size >= 1 && floor(var.min_size) == var.min_size
    error_message = "min_size must be a whole number of at least 1 (the backlog-per-instance metric divides by the instances in service)."
  }
}

variable "max_size" {
  description = "Maximum number of instances the scaling policies may reach."
  type        = number
  default     = 10

  validation {
    condition     = var.max_size >= 1 && var.max_size <= 1000 && floor(var.max_size) == var.max_size
    error_message = "max_size must be a whole number between 1 and 1000."
  }
}

variable "health_check_grace_period" {
  description = "Seconds after launch before the ASG acts on failed load balancer health checks."
  type        = number
  default     = 120

  validation {
    condition     = var.health_check_grace_period >= 0 && var.health_check_grace_period <= 7200
    error_message = "health_check_grace_period must be between 0 and 7200 seconds."
  }
}

variable "instance_warmup_seconds" {
  description = "Seconds a new instance needs before its metrics count for scaling and before an instance refresh moves on (the ASG default instance warmup)."
  type        = number
  default     = 90

  validation {
    condition     = var.instance_warmup_seconds >= 0 && var.instance_warmup_seconds <= 3600
    error_message = "instance_warmup_seconds must be between 0 and 3600."
  }
}

variable "lifecycle_hook_heartbeat_seconds" {
  description = "How long a terminating instance may stay in Terminating:Wait while courier drains before it calls CompleteLifecycleAction. Must exceed drain_seconds; CONTINUE is the default result."
  type        = number
  default     = 120

  validation {
    condition     = var.lifecycle_hook_heartbeat_seconds >= 30 && var.lifecycle_hook_heartbeat_seconds <= 7200
    error_message = "lifecycle_hook_heartbeat_seconds must be between 30 and 7200 (the Auto Scaling limits)."
  }
}

variable "instance_refresh" {
  description = "Rolling instance refresh used when the launch template changes (a new AMI or config): checkpoint percentages make the first step a canary, checkpoint_delay_seconds is the bake time at each checkpoint, and a firing rollout alarm rolls back automatically."
  type = object({
    checkpoint_percentages   = optional(list(number), [10, 50, 100])
    checkpoint_delay_seconds = optional(number, 600)
    min_healthy_percentage   = optional(number, 90)
    max_healthy_percentage   = optional(number, 120)
    auto_rollback            = optional(bool, true)
  })
  default = {}

  validation {
    condition = (
      length(var.instance_refresh.checkpoint_percentages) > 0 &&
      alltrue([for p in var.instance_refresh.checkpoint_percentages : p >= 1 && p <= 100 && floor(p) == p]) &&
      var.instance_refresh.checkpoint_percentages[length(var.instance_refresh.checkpoint_percentages) - 1] == 100 &&
      alltrue([for i in range(1, length(var.instance_refresh.checkpoint_percentages)) :
      var.instance_refresh.checkpoint_percentages[i] > var.instance_refresh.checkpoint_percentages[i - 1]])
    )
    error_message = "instance_refresh.checkpoint_percentages must be whole, strictly increasing percentages ending with 100, e.g. [10, 50, 100]."
  }

  validation {
    condition = (
      var.instance_refresh.checkpoint_delay_seconds >= 0 && var.instance_refresh.checkpoint_delay_seconds <= 172800 &&
      var.instance_refresh.min_healthy_percentage >= 0 && var.instance_refresh.min_healthy_percentage <= 100 &&
      var.instance_refresh.max_healthy_percentage >= 100 && var.instance_refresh.max_healthy_percentage <= 200 &&
      var.instance_refresh.max_healthy_percentage - var.instance_refresh.min_healthy_percentage <= 100
    )
    error_message = "instance_refresh: checkpoint_delay_seconds 0-172800, min_healthy_percentage 0-100, max_healthy_percentage 100-200, and max - min <= 100."
  }
}

variable "mixed_instances" {
  description = "Run part of the group on Spot through a mixed instances policy; null runs only On-Demand instances of instance_type. instance_types lists the types to diversify over (same architecture as the AMI)."
  type = object({
    instance_types                           = list(string)
    on_demand_base_capacity                  = optional(number, 2)
    on_demand_percentage_above_base_capacity = optional(number, 50)
    spot_allocation_strategy                 = optional(string, "price-capacity-optimized")
  })
  default = null

  validation {
    condition = var.mixed_instances == null || (
      length(try(var.mixed_instances.instance_types, [])) >= 2 &&
      try(var.mixed_instances.on_demand_base_capacity, 0) >= 0 &&
      try(var.mixed_instances.on_demand_percentage_above_base_capacity, 0) >= 0 &&
      try(var.mixed_instances.on_demand_percentage_above_base_capacity, 0) <= 100 &&
      contains(["price-capacity-optimized", "capacity-optimized", "capacity-optimized-prioritized", "lowest-price"], try(var.mixed_instances.spot_allocation_strategy, ""))
    )
    error_message = "mixed_instances needs at least two instance_types, on_demand_base_capacity >= 0, on_demand_percentage_above_base_capacity 0-100 and a valid spot_allocation_strategy."
  }
}

variable "warm_pool" {
  description = "Keep pre-initialised stopped (or hibernated) instances to scale out faster; null for none. Cannot be combined with mixed_instances (Auto Scaling does not support warm pools with Spot)."
  type = object({
    pool_state                  = optional(string, "Stopped")
    min_size                    = optional(number, 0)
    max_group_prepared_capacity = optional(number)
    reuse_on_scale_in           = optional(bool, false)
  })
  default = null

  validation {
    # Running warm instances would poll the queue before they are in service: only stopped states.
    condition     = var.warm_pool == null || contains(["Stopped", "Hibernated"], try(var.warm_pool.pool_state, ""))
    error_message = "warm_pool.pool_state must be Stopped or Hibernated: a Running warm instance would start processing before it is in service."
  }
}

################################################################################
# Scaling
################################################################################

variable "requests_per_target" {
  description = "Target tracking value for ALBRequestCountPerTarget: requests per instance per minute."
  type        = number
  default     = 3000

  validation {
    condition     = var.requests_per_target > 0
    error_message = "requests_per_target must be positive."
  }
}

variable "backlog_per_instance" {
  description = "Target tracking value for the SQS backlog per instance (visible messages / instances in service): the acceptable latency divided by the average time one instance needs per message. E.g. 60 s acceptable / 0.05 s per message = 1200."
  type        = number
  default     = 1000

  validation {
    condition     = var.backlog_per_instance > 0
    error_message = "backlog_per_instance must be positive."
  }
}

################################################################################
# Queue
################################################################################

variable "fifo_queue" {
  description = "Create FIFO queues (per-MessageGroupId ordering, content-based deduplication) instead of standard queues."
  type        = bool
  default     = false
}

variable "message_retention_seconds" {
  description = "How long an event stays in the work queue before SQS drops it (the message TTL)."
  type        = number
  default     = 345600

  validation {
    condition     = var.message_retention_seconds >= 60 && var.message_retention_seconds <= 1209600
    error_message = "message_retention_seconds must be between 60 and 1209600 (14 days)."
  }
}

variable "visibility_timeout_seconds" {
  description = "Default visibility timeout of the work queue. courier extends visibility while it works and backs off retries itself; this only applies to receives that set none."
  type        = number
  default     = 60

  validation {
    condition     = var.visibility_timeout_seconds >= 0 && var.visibility_timeout_seconds <= 43200
    error_message = "visibility_timeout_seconds must be between 0 and 43200."
  }
}

variable "max_receive_count" {
  description = "Receives after which SQS moves a message to the DLQ (the redrive policy safety net for crashes; courier moves permanent failures itself). Transient retries count as receives: with courier's backoff (2 s doubling, capped at 15 min) 20 rides out a few hours of target outage."
  type        = number
  default     = 20

  validation {
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 1000 && floor(var.max_receive_count) == var.max_receive_count
    error_message = "max_receive_count must be a whole number between 1 and 1000."
  }
}

variable "kms_data_key_reuse_period_seconds" {
  description = "Seconds SQS reuses a data key from the CMK before calling KMS again (fewer KMS calls versus a shorter key exposure)."
  type        = number
  default     = 300

  validation {
    condition     = var.kms_data_key_reuse_period_seconds >= 60 && var.kms_data_key_reuse_period_seconds <= 86400
    error_message = "kms_data_key_reuse_period_seconds must be between 60 and 86400."
  }
}

################################################################################
# Data and keys
################################################################################

variable "status_table_name" {
  description = "Name of the status / idempotency DynamoDB table; null for <name>-status."
  type        = string
  default     = null

  validation {
    condition     = var.status_table_name == null || can(regex("^[a-zA-Z0-9_.-]{3,255}$", var.status_table_name))
    error_message = "status_table_name must be 3-255 characters of letters, digits, _ . and -."
  }
}

variable "create_credstash_table" {
  description = "Create the CredStash table. Set to false when an existing CredStash store of that name is shared with other services."
  type        = bool
  default     = true
}

variable "credstash_table_name" {
  description = "Name of the CredStash DynamoDB table (the credstash CLI default is credential-store)."
  type        = string
  default     = "credential-store"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_.-]{3,255}$", var.credstash_table_name))
    error_message = "credstash_table_name must be 3-255 characters of letters, digits, _ . and -."
  }
}

variable "credstash_kms_key_arn" {
  description = "ARN of an existing KMS key that encrypts the CredStash secrets; null creates one with the alias credstash_kms_alias."
  type        = string
  default     = null

  validation {
    condition     = var.credstash_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.credstash_kms_key_arn))
    error_message = "credstash_kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>) or null."
  }
}

variable "credstash_kms_alias" {
  description = "Alias of the CredStash key created when credstash_kms_key_arn is null (the credstash CLI default is alias/credstash)."
  type        = string
  default     = "alias/credstash"

  validation {
    condition     = can(regex("^alias/[a-zA-Z0-9/_-]+$", var.credstash_kms_alias)) && !startswith(var.credstash_kms_alias, "alias/aws/")
    error_message = "credstash_kms_alias must start with alias/ (and not alias/aws/)."
  }
}

variable "credstash_encryption_context" {
  description = "Encryption context courier's secrets are stored with (credstash put NAME VALUE key=value). It is rendered into courier.toml (secrets.encryption_context), and the instances may decrypt only CredStash items carrying exactly this context (kms:EncryptionContext:<key> conditions, no other keys); empty allows only items stored without a context."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([for key, value in var.credstash_encryption_context :
      length(trimspace(key)) > 0 && length(value) > 0 && !startswith(lower(key), "aws:")
    ])
    error_message = "credstash_encryption_context keys and values must be non-empty, and keys must not start with aws: (reserved by AWS)."
  }
}

variable "envelope_accepted_key_arns" {
  description = "ARNs of previous data CMKs (after the data key was replaced) whose queued messages must still be opened: rendered into courier.toml as envelope.accepted_key_ids and granted kms:Decrypt. Remove them once the queues have drained."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for arn in var.envelope_accepted_key_arns : can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", arn))])
    error_message = "envelope_accepted_key_arns must be KMS key ARNs (arn:aws:kms:<region>:<account>:key/<id>)."
  }
}

variable "key_deletion_window_days" {
  description = "Waiting period before a deleted KMS key is destroyed."
  type        = number
  default     = 30

  validation {
    condition     = var.key_deletion_window_days >= 7 && var.key_deletion_window_days <= 30
    error_message = "key_deletion_window_days must be between 7 and 30."
  }
}

################################################################################
# courier configuration (/etc/courier/courier.toml)
################################################################################

variable "courier_role" {
  description = "Which halves each process runs: all (API and worker) or api. This module puts every instance behind the ALB, whose health check is /readyz on the API port; a worker-role process serves no API port (only health and metrics on its own), so a worker-only fleet would fail every check."
  type        = string
  default     = "all"

  validation {
    condition     = contains(["all", "api"], var.courier_role)
    error_message = "courier_role must be all or api: worker-role processes do not serve the API port the ALB health-checks."
  }
}

variable "log_level" {
  description = "Minimum level of courier's JSON log lines."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "jwt_issuer" {
  description = "Expected `iss` claim of the API's bearer tokens."
  type        = string

  validation {
    condition     = length(trimspace(var.jwt_issuer)) > 0
    error_message = "jwt_issuer must not be empty."
  }
}

variable "jwt_audience" {
  description = "Expected `aud` claim of the API's bearer tokens."
  type        = string

  validation {
    condition     = length(trimspace(var.jwt_audience)) > 0
    error_message = "jwt_audience must not be empty."
  }
}

variable "jwks_url" {
  description = "JWKS URL for RS256/ES256 token keys; empty to use only the HS256 secret."
  type        = string
  default     = ""

  validation {
    condition     = var.jwks_url == "" || can(regex("^https://[^/]+", var.jwks_url))
    error_message = "jwks_url must be empty or an https:// URL."
  }
}

variable "jwt_hs256_secret" {
  description = "CredStash name of the HS256 token key; empty to accept only JWKS-signed tokens."
  type        = string
  default     = "courier.jwt.hs256"
}

variable "idm_url" {
  description = "Base URL of the identity back-end (IdM) the API calls synchronously."
  type        = string

  validation {
    condition     = can(regex("^https?://[^/]+", var.idm_url))
    error_message = "idm_url must be an http(s) URL."
  }
}

variable "idm_api_key_secret" {
  description = "CredStash name of the IdM API key."
  type        = string
  default     = "courier.idm.api_key"

  validation {
    condition     = length(trimspace(var.idm_api_key_secret)) > 0
    error_message = "idm_api_key_secret must not be empty."
  }
}

variable "secrets_ttl_seconds" {
  description = "How long courier keeps a fetched CredStash secret fresh in memory."
  type        = number
  default     = 300

  validation {
    condition     = var.secrets_ttl_seconds >= 1 && var.secrets_ttl_seconds <= 86400
    error_message = "secrets_ttl_seconds must be between 1 and 86400."
  }
}

variable "max_in_flight" {
  description = "Messages one courier process works on at once."
  type        = number
  default     = 100

  validation {
    condition     = var.max_in_flight >= 1 && var.max_in_flight <= 10000 && floor(var.max_in_flight) == var.max_in_flight
    error_message = "max_in_flight must be a whole number between 1 and 10000."
  }
}

variable "targets" {
  description = "Legacy systems the worker delivers every event to: name (used in idempotency keys, metrics and alarms), url, format (json or soap), secret (CredStash name of the credentials, empty for none), and optional per-call timeout_seconds and per-process concurrency."
  type = list(object({
    name            = string
    url             = string
    format          = optional(string, "json")
    secret          = optional(string, "")
    timeout_seconds = optional(number, 5)
    concurrency     = optional(number, 32)
  }))

  validation {
    condition     = length(var.targets) == length(distinct([for t in var.targets : t.name]))
    error_message = "targets must have unique names."
  }

  validation {
    condition = alltrue([for t in var.targets :
      can(regex("^[A-Za-z0-9_.-]{1,64}$", t.name)) && can(regex("^https?://[^/]+", t.url)) &&
      contains(["json", "soap"], t.format) &&
      t.timeout_seconds >= 0.05 && t.timeout_seconds <= 300 && t.concurrency >= 1 && t.concurrency <= 10000
    ])
    error_message = "Each target needs a name of 1-64 letters, digits, _ . -, an http(s) url, format json or soap, timeout_seconds 0.05-300 and concurrency 1-10000."
  }
}

################################################################################
# Observability
################################################################################

variable "alarm_sns_topic_arn" {
  description = "SNS topic every alarm notifies (on ALARM and on OK). If it is encrypted, its key must allow cloudwatch.amazonaws.com."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:.+$", var.alarm_sns_topic_arn))
    error_message = "alarm_sns_topic_arn must be an SNS topic ARN."
  }
}

variable "log_retention_days" {
  description = "Retention of the /courier/<name> log group (application logs and the agent's metric records)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653)."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of courier's own metrics (shipped by the CloudWatch agent) and of the log metric filters. Give each deployment sharing an account its own, e.g. Courier/staging."
  type        = string
  default     = "Courier"

  validation {
    condition     = can(regex("^[A-Za-z0-9._/#:-]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "metrics_namespace must be 1-255 characters of letters, digits and . _ / # : - and must not start with AWS/."
  }
}

variable "alarm_thresholds" {
  description = "Alarm thresholds: target 5xx rate (percent of requests), target p99 latency (seconds), age of the oldest queued message (seconds), error log lines per minute, and minutes the group may stay below its desired capacity."
  type = object({
    target_5xx_percent         = optional(number, 5)
    p99_latency_seconds        = optional(number, 1)
    oldest_message_age_seconds = optional(number, 600)
    error_log_lines_per_minute = optional(number, 20)
    capacity_shortfall_minutes = optional(number, 15)
  })
  default = {}

  validation {
    condition = (
      var.alarm_thresholds.target_5xx_percent > 0 && var.alarm_thresholds.target_5xx_percent <= 100 &&
      var.alarm_thresholds.p99_latency_seconds > 0 &&
      var.alarm_thresholds.oldest_message_age_seconds >= 60 &&
      var.alarm_thresholds.error_log_lines_per_minute >= 0 &&
      var.alarm_thresholds.capacity_shortfall_minutes >= 1
    )
    error_message = "alarm_thresholds: target_5xx_percent in (0, 100], p99_latency_seconds > 0, oldest_message_age_seconds >= 60, error_log_lines_per_minute >= 0, capacity_shortfall_minutes >= 1."
  }
}
