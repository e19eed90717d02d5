"""How many calls each X endpoint may get this cycle, and which creators/keywords get them.

Pure functions of `now` and plain values: the cycle loads the inputs from the database and passes them in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from app.x.client import MAX_IDS_PER_CALL, RateLimit

BY_CREATOR = "spaces_by_creator"
SEARCH = "spaces_search"
LOOKUP = "spaces_lookup"
USERS = "users_by"
ENDPOINTS = (BY_CREATOR, SEARCH, LOOKUP, USERS)

CREATOR = "creator"
KEYWORD = "keyword"  # search state=scheduled
KEYWORD_LIVE = "keyword_live"  # search state=live, only for keywords someone wants space.started for


@dataclass(frozen=True)
class Target:
    kind: str
    value: str
    last_polled_at: datetime | None = None
    query: str | None = None  # the text sent to X for a keyword (a spelling a subscriber used)


@dataclass(frozen=True)
class BudgetConfig:
    requests_per_window: int
    window_seconds: float
    interval_seconds: float
    by_creator_min_interval_seconds: float = 0.0


@dataclass
class Plan:
    allowances: dict[str, int]
    creator_batches: list[list[Target]] = field(default_factory=list)
    searches: list[Target] = field(default_factory=list)
    username_batches: list[list[str]] = field(default_factory=list)
    lookup_calls: int = 0
    # Seconds between two polls of the same target when demand stays as it is (0 when nothing to poll).
    staleness_bound_seconds: float = 0.0


def calls_in_window(history: Sequence[tuple[datetime, int]], now: datetime, seconds: float) -> int:
    since = now - timedelta(seconds=seconds)
    return sum(count for at, count in history if at > since)


def even_share(config: BudgetConfig) -> int:
    """The window's calls spread evenly over the cycles that fit in it (at least one a cycle)."""
    if config.interval_seconds >= config.window_seconds:
        return config.requests_per_window
    return max(1, math.floor(config.requests_per_window * config.interval_seconds / config.window_seconds))


def endpoint_allowance(
    endpoint: str,
    now: datetime,
    config: BudgetConfig,
    history: Sequence[tuple[datetime, int]],
    rate_limit: RateLimit | None = None,
) -> int:
    """Calls `endpoint` may make this cycle.

    Three limits: the even share (so one cycle never spends the window), what our own call log leaves of
    the trailing window, and what X itself last reported as remaining. The log records each cycle's calls
    at its last call, after X answered, so every call X counts in its current window (which opened at its
    first call) is within our trailing window too.
    """
    used = calls_in_window(history, now, config.window_seconds)
    allowance = min(sustainable_share(endpoint, config), max(0, config.requests_per_window - used))
    if rate_limit is not None and rate_limit.reset_at > now:
        allowance = min(allowance, max(0, rate_limit.remaining))
    return allowance


def sustainable_share(endpoint: str, config: BudgetConfig) -> int:
    share = even_share(config)
    if endpoint == BY_CREATOR and config.by_creator_min_interval_seconds > 0:
        # Calls are spaced by the minimum interval; more than fit in the cycle would overrun into the next.
        fit = math.floor(config.interval_seconds / config.by_creator_min_interval_seconds)
        share = min(share, max(1, fit - 1))
    return share


def least_recently_polled(targets: Sequence[Target], count: int) -> list[Target]:
    """Fair rotation: never-polled first, then oldest poll first; ties broken by value for stability."""
    epoch = datetime.min.replace(tzinfo=UTC)
    ordered = sorted(targets, key=lambda t: (t.last_polled_at or epoch, t.kind, t.value))
    return ordered[: max(0, count)]


def chunks(values: Sequence[str], size: int = MAX_IDS_PER_CALL) -> list[list[str]]:
    return [list(values[i : i + size]) for i in range(0, len(values), size)]


def creator_batches(creators: Sequence[Target], calls: int) -> list[list[Target]]:
    chosen = least_recently_polled(creators, calls * MAX_IDS_PER_CALL)
    return [chosen[i : i + MAX_IDS_PER_CALL] for i in range(0, len(chosen), MAX_IDS_PER_CALL)]


def rotation_period(targets: int, per_cycle: int, interval_seconds: float) -> float:
    """Seconds between two polls of one target under least-recently-polled rotation."""
    if targets == 0:
        return 0.0
    if per_cycle <= 0:
        return math.inf
    return math.ceil(targets / per_cycle) * interval_seconds


def plan_cycle(
    now: datetime,
    config: BudgetConfig,
    *,
    creators: Sequence[Target],
    searches: Sequence[Target],
    usernames: Sequence[str],
    history: Mapping[str, Sequence[tuple[datetime, int]]],
    rate_limits: Mapping[str, RateLimit],
) -> Plan:
    allowances = {e: endpoint_allowance(e, now, config, history.get(e, ()), rate_limits.get(e)) for e in ENDPOINTS}
    plan = Plan(allowances=allowances)

    plan.creator_batches = creator_batches(creators, allowances[BY_CREATOR])
    plan.searches = least_recently_polled(searches, allowances[SEARCH])
    plan.username_batches = chunks(sorted({u.lower() for u in usernames}))[: allowances[USERS]]
    plan.lookup_calls = allowances[LOOKUP]
    # At the steady rate, not this cycle's: a cycle X throttles below its share would read as unbounded.
    plan.staleness_bound_seconds = max(
        rotation_period(
            len(creators), sustainable_share(BY_CREATOR, config) * MAX_IDS_PER_CALL, config.interval_seconds
        ),
        rotation_period(len(searches), sustainable_share(SEARCH, config), config.interval_seconds),
    )
    return plan


def max_staleness(targets: Sequence[Target], now: datetime) -> float | None:
    """Age in seconds of the least recently polled target (None when none has been polled yet)."""
    ages = [(now - t.last_polled_at).total_seconds() for t in targets if t.last_polled_at is not None]
    return max(ages) if ages else None


# --- pay-per-use ----------------------------------------------------------------------------------


def billing_day(now: datetime) -> date:
    """X bills each resource once per UTC day."""
    return now.astimezone(UTC).date()


def next_utc_midnight(now: datetime) -> datetime:
    day = billing_day(now)
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)


def estimated_spend(space_reads: int, user_reads: int, space_cost: float, user_cost: float) -> float:
    return round(space_reads * space_cost + user_reads * user_cost, 6)


def spend_cap_reached(spend: float, cap: float) -> bool:
    return cap > 0 and spend >= cap


def terminal_resume_at(reason: str, period: str | None, now: datetime) -> datetime:
    """When polling is worth trying again after X refused for `reason`.

    A usage cap lifts when its period ends; no credits, or rejected credentials, only change when someone
    acts, so those are probed again hourly.
    """
    if reason == "usage-capped" and period:
        kind = period.lower()
        if kind.startswith("month"):
            day = billing_day(now)
            year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
            return datetime(year, month, 1, tzinfo=UTC)
        if kind.startswith("day") or kind.startswith("dai"):
            return next_utc_midnight(now)
    return now + timedelta(hours=1)


# --- which known Spaces to look up by id -----------------------------------------------------------


@dataclass(frozen=True)
class KnownSpace:
    id: str
    creator_id: str
    title: str | None
    state: str
    last_seen_at: datetime


def recheck_candidates(
    known: Sequence[KnownSpace],
    now: datetime,
    *,
    returned: set[str],
    polled_creators: set[str],
    searched_scheduled: Callable[[str | None], bool],
    searched_live: Callable[[str | None], bool],
    stale_after_seconds: float,
    limit: int,
) -> list[str]:
    """Known scheduled/live Spaces to look up by id, most telling first.

    First those a poll of this cycle should have returned and did not (their creator was polled, or a
    complete search for a keyword in their title ran): X drops a Space from those results when it is
    canceled, starts (scheduled searches) or ends, and only a lookup tells which. Then any not seen for
    `stale_after_seconds`, such as a live Space found by a scheduled-only keyword search, oldest first.
    """
    expected: list[KnownSpace] = []
    stale: list[KnownSpace] = []
    stale_before = now - timedelta(seconds=stale_after_seconds)
    for space in known:
        if space.id in returned:
            continue
        searched = searched_scheduled if space.state == "scheduled" else searched_live
        if space.creator_id in polled_creators or searched(space.title):
            expected.append(space)
        elif space.last_seen_at < stale_before:
            stale.append(space)
    expected.sort(key=lambda s: (s.last_seen_at, s.id))
    stale.sort(key=lambda s: (s.last_seen_at, s.id))
    return [s.id for s in [*expected, *stale][: max(0, limit)]]
