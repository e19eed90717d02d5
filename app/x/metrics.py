"""Prometheus metrics of calls to X's API (default registry, so the service's /metrics exposes them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

X_API_CALLS = Counter(
    "spacebell_x_api_calls",
    "HTTP calls to X's API by endpoint and response status ('error' for network errors and timeouts).",
    ["endpoint", "status"],
)

X_RATE_LIMIT_REMAINING = Gauge(
    "spacebell_x_rate_limit_remaining",
    "x-rate-limit-remaining of the latest response from each X endpoint.",
    ["endpoint"],
)
