"""Prometheus metrics of the dispatcher (the senders' own attempt metrics live in app/delivery/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Fine at the low end: the lateness target is milliseconds, the failure modes are minutes.
_LATENESS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)

outbox_depth = Gauge(
    "spacebell_outbox_depth",
    "Notifications not finished yet, by state (pending, held, sending).",
    ["state"],
)
deliveries = Counter(
    "spacebell_dispatch_results_total",
    "What became of each claimed notification, by channel and result "
    "(delivered, retry, failed, expired, canceled, held, deferred, refused).",
    ["channel", "result"],
)
lateness = Histogram(
    "spacebell_dispatch_lateness_seconds",
    "Seconds between a notification's due time and the start of its send.",
    ["channel"],
    buckets=_LATENESS_BUCKETS,
)
endpoint_failures = Counter(
    "spacebell_webhook_endpoint_failures_total",
    "Webhook attempts that did not deliver, by outcome (retry, failed, gone).",
    ["outcome"],
)
endpoints_disabled = Counter(
    "spacebell_webhook_endpoints_disabled_total",
    "Webhook endpoints the dispatcher disabled (410 Gone, or failing too long).",
)
claimed = Counter("spacebell_dispatch_claimed_total", "Outbox rows claimed under a lease.")
notify_wakeups = Counter(
    "spacebell_dispatch_notify_wakeups_total",
    "Outbox notifications (PostgreSQL LISTEN/NOTIFY) that woke this worker's dispatcher.",
)
