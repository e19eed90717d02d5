"""The dispatcher against real receivers: retries, endpoint health, leases, races, SMTP outages, timers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core.context import AppContext
from app.core.db import Database
from app.delivery.dispatcher import Dispatcher
from app.delivery.email import SmtpSender
from app.delivery.models import DeliveryAttempt, Notification, WebhookEndpoint
from app.delivery.outbox import Completion, Reason, ReminderOutbox
from app.spaces.models import Space, SpaceEvent
from tests.conftest import make_settings
from tests.delivery.test_outbox import (  # noqa: F401  (fixtures)
    CREATOR,
    add_endpoint,
    add_space,
    add_subscription,
    change_space,
    dispatcher,
    hooked_account,
    receiver,
    rows,
    seed_account,
    smtp,
)
from tests.support.receivers import Reply, SmtpCapture, WebhookReceiver


async def attempts_of(ctx: AppContext, notification_id: str) -> list[DeliveryAttempt]:
    async with ctx.db.session() as session:
        stmt = select(DeliveryAttempt).where(DeliveryAttempt.notification_id == notification_id)
        return list(await session.scalars(stmt.order_by(DeliveryAttempt.id)))


async def endpoint_of(ctx: AppContext, endpoint_id: str) -> WebhookEndpoint:
    async with ctx.db.session() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        return endpoint


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait for a background task to reach a state (not for a due time: the clock is manual)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_500_then_200_is_one_delivery_with_one_webhook_id_and_two_attempts(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    receiver.respond_with([Reply(500, body="boom")])

    due = start - timedelta(minutes=15)
    report = await dispatcher.run_once(due)
    assert report.results["retry"] == 1
    [row] = await rows(ctx)
    assert row.state == "pending" and row.attempts == 1 and row.last_error == "HTTP 500 Internal Server Error"
    assert timedelta(seconds=4) <= row.next_attempt_at - due <= timedelta(seconds=6)
    assert (await dispatcher.run_once(row.next_attempt_at - timedelta(milliseconds=1))).claimed == 0

    assert (await dispatcher.run_once(row.next_attempt_at)).delivered == 1
    first, second = await receiver.wait_for(2)
    assert first.verified and second.verified
    assert first.webhook_id == second.webhook_id == row.id
    assert first.body == second.body
    assert second.timestamp is not None and first.timestamp is not None and second.timestamp > first.timestamp
    [done] = await rows(ctx)
    assert (done.state, done.attempts) == ("delivered", 2)
    log = await attempts_of(ctx, row.id)
    assert [(a.attempt, a.outcome, a.status_code) for a in log] == [(1, "retry", 500), (2, "delivered", 200)]
    assert log[0].response_excerpt == "boom" and log[0].error == "HTTP 500 Internal Server Error"
    assert all(a.latency_ms is not None and a.latency_ms >= 0 for a in log)


async def test_410_disables_the_endpoint_with_a_visible_reason(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    _account, sub = await hooked_account(ctx, receiver, lead_times=[30, 15])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    receiver.respond_with([410])

    await dispatcher.run_once(start - timedelta(minutes=30))
    endpoint = await endpoint_of(ctx, sub.webhook_endpoint_id or "")
    assert endpoint.enabled is False
    assert endpoint.disabled_reason is not None and "410" in endpoint.disabled_reason
    assert endpoint.disabled_at == start - timedelta(minutes=30)

    await dispatcher.run_once(start - timedelta(minutes=15))
    assert len(receiver.received) == 1  # the second reminder was not sent to a disabled endpoint
    first, second = await rows(ctx)
    assert first.state == second.state == "failed"
    assert "410" in (first.state_reason or "")
    assert (second.state_reason or "").startswith("webhook endpoint disabled: ") and "410" in second.state_reason
    assert second.attempts == 0


async def test_429_with_retry_after_throttles_the_endpoint(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    _account, sub = await hooked_account(ctx, receiver, lead_times=[15, 14])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    receiver.respond_with([Reply(429, retry_after=300)])

    first_due = start - timedelta(minutes=15)
    await dispatcher.run_once(first_due)
    endpoint = await endpoint_of(ctx, sub.webhook_endpoint_id or "")
    assert endpoint.throttled_until == first_due + timedelta(seconds=300)
    assert endpoint.failing_since == first_due

    # the next reminder falls inside the throttle window: it waits without spending an attempt
    await dispatcher.run_once(start - timedelta(minutes=14))
    assert len(receiver.received) == 1
    throttled = await rows(ctx)
    assert [(r.state, r.next_attempt_at) for r in throttled] == [
        ("pending", first_due + timedelta(seconds=300)),
        ("pending", first_due + timedelta(seconds=300)),
    ]
    assert [r.attempts for r in throttled] == [1, 0]

    assert (await dispatcher.run_once(first_due + timedelta(seconds=300))).delivered == 2
    await receiver.wait_for(3)
    endpoint = await endpoint_of(ctx, sub.webhook_endpoint_id or "")
    assert endpoint.throttled_until is None and endpoint.failing_since is None


async def test_rows_of_a_dead_worker_are_sent_after_the_lease_and_its_late_completion_is_refused(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    due = start - timedelta(minutes=15)
    outbox = ReminderOutbox()

    async with ctx.db.write() as session:  # worker A claims, then dies
        dead = await outbox.claim_due(session, due, 10, "worker-a")
    [claimed] = dead.rows
    assert claimed.attempts == 1
    [row] = await rows(ctx)
    assert (row.state, row.lease_owner, row.lease_expires_at) == ("sending", "worker-a", due + timedelta(seconds=60))

    assert (await dispatcher.run_once(due + timedelta(seconds=59))).claimed == 0
    assert receiver.received == []
    report = await dispatcher.run_once(due + timedelta(seconds=61))
    assert report.delivered == 1
    [hook] = await receiver.wait_for(1)
    assert hook.verified and hook.webhook_id == claimed.id
    [row] = await rows(ctx)
    assert (row.state, row.attempts, row.lease_token) == ("delivered", 2, None)

    async with ctx.db.write() as session:  # worker A wakes up and reports
        stale = Completion(claimed.id, dead.token, "failed", 1, "late report")
        assert await outbox.complete(session, stale, due + timedelta(seconds=90)) == 0
    assert (await rows(ctx))[0].state == "delivered"


async def test_two_dispatchers_racing_over_500_rows_send_each_once(ctx: AppContext, db_url: str) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    async with WebhookReceiver(check_timestamp=False) as receiver:
        await hooked_account(ctx, receiver, lead_times=[15], event_types=["space.reminder"])
        async with ctx.db.write() as session:
            for i in range(500):
                session.add(
                    Space(
                        id=f"1race{i:08d}", creator_id=CREATOR, title=f"race {i}", state="scheduled",
                        scheduled_start=start, host_ids=[CREATOR], first_seen_at=now, last_seen_at=now,
                        revision=1, is_ticketed=False,
                    )
                )
            await session.flush()
            for i in range(500):
                session.add(SpaceEvent(space_id=f"1race{i:08d}", kind="space.scheduled", revision=1, occurred_at=now))
        async with ctx.db.write() as session:
            assert await ReminderOutbox().fan_out_events(session, now, limit=1000) == 500

        workers = []
        for name in ("a", "b"):
            settings = make_settings(db_url, dispatcher_batch_size=25, dispatcher_concurrency=16)
            worker_ctx = AppContext(settings=settings, db=Database(db_url, pool_size=4), clock=ctx.clock)
            workers.append(Dispatcher(worker_ctx, outbox=ReminderOutbox(), owner=f"worker-{name}"))
        try:
            for worker in workers:
                await worker.__aenter__()
            due = start - timedelta(minutes=15)
            reports = await asyncio.gather(*(w.run_once(due) for w in workers))
        finally:
            for worker in workers:
                await worker.stop()
                await worker.ctx.db.dispose()
        assert sum(r.delivered for r in reports) == 500
        assert all(r.delivered > 0 for r in reports), [r.delivered for r in reports]
        got = await receiver.wait_for(500)
        assert len(got) == 500 and len({h.webhook_id for h in got}) == 500
        assert all(h.verified for h in got)
    assert {r.state for r in await rows(ctx)} == {"delivered"}
    assert {r.attempts for r in await rows(ctx)} == {1}


async def test_mail_arrives_once_smtp_comes_back(ctx: AppContext, smtp: SmtpCapture, dispatcher: Dispatcher) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    account = await seed_account(ctx)
    sub = await add_subscription(ctx, account, email="ada@example.com", lead_times=[15])
    async with ctx.db.write() as session:
        from app.delivery.models import EmailRecipient

        recipient = await session.get(EmailRecipient, sub.email_recipient_id)
        assert recipient is not None
        recipient.confirmed_at = now
    await add_space(ctx, start)
    await dispatcher.run_once(now)

    await smtp.stop()
    due = start - timedelta(minutes=15)
    assert (await dispatcher.run_once(due)).results["retry"] == 1
    [row] = await rows(ctx)
    assert row.state == "pending" and "SMTP connection failed" in (row.last_error or "")

    await smtp.start()
    assert (await dispatcher.run_once(row.next_attempt_at)).delivered == 1
    [message] = await smtp.wait_for(1)
    assert message["Message-ID"] == f"<{row.id}@spacebell.local>"
    assert [(a.attempt, a.outcome) for a in await attempts_of(ctx, row.id)] == [(1, "retry"), (2, "delivered")]


async def test_retries_stop_at_the_space_start_and_the_reminder_expires(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[1])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    receiver.default_reply = Reply(503)

    at = start - timedelta(minutes=1)
    for _ in range(20):
        await dispatcher.run_once(at)
        [row] = await rows(ctx)
        if row.state != "pending":
            break
        assert row.next_attempt_at < start
        at = row.next_attempt_at
    assert row.state == "expired"
    assert (row.state_reason or "").startswith(Reason.space_started) and "503" in (row.state_reason or "")
    assert all(h.webhook_id == row.id for h in receiver.received)


async def test_attempts_are_capped_by_max_attempts(
    ctx: AppContext, receiver: WebhookReceiver, smtp: SmtpCapture
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(days=2)
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    receiver.default_reply = Reply(500)
    outbox = ReminderOutbox(max_attempts=3)
    async with Dispatcher(ctx, outbox=outbox, smtp_sender=SmtpSender(smtp.host, smtp.port)) as d:
        at = start - timedelta(minutes=15)
        await d.run_once(now)
        for _ in range(3):
            await d.run_once(at)
            [row] = await rows(ctx)
            at = row.next_attempt_at
    assert (row.state, row.attempts) == ("failed", 3)
    assert row.state_reason == "gave up after 3 attempts: HTTP 500 Internal Server Error"
    assert len(receiver.received) == 3


async def test_an_endpoint_failing_for_too_long_is_disabled(
    ctx: AppContext, receiver: WebhookReceiver, smtp: SmtpCapture
) -> None:
    now = ctx.clock.now()
    await hooked_account(ctx, receiver, lead_times=[15], event_types=["space.reminder"])
    await add_space(ctx, now + timedelta(days=3))
    await add_space(ctx, now + timedelta(days=3, hours=2), space_id="1OwxWsecond00")
    receiver.default_reply = Reply(500)
    outbox = ReminderOutbox(disable_after=timedelta(hours=1), max_attempts=2)
    async with Dispatcher(ctx, outbox=outbox, smtp_sender=SmtpSender(smtp.host, smtp.port)) as d:
        await d.run_once(now)
        first_due = now + timedelta(days=3) - timedelta(minutes=15)
        await d.run_once(first_due)
        [row, _other] = await rows(ctx)
        await d.run_once(row.next_attempt_at)  # second and last attempt: failed, endpoint still young
        endpoint_id = row.webhook_endpoint_id or ""
        assert (await endpoint_of(ctx, endpoint_id)).enabled is True
        await d.run_once(first_due + timedelta(hours=2))  # the second Space's reminder fails after 2 h of failures
    endpoint = await endpoint_of(ctx, endpoint_id)
    assert endpoint.enabled is False
    assert endpoint.disabled_reason == "failing without a success for 1 hours"
    assert endpoint.failing_since == first_due


async def test_background_loop_claims_ahead_and_fires_at_the_due_time(
    ctx: AppContext, receiver: WebhookReceiver, smtp: SmtpCapture
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    due = start - timedelta(minutes=15)
    dispatcher = Dispatcher(ctx, outbox=ReminderOutbox(), smtp_sender=SmtpSender(smtp.host, smtp.port))
    await dispatcher.start()
    try:
        assert ctx.components["dispatcher"] is dispatcher
        assert dispatcher.readiness()["ready"] is True

        async def pending() -> bool:
            return [r.state for r in await rows(ctx)] == ["pending"]

        await eventually(pending)  # fanned out on start

        ctx.clock.set(due - timedelta(seconds=1))  # within the 2 s lookahead: claimed, not sent

        async def claimed() -> bool:
            return [r.state for r in await rows(ctx)] == ["sending"]

        await eventually(claimed)
        assert receiver.received == []

        ctx.clock.set(due)
        [hook] = await receiver.wait_for(1)
        assert hook.verified
        await dispatcher.settle()
        [row] = await rows(ctx)
        assert (row.state, row.delivered_at) == ("delivered", due)
    finally:
        await dispatcher.stop()
    assert "dispatcher" not in ctx.components


async def test_stopping_hands_back_rows_claimed_ahead(
    ctx: AppContext, receiver: WebhookReceiver, smtp: SmtpCapture
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    ctx.clock.set(start - timedelta(minutes=15, seconds=1))
    dispatcher = Dispatcher(ctx, outbox=ReminderOutbox(), smtp_sender=SmtpSender(smtp.host, smtp.port))
    await dispatcher.start()

    async def claimed() -> bool:
        return [r.state for r in await rows(ctx)] == ["sending"]

    await eventually(claimed)
    await dispatcher.stop()
    [row] = await rows(ctx)
    assert (row.state, row.attempts, row.lease_token) == ("pending", 0, None)
    assert receiver.received == []


@pytest.mark.parametrize("kind", ["space.started", "space.ended"])
async def test_space_event_notices_respect_endpoint_event_types(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher, kind: str
) -> None:
    now = ctx.clock.now()
    account = await seed_account(ctx)
    wants = await add_endpoint(ctx, account, receiver.url_for("/wants"), ["space.reminder", kind])
    refuses = await add_endpoint(ctx, account, receiver.url_for("/refuses"), ["space.reminder"])
    receiver.secrets = {"/wants": wants.secret, "/refuses": refuses.secret}
    for endpoint in (wants, refuses):
        await add_subscription(ctx, account, webhook_endpoint_id=endpoint.id, event_types=["space.reminder", kind])
    await add_space(ctx, now + timedelta(minutes=30))
    await dispatcher.fan_out(now)
    await change_space(ctx, kind, state="live")
    await dispatcher.run_once(now)
    [hook] = await receiver.wait_for(1)
    assert hook.path == "/wants" and hook.verified and hook.json["type"] == kind
    assert {(r.kind, r.state) for r in await rows(ctx, kind=kind)} == {(kind, "delivered")}
    assert {r.state for r in await rows(ctx, kind="space.reminder")} == {"expired"}
    async with ctx.db.session() as session:
        stmt = select(Notification.id).where(Notification.webhook_endpoint_id == refuses.id, Notification.kind == kind)
        assert await session.scalar(stmt) is None


async def test_discovery_hook_fans_out_without_a_local_dispatcher(ctx: AppContext, receiver: WebhookReceiver) -> None:
    from app.delivery.dispatcher import fan_out_hook

    now = ctx.clock.now()
    await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, now + timedelta(hours=1))
    await fan_out_hook(ctx)(now)
    assert [(r.kind, r.state) for r in await rows(ctx)] == [("space.reminder", "pending")]
    async with ctx.db.session() as session:
        assert (await session.scalars(select(SpaceEvent.fanned_out_at))).all() == [now]


async def test_a_kind_the_endpoint_stopped_accepting_is_canceled_not_sent(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    _account, sub = await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    async with ctx.db.write() as session:
        endpoint = await session.get(WebhookEndpoint, sub.webhook_endpoint_id)
        assert endpoint is not None
        endpoint.event_types = ["space.canceled"]
    await dispatcher.run_once(start - timedelta(minutes=15))
    [row] = await rows(ctx)
    assert (row.state, row.state_reason) == ("canceled", "the webhook endpoint no longer accepts space.reminder")
    assert receiver.received == []
