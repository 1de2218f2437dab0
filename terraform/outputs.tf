################################################################################
# Load balancer
################################################################################

output "alb_dns_name" {
  description = "DNS name of the load balancer: point the API's DNS record (alias) at it."
  value       = aws_lb.this.dns_name
}

output "alb_zone_id" {
  description = "Route 53 hosted zone ID of the load balancer, for an alias record."
  value       = aws_lb.this.zone_id
}

output "alb_arn" {
  description = "ARN of the load balancer."
  value       = aws_lb.this.arn
}

output "target_group_arn" {
  description = "ARN of the API target group."
  value       = aws_lb_target_group.api.arn
}

output "alb_security_group_id" {
  description = "Security group of the load balancer."
  value       = aws_security_group.alb.id
}

output "access_logs_bucket" {
  description = "S3 bucket receiving the load balancer access logs."
  value       = aws_s3_bucket.alb_logs.id
}

################################################################################
# Compute
################################################################################

output "autoscaling_group_name" {
  description = "Name of the Auto Scaling group (for aws autoscaling start/rollback-instance-refresh)."
  value       = aws_autoscaling_group.courier.name
}

output "autoscaling_group_arn" {
  description = "ARN of the Auto Scaling group."
  value       = aws_autoscaling_group.courier.arn
}

output "lifecycle_hook_name" {
  description = "Name of the termination lifecycle hook courier completes after draining."
  value       = local.lifecycle_hook_name
}

output "launch_template_id" {
  description = "ID of the launch template."
  value       = aws_launch_template.courier.id
}

output "launch_template_latest_version" {
  description = "Latest launch template version (the one the group runs)."
  value       = aws_launch_template.courier.latest_version
}

output "instance_role_arn" {
  description = "ARN of the instance role."
  value       = aws_iam_role.instance.arn
}

output "instance_security_group_id" {
  description = "Security group of the instances (reference it to admit courier into a legacy system's security group)."
  value       = aws_security_group.instance.id
}

################################################################################
# Queue, data and keys
################################################################################

output "queue_url" {
  description = "URL of the work queue."
  value       = aws_sqs_queue.work.url
}

output "queue_arn" {
  description = "ARN of the work queue."
  value       = aws_sqs_queue.work.arn
}

output "dlq_url" {
  description = "URL of the dead-letter queue (courier replay reads it)."
  value       = aws_sqs_queue.dlq.url
}

output "dlq_arn" {
  description = "ARN of the dead-letter queue."
  value       = aws_sqs_queue.dlq.arn
}

output "status_table_name" {
  description = "Name of the status table."
  value       = aws_dynamodb_table.status.name
}

output "credstash_table_name" {
  description = "Name of the CredStash table (credstash -t <name> ...)."
  value       = var.credstash_table_name
}

output "data_kms_key_arn" {
  description = "ARN of the courier data CMK (SQS, DynamoDB, envelope data keys, logs)."
  value       = aws_kms_key.data.arn
}

output "credstash_kms_key_arn" {
  description = "ARN of the CredStash key (credstash -k <alias> put ...)."
  value       = local.credstash_key_arn
}

################################################################################
# Observability
################################################################################

output "log_group_name" {
  description = "CloudWatch Logs group of courier's JSON logs."
  value       = aws_cloudwatch_log_group.courier.name
}

output "dashboard_name" {
  description = "Name of the CloudWatch dashboard."
  value       = aws_cloudwatch_dashboard.courier.dashboard_name
}

output "rollout_alarm_names" {
  description = "Alarms that roll an instance refresh back when they fire."
  value       = local.rollout_alarm_names
}

output "courier_config" {
  description = "The /etc/courier/courier.toml every instance receives (no secrets: those are CredStash names)."
  value       = local.courier_config
}
