"""Event-driven invocation: cron schedules, CloudEvents ingress and filters, the durable delivery
queue with retries and dead letters, sequences, and the worker that drains the queue."""
