"""One node discovers at a time: the lease, racing components, fencing, and the APScheduler tick."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy import select

from app.core.context import AppContext
from app.core.db import Database
from app.core.models import LeaderLease
from app.discovery.component import DiscoveryComponent
from app.discovery.job import LeaseLost, run_discovery_cycle
from app.discovery.lease import DISCOVERY_LEASE, acquire_lease
from app.spaces.models import Space
from app.x.client import XClient
from app.x.sim import RunningSim, SimState
from tests.discovery.conftest import ClockSleep, later, make_xclient, new_account, subscribe


async def test_lease_race_has_one_winner(ctx: AppContext, db_url: str) -> None:
    """Twenty processes (each its own engine) try at once: exactly one holds the lease."""
    now = ctx.clock.now()
    databases = [Database(db_url) for _ in range(20)]

    async def attempt(i: int, db: Database, at: datetime) -> bool:
        async with db.write() as session:
            return await acquire_lease(session, DISCOVERY_LEASE, f"node-{i}", at, 60)

    try:
        won = await asyncio.gather(*(attempt(i, db, now) for i, db in enumerate(databases)))
        assert sum(won) == 1
        winner = won.index(True)
        # The holder renews; the others still lose until it expires, then exactly one takes over.
        again = await asyncio.gather(*(attempt(i, db, now + timedelta(seconds=30)) for i, db in enumerate(databases)))
        assert again == [i == winner for i in range(20)]
        after = now + timedelta(seconds=30 + 61)
        takeover = await asyncio.gather(*(attempt(i, db, after) for i, db in enumerate(databases)))
        assert sum(takeover) == 1
    finally:
        for db in databases:
            await db.dispose()


async def test_racing_components_only_the_leader_polls(
    ctx: AppContext, db_url: str, sim: RunningSim, sim_state: SimState, sleep: ClockSleep
) -> None:
    alice = sim_state.add_user("alice", id="1001")
    sim_state.add_space(alice.id, "Only once", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    await subscribe(ctx, await new_account(ctx), keyword="once")

    # Two processes: their own database engines and X clients, one shared world and clock.
    others = AppContext(settings=ctx.settings, db=Database(db_url), clock=ctx.clock)
    nodes = [
        DiscoveryComponent(ctx, lambda: make_xclient(ctx, sim, sleep), owner="node-a", schedule=False),
        DiscoveryComponent(others, lambda: make_xclient(others, sim, sleep), owner="node-b", schedule=False),
    ]
    for node in nodes:
        await node.start()
    try:
        for round_ in range(4):
            before = dict(sim_state.calls)
            reports = await asyncio.gather(*(node.tick() for node in nodes))
            assert sum(r is not None for r in reports) == 1, round_
            assert [n.is_leader for n in nodes] == [r is not None for r in reports]
            made = {k: v - before.get(k, 0) for k, v in sim_state.calls.items() if v != before.get(k, 0)}
            leader_report = next(r for r in reports if r is not None)
            assert made == leader_report.calls
            if round_ == 0:
                assert leader_report.events == [("1AAAAAAAAAAAA", "space.scheduled")]
            else:
                assert leader_report.events == []
            ctx.clock.advance(30)
        leader = next(n for n in nodes if n.is_leader)
        follower = next(n for n in nodes if not n.is_leader)
        # A clean stop releases the lease: the follower takes over at its next tick.
        await leader.stop()
        assert await follower.tick() is not None and follower.is_leader
        async with ctx.db.session() as session:
            lease = await session.get(LeaderLease, DISCOVERY_LEASE)
            assert lease is not None and lease.owner == follower.owner
            assert [s.id for s in await session.scalars(select(Space))] == ["1AAAAAAAAAAAA"]
    finally:
        for node in nodes:
            await node.stop()
        await others.db.dispose()


async def test_expired_leader_cannot_write(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    alice = sim_state.add_user("alice", id="1001")
    sim_state.add_space(alice.id, "Fenced", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        assert await acquire_lease(session, DISCOVERY_LEASE, "old-leader", now, 60)
    ctx.clock.advance(61)  # the old leader stalled past its lease and a new one took over
    async with ctx.db.write() as session:
        assert await acquire_lease(session, DISCOVERY_LEASE, "new-leader", ctx.clock.now(), 60)
    try:
        await run_discovery_cycle(ctx, xclient, now, lease_owner="old-leader")
        raise AssertionError("a cycle without the lease must not write")
    except LeaseLost:
        pass
    async with ctx.db.session() as session:
        assert list(await session.scalars(select(Space))) == []


async def test_scheduler_ticks_and_after_cycle_hook(
    ctx: AppContext, sim: RunningSim, sim_state: SimState, sleep: ClockSleep
) -> None:
    alice = sim_state.add_user("alice", id="1001")
    sim_state.add_space(alice.id, "Ticked", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    ctx.settings.discovery_interval_seconds = 0.05  # real seconds: APScheduler runs on wall time
    hooked: list[datetime] = []
    ran = asyncio.Event()

    async def after_cycle(now: datetime) -> None:
        hooked.append(now)
        ran.set()

    component = DiscoveryComponent(ctx, lambda: make_xclient(ctx, sim, sleep), after_cycle=after_cycle)
    await component.start()
    try:
        await asyncio.wait_for(ran.wait(), timeout=10)
        assert component.is_leader and component.last_report is not None
        assert hooked[0] == component.last_report.started_at
        assert component.readiness()["ready"] is True and component.readiness()["leader"] is True
    finally:
        await component.stop()
    async with ctx.db.session() as session:
        assert await session.get(LeaderLease, DISCOVERY_LEASE) is None  # released on stop
        assert await session.get(Space, "1AAAAAAAAAAAA") is not None
