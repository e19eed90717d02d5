"""Discovery against the X simulator over real HTTP, on SQLite and PostgreSQL.

The simulator, the service and the XClient share the test's ManualClock; the client's sleep moves that
clock instead of sleeping, so X's 1/s spacing, backoff and rate-limit waits cost no real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from app.accounts.service import create_account as create_account_row
from app.core.clock import ManualClock
from app.core.context import AppContext
from app.core.ids import new_id
from app.discovery.job import CycleReport, run_discovery_cycle
from app.subscriptions.models import Subscription
from app.subscriptions.schemas import SubscriptionCreate, normalize_keyword
from app.subscriptions.service import create_subscription
from app.x.client import XClient
from app.x.sim import RunningSim, SimState, create_sim_app, running_sim
from tests.x.helpers import TOKEN, RecordingSleep



# The client's sleep moves the shared clock and remembers each wait (the X tests' helper).
ClockSleep = RecordingSleep


@pytest.fixture
def sim_state(clock: ManualClock) -> SimState:
    return SimState(clock=clock, seed=11)


@pytest.fixture
async def sim(sim_state: SimState) -> AsyncIterator[RunningSim]:
    async with running_sim(create_sim_app(sim_state, bearer_token=TOKEN)) as running:
        yield running


@pytest.fixture
def sleep(clock: ManualClock) -> ClockSleep:
    return ClockSleep(clock)


@pytest.fixture
async def xclient(sim: RunningSim, ctx: AppContext, clock: ManualClock, sleep: ClockSleep) -> AsyncIterator[XClient]:
    ctx.settings.x_api_base_url = sim.base_url
    client = make_xclient(ctx, sim, sleep)
    yield client
    await client.aclose()


def make_xclient(ctx: AppContext, sim: RunningSim, sleep: ClockSleep, **kwargs: Any) -> XClient:
    kwargs.setdefault("by_creator_min_interval", ctx.settings.x_by_creator_min_interval_seconds)
    kwargs.setdefault("max_rate_limit_wait", min(ctx.settings.discovery_interval_seconds, 15))
    return XClient(sim.base_url, TOKEN, clock=ctx.clock, sleep=sleep, **kwargs)


async def cycle(ctx: AppContext, client: XClient, *, advance: float | None = None) -> CycleReport:
    """One cycle at the clock's now, then move the clock by one discovery interval."""
    report = await run_discovery_cycle(ctx, client, ctx.clock.now())
    ctx.clock.advance(ctx.settings.discovery_interval_seconds if advance is None else advance)  # type: ignore[attr-defined]
    return report


async def new_account(ctx: AppContext, name: str = "acct") -> str:
    async with ctx.db.write() as session:
        return (await create_account_row(session, name, ctx.clock.now())).account_id


async def subscribe(ctx: AppContext, account_id: str, **target: Any) -> Subscription:
    target.setdefault("email", "ada@example.com")
    async with ctx.db.write() as session:
        return await create_subscription(session, account_id, SubscriptionCreate(**target), ctx.clock.now(), 100000)


async def bulk_subscribe(
    ctx: AppContext, account_id: str, *, creator_ids: Sequence[str] = (), keywords: Sequence[str] = ()
) -> None:
    """Many subscriptions in one insert, bypassing the API's per-subscription work (budget tests need
    demand, not deliveries)."""
    now = ctx.clock.now()
    common = dict(account_id=account_id, include_hosts=False, target_status="active", lead_times=[15],
                  event_types=["space.reminder"], paused=False, created_at=now, updated_at=now)
    rows = [Subscription(id=new_id("sub"), target_kind="creator", creator_id=c, **common) for c in creator_ids]
    rows += [
        Subscription(id=new_id("sub"), target_kind="keyword", keyword=k, keyword_normalized=normalize_keyword(k), **common)
        for k in keywords
    ]
    async with ctx.db.write() as session:
        session.add_all(rows)


def later(ctx: AppContext, **delta: float) -> datetime:
    return ctx.clock.now() + timedelta(**delta)
