"""Prometheus metrics of discovery (default registry, exposed with the service's other metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CYCLE_SECONDS = Histogram(
    "spacebell_discovery_cycle_seconds",
    "Wall time of one discovery cycle (leader only).",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
MAX_STALENESS = Gauge(
    "spacebell_discovery_max_staleness_seconds",
    "Age of the least recently polled creator or keyword after the latest cycle.",
)
STALENESS_BOUND = Gauge(
    "spacebell_discovery_staleness_bound_seconds",
    "Seconds between two polls of one creator or keyword at the current demand and budget.",
)
DAILY_SPEND = Gauge(
    "spacebell_x_estimated_daily_spend_usd",
    "Estimated X pay-per-use spend of the current UTC day (each resource billed once a day).",
)
SPEND_CAP = Gauge("spacebell_x_daily_spend_cap_usd", "Daily spend at which polling stops (0 = no cap).")
EVENTS = Counter("spacebell_discovery_events", "Space events stored by discovery, by kind.", ["kind"])
POLLING_STOPPED = Gauge(
    "spacebell_discovery_polling_stopped",
    "1 while polling X is stopped for this reason (usage-capped, credits, unauthorized, daily-spend-cap, ...).",
    ["reason"],
)
IS_LEADER = Gauge("spacebell_discovery_leader", "1 while this process holds the discovery leader lease.")

_stopped_reasons: set[str] = set()


def set_polling_stopped(reason: str | None) -> None:
    for known in _stopped_reasons:
        POLLING_STOPPED.labels(known).set(0)
    if reason:
        _stopped_reasons.add(reason)
        POLLING_STOPPED.labels(reason).set(1)
