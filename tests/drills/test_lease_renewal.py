"""Drill: a live worker keeps the leases of the rows it is sending, so no other worker sends them again.

The claim loop renews its leases in `_housekeeping` every min(idle, lease / 3) seconds, but it only
gets there when it wakes up, and when nothing is pending it sleeps `dispatcher_idle_seconds` (5 s by
default) whatever the lease. With a lease shorter than that (the 3 s of the crash drills) the rows a
healthy worker is still sending lapse for seconds at a time; another worker reclaims and re-sends them
(same webhook-id, so receivers can deduplicate, but a duplicate without any crash), and the first
worker's results are refused. In the multi-process version of this (two `spacebell worker`s, lease 3 s,
idle 5 s, a receiver answering after 12 s) 20 of 20 notifications went out twice.

In process, deterministic: worker A runs its real loops on a ManualClock; its sends are held open by the
receiver for a few real seconds while the test moves the clock past the lease; worker B then looks.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import func, select

from app.core.clock import ManualClock
from app.core.context import AppContext
from app.delivery.dispatcher import Dispatcher
from app.delivery.models import Notification
from app.delivery.outbox import ReminderOutbox
from tests.conftest import make_settings
from tests.drills.support import seed_world
from tests.support.receivers import Reply, WebhookReceiver

LEASE_SECONDS = 3.0  # shorter than dispatcher_idle_seconds (default 5)
SEND_SECONDS = 4.0  # real seconds the receiver holds each request


async def earliest_lease_of(ctx: AppContext, owner: str):  # type: ignore[no-untyped-def]
    async with ctx.db.session() as session:
        return await session.scalar(
            select(func.min(Notification.lease_expires_at)).where(
                Notification.state == "sending", Notification.lease_owner == owner
            )
        )


async def test_a_live_worker_keeps_its_leases_while_sending(ctx: AppContext, db_url: str) -> None:
    clock = ctx.clock
    assert isinstance(clock, ManualClock)
    settings = make_settings(db_url, dispatcher_lease_seconds=LEASE_SECONDS)
    assert settings.dispatcher_idle_seconds > LEASE_SECONDS
    ctx_a = AppContext(settings=settings, db=ctx.db, clock=clock)
    ctx_b = AppContext(settings=settings, db=ctx.db, clock=clock)
    async with WebhookReceiver(check_timestamp=False) as receiver:
        world = await seed_world(ctx.db, clock.now(), spaces=2, subscriptions=5, receiver=receiver, endpoints=1,
                                 due_in=timedelta(0))
        total = len(world.notification_ids)
        receiver.default_reply = Reply(200, b"ok", delay=SEND_SECONDS)
        worker_a = Dispatcher(ctx_a, outbox=ReminderOutbox.from_settings(settings), owner="worker-a")
        worker_b = Dispatcher(ctx_b, outbox=ReminderOutbox.from_settings(settings), owner="worker-b")
        started = time.monotonic()
        await worker_a.start()
        try:
            await receiver.wait_for(total)  # A claimed everything and every send is in flight
            lapsed: list[float] = []
            for _ in range(8):  # 4 s of the ManualClock in 0.5 s steps, while A's sends stay open
                clock.advance(0.5)
                deadline = time.monotonic() + 0.25
                while True:  # give A's loops a moment to renew (a database write), then look
                    await asyncio.sleep(0.02)
                    lease = await earliest_lease_of(ctx, "worker-a")
                    if lease is None or lease > clock.now() or time.monotonic() > deadline:
                        break
                if lease is not None and lease <= clock.now():
                    lapsed.append((clock.now() - world.due_at).total_seconds())  # type: ignore[operator]
            assert time.monotonic() - started < SEND_SECONDS, "the sends finished before the clock passed the lease"
            report = await worker_b.run_once(clock.now())
        finally:
            await worker_a.stop()
            await worker_b.stop()
        await receiver.assert_no_more(len(receiver.received), within=0.1)
        received = list(receiver.received)

    sent_twice = len(received) - len({r.webhook_id for r in received})
    print(f"\n[lease renewal drill] lease {LEASE_SECONDS:g}s, idle {settings.dispatcher_idle_seconds:g}s: "
          f"A's leases lapsed at t+{lapsed}s while it was sending; B claimed {report.claimed}; "
          f"{sent_twice} of {total} sent twice")
    assert report.claimed == 0 and sent_twice == 0, (
        f"worker B took over {report.claimed} rows that live worker A was still sending (its leases lapsed at "
        f"t+{lapsed}s: the claim loop slept dispatcher_idle_seconds past its lease renewal); {sent_twice} of "
        f"{total} notifications were sent twice"
    )
    assert not lapsed
