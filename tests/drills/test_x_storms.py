"""Fault drill of discovery: X answering 429 or 5xx to everything for several cycles, or the app's quota
cut to almost nothing, while Spaces are added, moved and canceled. On SQLite and PostgreSQL, against
the X simulator over HTTP; the XClient's sleep moves the shared ManualClock, so no real time passes.

Nothing may crash, no known Space may be taken for canceled, polling must not stop (these are not
terminal errors), and once X is healthy again every change is found and every reminder delivered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.accounts.service import create_account
from app.core.clock import ManualClock
from app.core.context import AppContext
from app.delivery.dispatcher import Dispatcher
from app.core.events import ALL_EVENT_TYPES
from app.core.ids import new_id
from app.delivery.models import Notification, WebhookEndpoint
from app.delivery.service import new_webhook_secret
from app.delivery.outbox import ReminderOutbox
from app.discovery.job import CycleReport, run_discovery_cycle
from app.spaces.models import Space
from app.subscriptions.models import Subscription
from app.subscriptions.schemas import SubscriptionCreate
from app.subscriptions.service import create_subscription
from app.x.client import XClient
from app.x.sim import RunningSim, SimState, create_sim_app, running_sim
from tests.drills.support import World, check_webhooks
from tests.support.receivers import WebhookReceiver
from tests.x.helpers import TOKEN, RecordingSleep

X_ENDPOINTS = ("spaces_by_creator", "spaces_search", "spaces_lookup", "users_by")
STORM_CYCLES = 4


def x_calls(status: str) -> float:
    return sum(
        REGISTRY.get_sample_value("spacebell_x_api_calls_total", {"endpoint": e, "status": status}) or 0.0
        for e in X_ENDPOINTS
    )


@pytest.fixture
def sim_state(clock: ManualClock) -> SimState:
    return SimState(clock=clock, seed=17)


@pytest.fixture
async def sim(sim_state: SimState) -> AsyncIterator[RunningSim]:
    async with running_sim(create_sim_app(sim_state, bearer_token=TOKEN)) as running:
        yield running


async def spaces_in_db(ctx: AppContext) -> dict[str, tuple[str, Any]]:
    async with ctx.db.session() as session:
        return {s.id: (s.state, s.scheduled_start) for s in await session.scalars(select(Space))}


async def reminders(ctx: AppContext) -> list[Notification]:
    async with ctx.db.session() as session:
        return list(await session.scalars(select(Notification).order_by(Notification.due_at)))


@pytest.mark.parametrize("storm", ["429", "503", "quota"])
async def test_x_error_storm_loses_no_space(
    ctx: AppContext, clock: ManualClock, sim: RunningSim, sim_state: SimState, storm: str
) -> None:
    ctx.settings.x_api_base_url = sim.base_url
    sleep = RecordingSleep(clock)
    client = XClient(
        sim.base_url, TOKEN, clock=clock, sleep=sleep,
        by_creator_min_interval=ctx.settings.x_by_creator_min_interval_seconds,
        max_rate_limit_wait=min(ctx.settings.discovery_interval_seconds, ctx.settings.leader_lease_seconds / 4),
    )
    outbox = ReminderOutbox()
    interval = ctx.settings.discovery_interval_seconds

    async def cycle() -> CycleReport:
        report = await run_discovery_cycle(ctx, client, clock.now())
        async with ctx.db.write() as session:
            await outbox.fan_out_events(session, clock.now())
        clock.advance(interval)
        return report

    def later(**delta: float) -> Any:
        return clock.now() + timedelta(**delta)

    alice = sim_state.add_user("alice", id="1001")
    bob = sim_state.add_user("bob", id="1002")
    carol = sim_state.add_user("carol", id="1003")
    dave = sim_state.add_user("dave", id="1004")
    a1 = sim_state.add_space(alice.id, "Alice morning", scheduled_start=later(hours=3), id="1AliceOne0000")
    b1 = sim_state.add_space(bob.id, "Chess night", scheduled_start=later(hours=4), id="1BobChess0001")
    c1 = sim_state.add_space(carol.id, "Carol talks", scheduled_start=later(hours=5), id="1CarolOne0000")

    async with WebhookReceiver(check_timestamp=False) as receiver:
        async with ctx.db.write() as session:
            account = (await create_account(session, "storm", clock.now())).account_id
            endpoint = WebhookEndpoint(
                id=new_id("we"), account_id=account, url=receiver.url, secret=new_webhook_secret(),
                event_types=list(ALL_EVENT_TYPES), enabled=True, created_at=clock.now(), updated_at=clock.now(),
            )
            session.add(endpoint)
        receiver.secret = endpoint.secret

        async def subscribe(**target: Any) -> Subscription:
            body = SubscriptionCreate(webhook_endpoint_id=endpoint.id, lead_times=[15],
                                      event_types=["space.reminder"], **target)
            async with ctx.db.write() as session:
                return await create_subscription(session, account, body, clock.now(), 1000, outbox)

        subs = {"alice": await subscribe(creator_id=alice.id), "carol": await subscribe(creator_id=carol.id),
                "chess": await subscribe(keyword="chess")}
        calm = await cycle()
        assert calm.errors == [] and sorted(calm.events) == sorted(
            [(a1.id, "space.scheduled"), (b1.id, "space.scheduled"), (c1.id, "space.scheduled")]
        )
        known = await spaces_in_db(ctx)

        # The storm, and the world changing under it.
        errors_before, ok_before = x_calls("429" if storm != "503" else "503"), x_calls("200")
        if storm == "quota":
            sim_state.configure(requests_per_window=1)  # the service still plans for its usual budget
        else:
            sim_state.set_fault(int(storm), count=None)
        subs["dave"] = await subscribe(creator_username="dave")  # to be resolved through X
        a2 = sim_state.add_space(alice.id, "Alice evening", scheduled_start=later(hours=6), id="1AliceTwo0000")
        b2 = sim_state.add_space(bob.id, "Chess blitz", scheduled_start=later(hours=7), id="1BobChess0002")
        d1 = sim_state.add_space(dave.id, "Dave's show", scheduled_start=later(hours=8), id="1DaveOne00000")
        sim_state.reschedule(c1.id, later(hours=9))
        sim_state.cancel(b1.id)

        storm_reports = [await cycle() for _ in range(STORM_CYCLES)]
        true_changes = {(b1.id, "space.canceled"), (c1.id, "space.rescheduled"), (a2.id, "space.scheduled"),
                        (b2.id, "space.scheduled"), (d1.id, "space.scheduled")}
        for report in storm_reports:
            assert report.stopped is None, report.stopped  # 429 and 5xx are not reasons to stop polling
            # Whatever got through is true: no Space taken for canceled because X did not answer.
            assert set(report.events) <= true_changes, report.events
        assert storm_reports[0].errors
        after_storm = await spaces_in_db(ctx)
        for space_id, (state, start) in after_storm.items():
            truth = sim_state.spaces[space_id]
            assert (state, start) in ((known.get(space_id)), (truth.state, truth.scheduled_start)), space_id
        storm_errors = x_calls("429" if storm != "503" else "503") - errors_before
        if storm == "quota":
            # X said remaining=0 until the window resets: the planner stops calling, it does not hammer X.
            assert 1 <= storm_errors <= len(X_ENDPOINTS), storm_errors
            assert all(r.calls == {} or not r.errors for r in storm_reports[1:]), [r.calls for r in storm_reports]
            exhausted = [e for e in X_ENDPOINTS
                         if REGISTRY.get_sample_value("spacebell_x_rate_limit_remaining", {"endpoint": e}) == 0]
            assert exhausted, "the remaining-quota gauge does not show the exhausted window"
        else:
            assert all(r.errors for r in storm_reports), [r.errors for r in storm_reports]
            assert storm_errors >= 4 * STORM_CYCLES, storm_errors  # the client retried each call, then gave up
            assert [r.events for r in storm_reports] == [[]] * STORM_CYCLES
            assert after_storm == known and x_calls("200") == ok_before
            async with ctx.db.session() as session:
                assert (await session.get(Subscription, subs["dave"].id)).target_status == "resolving"  # type: ignore[union-attr]

        # X recovers.
        sim_state.clear_faults()
        if storm == "quota":
            sim_state.configure(requests_per_window=300)
            clock.advance(sim_state.window_seconds)  # the service waits for X's window to reset
        expected = {
            a1.id: ("scheduled", a1.scheduled_start), a2.id: ("scheduled", a2.scheduled_start),
            b1.id: ("canceled", b1.scheduled_start), b2.id: ("scheduled", b2.scheduled_start),
            c1.id: ("scheduled", sim_state.spaces[c1.id].scheduled_start),
            d1.id: ("scheduled", d1.scheduled_start),
        }
        recovery: list[CycleReport] = []
        for _ in range(8):
            recovery.append(await cycle())
            if await spaces_in_db(ctx) == expected:
                break
        assert await spaces_in_db(ctx) == expected, [(r.calls, r.errors, r.events) for r in recovery]
        assert x_calls("200") > ok_before
        async with ctx.db.session() as session:
            assert (await session.get(Subscription, subs["dave"].id)).target_status == "active"  # type: ignore[union-attr]

        # Every Space still on gets its reminder, at its (new) time; the canceled one gets none.
        pending = [n for n in await reminders(ctx) if n.state == "pending"]
        assert sorted(n.space_id for n in pending) == sorted([a1.id, a2.id, b2.id, c1.id, d1.id])
        async with Dispatcher(ctx, outbox=outbox) as dispatcher:
            for n in pending:
                clock.set(max(clock.now(), n.due_at))
                assert (await dispatcher.run_once(clock.now())).delivered == 1
        rows = await reminders(ctx)
        assert {(n.space_id, n.state) for n in rows} >= {(b1.id, "canceled")}
        delivered = {n.id: n for n in rows if n.state == "delivered"}
        assert len(delivered) == 5
        assert delivered_for(delivered, c1.id).due_at == expected[c1.id][1] - timedelta(minutes=15)
        world = World(account, set(delivered), {(n.subscription_id, n.space_id): n.id for n in delivered.values()})
        tally = check_webhooks(world, await receiver.wait_for(5))
        await receiver.assert_no_more(5)
        assert tally.duplicates == 0

    await client.aclose()
    print(f"\n[X {storm} storm drill] {STORM_CYCLES} storm cycles, {int(storm_errors)} error answers from X, "
          f"recovered in {len(recovery)} cycles, 6 Spaces tracked, 5 reminders delivered, 0 lost")


def delivered_for(delivered: dict[str, Notification], space_id: str) -> Notification:
    [n] = [n for n in delivered.values() if n.space_id == space_id]
    return n
