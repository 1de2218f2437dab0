output "alb_dns_name" {
  description = "DNS name of the load balancer."
  value       = module.courier.alb_dns_name
}

output "autoscaling_group_name" {
  description = "Name of the Auto Scaling group."
  value       = module.courier.autoscaling_group_name
}

output "queue_url" {
  description = "URL of the work queue."
  value       = module.courier.queue_url
}

output "dlq_url" {
  description = "URL of the dead-letter queue."
  value       = module.courier.dlq_url
}

output "dashboard_name" {
  description = "CloudWatch dashboard."
  value       = module.courier.dashboard_name
}
