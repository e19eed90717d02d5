"""One discovery cycle: plan the calls the budget allows, ask X, then store Spaces and their events.

No transaction stays open while X is asked: the cycle reads what it needs, calls X, then writes
everything in one short write transaction (fenced by the leader lease when one is given).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import String, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.context import AppContext
from app.core.settings import Settings
from app.discovery import metrics
from app.discovery.lease import DISCOVERY_LEASE, hold_lease
from app.discovery.planner import (
    BY_CREATOR,
    CREATOR,
    KEYWORD,
    KEYWORD_LIVE,
    LOOKUP,
    SEARCH,
    USERS,
    BudgetConfig,
    KnownSpace,
    Plan,
    Target,
    billing_day,
    creator_batches,
    estimated_spend,
    max_staleness,
    next_utc_midnight,
    plan_cycle,
    recheck_candidates,
    spend_cap_reached,
    terminal_resume_at,
)
from app.discovery.state import (
    SPEND_CAP_REASON,
    PollingStop,
    clear_stop,
    ledger_ids,
    load_call_log,
    load_stop,
    purge_ledger,
    record_reads,
    save_call_log,
    save_stop,
)
from app.discovery.store import (
    apply_gone,
    apply_observed_spaces,
    mark_polled,
    poll_times,
    resolve_usernames,
    upsert_creators,
)
from app.spaces.models import Space, SpaceState
from app.subscriptions.matching import SUBSTRING, KeywordIndex, KeywordIndexCache, subscriptions_for_spaces
from app.subscriptions.models import Subscription, TargetKind, TargetStatus
from app.x.client import (
    MAX_IDS_PER_CALL,
    XClient,
    XRequestError,
    XResult,
    XSpace,
    XTerminalError,
    XUnavailableError,
    XUser,
)

log = logging.getLogger(__name__)

KEYWORD_INDEX_CACHE = "discovery.keyword_index_cache"
SEARCH_PAGE = 100  # X's search does not paginate: a full page means more may exist


class LeaseLost(RuntimeError):
    """Another node took the discovery lease during this cycle; its results are dropped."""


@dataclass
class CycleReport:
    started_at: datetime
    duration_seconds: float = 0.0
    stopped: PollingStop | None = None
    calls: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    polled: list[Target] = field(default_factory=list)
    spaces_seen: int = 0
    spaces_new: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)  # (space id, kind)
    rechecked: list[str] = field(default_factory=list)
    settled_subscriptions: dict[str, str] = field(default_factory=dict)
    matched_subscriptions: dict[str, list[str]] = field(default_factory=dict)
    plan: Plan | None = None
    max_staleness_seconds: float | None = None
    staleness_bound_seconds: float | None = None
    spend_usd: float = 0.0
    spend_cap_usd: float = 0.0

    @property
    def polled_anything(self) -> bool:
        return sum(self.calls.values()) > 0


@dataclass
class _Demand:
    creators: list[Target]
    searches: list[Target]
    usernames: list[str]
    known: list[KnownSpace]


async def _load_demand(session: AsyncSession) -> _Demand:
    times = await poll_times(session)
    is_keyword = Subscription.target_kind == TargetKind.keyword
    creator_ids = await session.scalars(
        select(Subscription.creator_id)
        .where(
            Subscription.target_kind == TargetKind.creator,
            Subscription.target_status == TargetStatus.active,
            Subscription.creator_id.is_not(None),
            Subscription.paused.is_(False),
        )
        .distinct()
    )
    creators = [Target(CREATOR, c, times.get((CREATOR, c))) for c in creator_ids if c]

    keywords = await session.execute(
        select(Subscription.keyword_normalized, func.min(Subscription.keyword))
        .where(is_keyword, Subscription.paused.is_(False), Subscription.keyword_normalized.is_not(None))
        .group_by(Subscription.keyword_normalized)
    )
    # event_types is a JSON list; matching its text works the same on both databases.
    wants_started = set(
        await session.scalars(
            select(Subscription.keyword_normalized)
            .where(
                is_keyword,
                Subscription.paused.is_(False),
                cast(Subscription.event_types, String).like('%"space.started"%'),
            )
            .distinct()
        )
    )
    searches: list[Target] = []
    for normalized, spelling in keywords.all():
        searches.append(Target(KEYWORD, normalized, times.get((KEYWORD, normalized)), spelling))
        if normalized in wants_started:
            searches.append(Target(KEYWORD_LIVE, normalized, times.get((KEYWORD_LIVE, normalized)), spelling))

    usernames = await session.scalars(
        select(func.lower(Subscription.creator_username))
        .where(
            Subscription.target_kind == TargetKind.creator,
            Subscription.target_status == TargetStatus.resolving,
            Subscription.creator_username.is_not(None),
        )
        .distinct()
    )
    known = [
        KnownSpace(*row)
        for row in await session.execute(
            select(Space.id, Space.creator_id, Space.title, Space.state, Space.last_seen_at).where(
                Space.state.in_((SpaceState.scheduled, SpaceState.live))
            )
        )
    ]
    return _Demand(creators, searches, [u for u in usernames if u], known)


class _Caller:
    """Makes the planned calls, turning X's failures into what the cycle should do next."""

    def __init__(
        self,
        ctx: AppContext,
        client: XClient,
        now: datetime,
        spaces_read: set[str],
        users_read: set[str],
        keep_lease: Callable[[], Awaitable[None]],
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.now = now
        self.spaces_read = spaces_read
        self.users_read = users_read
        self.new_spaces: set[str] = set()
        self.new_users: set[str] = set()
        self.keep_lease = keep_lease
        self.calls: dict[str, list[datetime]] = defaultdict(list)
        self.blocked: set[str] = set()
        self.errors: list[str] = []
        self.stop: PollingStop | None = None

    def spend(self) -> float:
        return _spend(self.ctx.settings, self.spaces_read, self.users_read)

    async def call(self, endpoint: str, request: Callable[[], Awaitable[XResult]]) -> tuple[XResult | None, bool]:
        """(result, rejected): `rejected` when X refused this request itself (retrying it will not help)."""
        if self.stop is not None or endpoint in self.blocked:
            return None, False
        if spend_cap_reached(self.spend(), self.ctx.settings.x_daily_spend_cap_usd):
            self.stop = _spend_cap_stop(self.spend(), self.ctx.settings, self.now)
            return None, False
        await self.keep_lease()
        try:
            result = await request()
        except XTerminalError as exc:
            self.stop = PollingStop(
                exc.reason, exc.detail or str(exc), self.now, terminal_resume_at(exc.reason, exc.period, self.now),
                status=exc.status, period=exc.period,
            )
            return None, False
        except XRequestError as exc:
            self.errors.append(str(exc))
            if exc.status in (401, 403):
                reason = "unauthorized" if exc.status == 401 else "forbidden"
                self.stop = PollingStop(
                    reason, f"{exc.title}: {exc.detail}", self.now, terminal_resume_at(reason, None, self.now),
                    status=exc.status,
                )
                return None, False
            if exc.status == 400:  # this request's parameters (a keyword X refuses): rotate past it
                return None, True
            # Anything else (404: a wrong base URL?) says nothing about the targets: retry next cycle.
            self.blocked.add(endpoint)
            return None, False
        except XUnavailableError as exc:  # rate limit not recovering, 5xx, timeouts: try next cycle
            self.blocked.add(endpoint)
            self.errors.append(str(exc))
            return None, False
        except ValueError as exc:
            self.errors.append(f"{endpoint}: {exc}")
            return None, True
        finally:
            self.calls[endpoint].append(self.ctx.clock.now())
        for space in result.spaces:
            if space.id not in self.spaces_read:
                self.spaces_read.add(space.id)
                self.new_spaces.add(space.id)
        for user in [*result.users, *result.users_included]:
            if user.id not in self.users_read:
                self.users_read.add(user.id)
                self.new_users.add(user.id)
        for error in result.other_errors:
            self.errors.append(f"{endpoint}: {error.get('title') or 'error'}: {error.get('detail') or error}")
        return result, False


async def run_discovery_cycle(
    ctx: AppContext, client: XClient, now: datetime, *, lease_owner: str | None = None
) -> CycleReport:
    """Poll X once within budget and store what changed. With `lease_owner`, every write (and, during
    long cycles, a renewal between calls) first checks that this node still holds the discovery lease."""
    started = time.perf_counter()
    settings = ctx.settings
    report = CycleReport(started_at=now, spend_cap_usd=settings.x_daily_spend_cap_usd)
    day = billing_day(now)
    async with ctx.db.session() as session:
        previous_stop = await load_stop(session)
        call_log = await load_call_log(session)
        spaces_read, users_read = await ledger_ids(session, day)
        demand = await _load_demand(session)
    spend = report.spend_usd = _spend(settings, spaces_read, users_read)

    if previous_stop is not None and now < previous_stop.resume_at:
        report.stopped = previous_stop
        return _finish(report, started)
    if spend_cap_reached(spend, settings.x_daily_spend_cap_usd):
        report.stopped = _spend_cap_stop(spend, settings, now)
        async with ctx.db.write() as session:
            await _check_lease(ctx, session, lease_owner)
            await save_stop(session, report.stopped, now)
        return _finish(report, started)

    config = BudgetConfig(
        settings.x_requests_per_window, settings.x_window_seconds, settings.discovery_interval_seconds,
        settings.x_by_creator_min_interval_seconds,
    )
    rate_limits = {**call_log.rate_limits, **client.rate_limits}
    plan = plan_cycle(
        now, config, creators=demand.creators, searches=demand.searches, usernames=demand.usernames,
        history=call_log.history, rate_limits=rate_limits,
    )
    report.plan = plan
    renewed_at = ctx.clock.now()

    async def keep_lease() -> None:
        nonlocal renewed_at
        if lease_owner is None or (ctx.clock.now() - renewed_at).total_seconds() < settings.leader_lease_seconds / 3:
            return
        async with ctx.db.write() as session:
            await _check_lease(ctx, session, lease_owner)
        renewed_at = ctx.clock.now()

    caller = _Caller(ctx, client, now, spaces_read, users_read, keep_lease)
    observed: list[XSpace] = []
    users: list[XUser] = []
    polled: list[Target] = []

    # Usernames first: creators they resolve to are polled in this same cycle.
    found: dict[str, XUser] = {}
    unknown: set[str] = set()
    suspended: set[str] = set()
    for batch in plan.username_batches:
        result, _ = await caller.call(USERS, lambda b=batch: client.users_by_usernames(b))
        if result is None:
            continue
        users += result.users
        found.update({u.username.lower(): u for u in result.users})
        unknown.update(u.lower() for u in result.not_found)
        suspended.update(u.lower() for u in result.suspended)
    creators = list(demand.creators)
    known_creators = {t.value for t in creators}
    creators += [Target(CREATOR, u.id) for u in found.values() if u.id not in known_creators]
    batches = creator_batches(creators, plan.allowances[BY_CREATOR])

    returned: set[str] = set()
    polled_creators: set[str] = set()
    for batch in batches:
        ids = [t.value for t in batch]
        result, rejected = await caller.call(BY_CREATOR, lambda i=ids: client.spaces_by_creator_ids(i))
        if result is not None:
            polled_creators.update(ids)
            observed += result.spaces
            users += result.users_included
            returned.update(s.id for s in result.spaces)
        if result is not None or rejected:
            polled += batch

    complete: dict[str, set[str]] = {KEYWORD: set(), KEYWORD_LIVE: set()}
    for target in plan.searches:
        state = "live" if target.kind == KEYWORD_LIVE else "scheduled"
        query = target.query or target.value
        result, rejected = await caller.call(SEARCH, lambda q=query, s=state: client.search_spaces(q, s))
        if result is not None:
            observed += result.spaces
            users += result.users_included
            returned.update(s.id for s in result.spaces)
            if len(result.spaces) < SEARCH_PAGE:
                complete[target.kind].add(target.value)
        if result is not None or rejected:
            polled.append(target)

    # Known Spaces that should have shown up and did not: a lookup tells canceled/started/ended apart.
    # X's search matches anywhere in the title, so "would X have returned it" uses substring matching.
    scheduled_index = KeywordIndex(complete[KEYWORD], SUBSTRING)
    live_index = KeywordIndex(complete[KEYWORD_LIVE], SUBSTRING)
    to_check = recheck_candidates(
        demand.known, now, returned=returned, polled_creators=polled_creators,
        searched_scheduled=lambda title: bool(scheduled_index.matches(title)),
        searched_live=lambda title: bool(live_index.matches(title)),
        stale_after_seconds=max(2 * config.interval_seconds, plan.staleness_bound_seconds + config.interval_seconds),
        limit=plan.lookup_calls * MAX_IDS_PER_CALL,
    )
    gone: list[str] = []
    for start in range(0, len(to_check), MAX_IDS_PER_CALL):
        ids = to_check[start : start + MAX_IDS_PER_CALL]
        result, _ = await caller.call(LOOKUP, lambda i=ids: client.spaces_by_ids(i))
        if result is None:
            continue
        report.rechecked += ids
        observed += result.spaces
        users += result.users_included
        asked = set(ids)
        gone += [i for i in result.not_found if i in asked]

    report.calls = {endpoint: len(times) for endpoint, times in caller.calls.items()}
    report.errors = caller.errors
    report.polled = polled
    report.stopped = caller.stop
    report.spend_usd = caller.spend()

    async with ctx.db.write() as session:
        await _check_lease(ctx, session, lease_owner)
        await upsert_creators(session, users, now)
        report.settled_subscriptions = await resolve_usernames(session, found, unknown, suspended, now)
        changes = await apply_observed_spaces(session, observed, now)
        changes += await apply_gone(session, gone, now, gone_means_canceled=settings.x_gone_means_canceled)
        await plan_resolved_subscriptions(ctx, session, report.settled_subscriptions, now)
        await mark_polled(session, polled, now)
        await record_reads(session, day, caller.new_spaces, caller.new_users)
        await purge_ledger(session, day - timedelta(days=2))
        await save_call_log(
            session, call_log, caller.calls, client.rate_limits, ctx.clock.now(),
            keep_seconds=config.window_seconds + 2 * config.interval_seconds,
        )
        if caller.stop is not None:
            await save_stop(session, caller.stop, now)
        elif previous_stop is not None:
            await clear_stop(session)

    # Each new or changed Space against every subscription (creator, co-host, and keyword through the
    # Aho-Corasick index), for the report; the outbox matches again when it fans the events out. Outside
    # the write transaction: on SQLite that one blocks every other writer.
    touched = [c.space for c in changes if c.new or c.events]
    cache: KeywordIndexCache = ctx.components.setdefault(
        KEYWORD_INDEX_CACHE, KeywordIndexCache(mode=ctx.settings.keyword_match)
    )
    async with ctx.db.session() as session:
        matched = await subscriptions_for_spaces(session, touched, await cache.get(session), include_paused=True)
    report.matched_subscriptions = {sid: [s.id for s in subs] for sid, subs in matched.items() if subs}

    report.spaces_seen = len({s.id for s in observed})
    report.spaces_new = sum(1 for c in changes if c.new)
    report.events = [(e.space_id, e.kind) for c in changes for e in c.events]
    after = {(t.kind, t.value) for t in polled}
    targets = [
        Target(t.kind, t.value, now if (t.kind, t.value) in after else t.last_polled_at)
        for t in [*creators, *demand.searches]
    ]
    report.max_staleness_seconds = max_staleness(targets, now)
    report.staleness_bound_seconds = plan.staleness_bound_seconds
    for _, kind in report.events:
        metrics.EVENTS.labels(kind).inc()
    if report.errors:
        log.warning("discovery cycle at %s: %d errors, first: %s", now, len(report.errors), report.errors[0])
    if caller.stop is not None:
        log.error("polling X stopped (%s) until %s: %s", caller.stop.reason, caller.stop.resume_at, caller.stop.detail)
    return _finish(report, started)


def _spend(settings: Settings, spaces_read: set[str], users_read: set[str]) -> float:
    return estimated_spend(
        len(spaces_read), len(users_read), settings.x_space_read_cost_usd, settings.x_user_read_cost_usd
    )


def _spend_cap_stop(spend: float, settings: Settings, now: datetime) -> PollingStop:
    cap = settings.x_daily_spend_cap_usd
    detail = f"estimated spend ${spend:.2f} reached the daily cap ${cap:.2f}"
    return PollingStop(SPEND_CAP_REASON, detail, now, next_utc_midnight(now))


async def _check_lease(ctx: AppContext, session: AsyncSession, owner: str | None) -> None:
    if owner is None:
        return
    if not await hold_lease(session, DISCOVERY_LEASE, owner, ctx.clock.now(), ctx.settings.leader_lease_seconds):
        raise LeaseLost(f"{owner} no longer holds the discovery lease")


def _finish(report: CycleReport, started: float) -> CycleReport:
    report.duration_seconds = time.perf_counter() - started
    metrics.CYCLE_SECONDS.observe(report.duration_seconds)
    metrics.DAILY_SPEND.set(report.spend_usd)
    metrics.SPEND_CAP.set(report.spend_cap_usd)
    metrics.set_polling_stopped(report.stopped.reason if report.stopped else None)
    if report.max_staleness_seconds is not None:
        metrics.MAX_STALENESS.set(report.max_staleness_seconds)
    if report.staleness_bound_seconds is not None:
        metrics.STALENESS_BOUND.set(report.staleness_bound_seconds)
    return report


__all__ = ["CycleReport", "LeaseLost", "run_discovery_cycle"]


async def plan_resolved_subscriptions(
    ctx: AppContext, session: AsyncSession, settled: dict[str, str], now: datetime
) -> None:
    """A @username that just resolved may name a creator whose Spaces are already stored: plan them now."""
    activated = [sub_id for sub_id, status in settled.items() if status == TargetStatus.active]
    if not activated:
        return
    from app.delivery.outbox import outbox_for

    outbox = outbox_for(ctx)
    for sub in await session.scalars(select(Subscription).where(Subscription.id.in_(activated))):
        await outbox.plan_subscription(session, sub, now)
