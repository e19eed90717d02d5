"""Fault drills of delivery, in process on SQLite and PostgreSQL, time driven by the ManualClock:
an SMTP server down for a while then back, and a webhook receiver failing every other request."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.core.clock import ManualClock
from app.core.context import AppContext
from app.delivery.dispatcher import Dispatcher
from app.delivery.email import SmtpSender
from app.delivery.models import Notification
from app.delivery.outbox import ReminderOutbox
from tests.drills.support import attempt_log, check_webhooks, notification_rows, seed_world, state_counts
from tests.support.receivers import Reply, SmtpCapture, WebhookReceiver

ADDRESSES = [f"drill{i}@example.com" for i in range(5)]


async def pending_retry_times(ctx: AppContext) -> list[datetime]:
    async with ctx.db.session() as session:
        stmt = select(Notification.next_attempt_at).where(Notification.state == "pending")
        return sorted(await session.scalars(stmt))


async def run_due_retries(ctx: AppContext, dispatcher: Dispatcher, passes: int) -> int:
    """Move the clock to the latest pending retry and dispatch, `passes` times or until nothing is pending."""
    clock = ctx.clock
    assert isinstance(clock, ManualClock)
    done = 0
    for _ in range(passes):
        times = await pending_retry_times(ctx)
        if not times:
            break
        clock.set(max(times[-1], clock.now()))
        await dispatcher.run_once(clock.now())
        done += 1
    return done


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_smtp_down_for_a_while_then_back(ctx: AppContext) -> None:
    """Mail due while the SMTP server is down waits (attempts logged with the error) and goes out, once
    each, when it is back; mail sent before the outage is not sent again; pooled connections to the
    dead server are not trusted."""
    clock = ctx.clock
    assert isinstance(clock, ManualClock)
    now = clock.now()
    world_before = await seed_world(ctx.db, now, spaces=4, subscriptions=10, emails=ADDRESSES,
                                    due_in=timedelta(minutes=1), space_prefix="1Before", creator="1111111111")
    world_during = await seed_world(ctx.db, now, spaces=6, subscriptions=10, emails=ADDRESSES,
                                    due_in=timedelta(minutes=10), space_prefix="1During", creator="2222222222")
    retry_before = metric("spacebell_dispatch_results_total", channel="email", result="retry")

    async with SmtpCapture() as smtp, Dispatcher(
        ctx, outbox=ReminderOutbox(), smtp_sender=SmtpSender(smtp.host, smtp.port, timeout=5, max_connections=4)
    ) as dispatcher:
        assert world_before.due_at is not None and world_during.due_at is not None
        clock.set(world_before.due_at)
        assert (await dispatcher.run_once(clock.now())).delivered == 40  # the connection pool is warm now
        await smtp.wait_for(40)

        await smtp.stop()  # down
        clock.set(world_during.due_at)
        report = await dispatcher.run_once(clock.now())
        assert report.results == Counter({"retry": 60}), report.results
        passes_down = await run_due_retries(ctx, dispatcher, passes=3)  # still down: every retry fails too
        assert passes_down == 3
        assert (await state_counts(ctx.db))["pending"] == 60
        assert len(smtp.mails) == 40

        await smtp.start()  # back, on the same port
        await run_due_retries(ctx, dispatcher, passes=10)
        messages = await smtp.wait_for(100)

    counts = await state_counts(ctx.db)
    assert counts == {"delivered": 100}, counts
    all_ids = world_before.notification_ids | world_during.notification_ids
    message_ids = Counter(str(m["Message-ID"]) for m in messages)
    assert len(messages) == 100 and set(message_ids.values()) == {1}, "a message was sent twice"
    assert set(message_ids) == {f"<{nid}@spacebell.local>" for nid in all_ids}
    assert Counter(str(m["To"]) for m in messages) == Counter({a: 20 for a in ADDRESSES})

    rows = await notification_rows(ctx.db)
    log = await attempt_log(ctx.db)
    for nid in world_before.notification_ids:
        assert [(a, o) for a, o, _c, _e in log[nid]] == [(1, "delivered")]
    for nid in world_during.notification_ids:
        attempts = log[nid]
        assert [a for a, *_ in attempts] == list(range(1, len(attempts) + 1)) and len(attempts) == 5, attempts
        *failed, last = attempts
        assert all(o == "retry" and e and "SMTP connection failed" in e for _a, o, _c, e in failed), failed
        assert last[1] == "delivered"
        assert rows[nid]["attempts"] == len(attempts)
        assert "SMTP connection failed" in (rows[nid]["last_error"] or "")
    retried = metric("spacebell_dispatch_results_total", channel="email", result="retry") - retry_before
    assert retried == 60 * 4
    print(f"\n[smtp outage drill] 100 mails, 60 due during the outage, {int(retried)} failed attempts logged, "
          f"0 duplicates")


@pytest.mark.parametrize("failure", [500, 503], ids=["500", "503-throttles"])
async def test_webhook_receiver_failing_every_other_request(ctx: AppContext, failure: int) -> None:
    """Half the requests fail: everything is delivered eventually, once, each attempt logged, and every
    attempt of a notification carries its webhook-id and the same body."""
    clock = ctx.clock
    assert isinstance(clock, ManualClock)
    async with WebhookReceiver(check_timestamp=False) as receiver:  # the sender's clock is a ManualClock
        world = await seed_world(ctx.db, clock.now(), spaces=8, subscriptions=25, receiver=receiver, endpoints=4,
                                 due_in=timedelta(minutes=5))
        total = len(world.notification_ids)
        receiver.fail_every_other(Reply(failure, body="try later"))
        async with Dispatcher(ctx, outbox=ReminderOutbox()) as dispatcher:
            assert world.due_at is not None
            clock.set(world.due_at)
            first = await dispatcher.run_once(clock.now())
            assert first.delivered == total // 2 and first.results["retry"] == total // 2, first.results
            passes = 1 + await run_due_retries(ctx, dispatcher, passes=40)
        received = list(receiver.received)

    counts = await state_counts(ctx.db)
    assert counts == {"delivered": total}, counts
    tally = check_webhooks(world, received)
    assert tally.duplicates == 0 and tally.requests == total
    failed = [r for r in received if r.status == failure]
    assert len(failed) == len(received) - total
    bodies: dict[str, set[bytes]] = {}
    for r in received:
        bodies.setdefault(r.webhook_id or "", set()).add(r.body)
    assert all(len(b) == 1 for b in bodies.values()), "a retry sent a different body"

    rows = await notification_rows(ctx.db)
    log = await attempt_log(ctx.db)
    per_id = Counter(r.webhook_id for r in received)
    for nid in world.notification_ids:
        attempts = log[nid]
        assert len(attempts) == per_id[nid] == rows[nid]["attempts"], (nid, attempts, per_id[nid], rows[nid])
        assert [a for a, *_ in attempts] == list(range(1, len(attempts) + 1))
        *retried, last = attempts
        assert all((o, c) == ("retry", failure) and e and e.startswith(f"HTTP {failure}") for _a, o, c, e in retried)
        assert last[1:3] == ("delivered", 200)
    print(f"\n[webhook half-failing drill, HTTP {failure}] {total} notifications, {len(received)} requests "
          f"({len(failed)} failed), {passes} dispatch passes, max attempts {max(per_id.values())}, 0 duplicates")
