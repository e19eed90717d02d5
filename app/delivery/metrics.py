"""Prometheus metrics of delivery, on the default registry (exposed wherever /metrics is served).

The channel senders record their own attempts; the dispatcher may record notification-level
outcomes and lateness with the helpers at the bottom.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)

webhook_attempts = Counter(
    "spacebell_webhook_attempts_total",
    "Webhook requests by outcome (delivered, retry, failed, gone).",
    ["outcome"],
)
webhook_latency = Histogram(
    "spacebell_webhook_attempt_seconds",
    "Time from sending a webhook request to reading its response.",
    buckets=_LATENCY_BUCKETS,
)
webhook_in_flight = Gauge("spacebell_webhook_in_flight", "Webhook requests in flight.")


class InFlight:
    """Webhook requests in flight in this process: a plain counter the senders bump (a Gauge takes a
    lock on every inc and dec), read by `webhook_in_flight` when metrics are collected."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


webhooks_in_flight = InFlight()
webhook_in_flight.set_function(lambda: webhooks_in_flight.count)

email_attempts = Counter(
    "spacebell_email_attempts_total",
    "SMTP submissions by outcome (delivered, retry, failed).",
    ["outcome"],
)
email_latency = Histogram(
    "spacebell_email_attempt_seconds",
    "Time to hand one message to the SMTP server.",
    buckets=_LATENCY_BUCKETS,
)
smtp_connections_opened = Counter(
    "spacebell_smtp_connections_opened_total", "SMTP connections opened (low when connections are reused)."
)

# Label children, looked up once per label value (`labels()` costs more than the increment itself);
# created on first use, so /metrics shows a series only once something happened, as before.
_children: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, cached."""
    key = (metric, *values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def record_webhook_attempt(outcome: str, latency_ms: float) -> None:
    child(webhook_attempts, outcome).inc()
    webhook_latency.observe(latency_ms / 1000.0)


def record_email_attempt(outcome: str, latency_ms: float) -> None:
    child(email_attempts, outcome).inc()
    email_latency.observe(latency_ms / 1000.0)
