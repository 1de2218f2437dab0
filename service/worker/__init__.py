"""The worker half of courier: poll the queue, run each message through the pipeline,
acknowledge the outcome; the targets, circuit breakers, DLQ and replay it needs."""
