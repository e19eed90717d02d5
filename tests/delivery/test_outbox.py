"""Outbox rules end to end: Space rows and events written with the ORM, a ManualClock moved by the test,
`Dispatcher.run_once(now)` delivering to a real webhook receiver that verifies every signature."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.accounts.service import create_account
from app.core.context import AppContext
from app.core.events import ALL_EVENT_TYPES
from app.core.ids import new_id
from app.delivery.dispatcher import Dispatcher
from app.delivery.email import SmtpSender
from app.delivery.models import EmailRecipient, Notification, WebhookEndpoint
from app.delivery.outbox import Reason, ReminderOutbox
from app.delivery.service import new_webhook_secret
from app.spaces.models import Creator, Space, SpaceEvent
from app.subscriptions.models import Subscription
from app.subscriptions.schemas import SubscriptionCreate, SubscriptionUpdate
from app.subscriptions.service import apply_update, create_subscription
from tests.support.receivers import SmtpCapture, WebhookReceiver

CREATOR = "2244994945"
SPACE = "1OwxWzzzzzzzz"

# ---------------------------------------------------------------------------------------------
# Helpers shared by the delivery tests


async def seed_account(ctx: AppContext, name: str = "acme") -> str:
    async with ctx.db.write() as session:
        return (await create_account(session, name, ctx.clock.now())).account_id


async def add_endpoint(
    ctx: AppContext, account_id: str, url: str, event_types: list[str] | None = None, secret: str | None = None
) -> WebhookEndpoint:
    now = ctx.clock.now()
    endpoint = WebhookEndpoint(
        id=new_id("we"), account_id=account_id, url=url,
        secret=secret or new_webhook_secret(), event_types=event_types or list(ALL_EVENT_TYPES), enabled=True,
        created_at=now, updated_at=now,
    )
    async with ctx.db.write() as session:
        session.add(endpoint)
    return endpoint


async def add_subscription(ctx: AppContext, account_id: str, **fields: Any) -> Subscription:
    if not {"keyword", "creator_username"} & fields.keys():
        fields.setdefault("creator_id", CREATOR)
    async with ctx.db.write() as session:
        return await create_subscription(
            session, account_id, SubscriptionCreate(**fields), ctx.clock.now(), 1000, ReminderOutbox()
        )


async def update_subscription(ctx: AppContext, sub_id: str, **fields: Any) -> None:
    async with ctx.db.write() as session:
        sub = await session.get(Subscription, sub_id)
        assert sub is not None
        apply_update(sub, SubscriptionUpdate(**fields), ctx.clock.now())
        await session.flush()
        await ReminderOutbox().plan_subscription(session, sub, ctx.clock.now())


async def add_space(
    ctx: AppContext,
    start: datetime,
    *,
    space_id: str = SPACE,
    creator_id: str = CREATOR,
    title: str = "Weekly Python hangout",
    username: str | None = "XDevelopers",
    event: bool = True,
) -> None:
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        if username and await session.get(Creator, creator_id) is None:
            session.add(Creator(id=creator_id, username=username, username_lower=username.lower(), resolved_at=now))
        session.add(
            Space(
                id=space_id, creator_id=creator_id, title=title, state="scheduled", scheduled_start=start,
                host_ids=[creator_id], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False,
            )
        )
        if event:
            await session.flush()
            session.add(
                SpaceEvent(
                    space_id=space_id, kind="space.scheduled", revision=1, occurred_at=now, scheduled_start=start
                )
            )


async def change_space(
    ctx: AppContext, kind: str, *, space_id: str = SPACE, start: datetime | None = None, state: str | None = None
) -> None:
    """What discovery writes: the Space row with a higher revision, and one event for the change."""
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        space = await session.get(Space, space_id)
        assert space is not None
        previous = space.scheduled_start
        space.revision += 1
        if start is not None:
            space.scheduled_start = start
        if state is not None:
            space.state = state
        if state == "live":
            space.started_at = now
        session.add(
            SpaceEvent(
                space_id=space_id, kind=kind, revision=space.revision, occurred_at=now,
                previous_scheduled_start=previous if start is not None else None,
                scheduled_start=space.scheduled_start,
            )
        )


async def rows(ctx: AppContext, **where: Any) -> list[Notification]:
    async with ctx.db.session() as session:
        stmt = select(Notification).order_by(Notification.due_at, Notification.kind, Notification.id)
        for name, value in where.items():
            stmt = stmt.where(getattr(Notification, name) == value)
        return list(await session.scalars(stmt))


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    # check_timestamp=False: the sender's clock is a ManualClock far from the wall clock.
    async with WebhookReceiver(check_timestamp=False) as r:
        yield r


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpCapture]:
    async with SmtpCapture() as capture:
        yield capture


@pytest.fixture
async def dispatcher(ctx: AppContext, smtp: SmtpCapture) -> AsyncIterator[Dispatcher]:
    sender = SmtpSender(smtp.host, smtp.port, timeout=5)
    async with Dispatcher(ctx, outbox=ReminderOutbox(), smtp_sender=sender) as d:
        yield d


async def hooked_account(ctx: AppContext, receiver: WebhookReceiver, **sub_fields: Any) -> tuple[str, Subscription]:
    account = await seed_account(ctx)
    endpoint = await add_endpoint(ctx, account, receiver.url)
    receiver.secret = endpoint.secret
    sub = await add_subscription(ctx, account, webhook_endpoint_id=endpoint.id, **sub_fields)
    return account, sub


# ---------------------------------------------------------------------------------------------
# Tests


async def test_reminder_fires_at_its_lead_time_and_not_a_second_before(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    _account, sub = await hooked_account(ctx, receiver, lead_times=[15])
    await add_space(ctx, start)

    report = await dispatcher.run_once(now)
    assert report.fanned_out == 1 and report.claimed == 0
    [reminder] = await rows(ctx)
    due = start - timedelta(minutes=15)
    assert (reminder.kind, reminder.state, reminder.due_at) == ("space.reminder", "pending", due)

    assert (await dispatcher.run_once(reminder.due_at - timedelta(seconds=1))).claimed == 0
    assert receiver.received == []

    report = await dispatcher.run_once(reminder.due_at)
    assert report.delivered == 1
    [hook] = await receiver.wait_for(1)
    assert hook.verified, hook.verify_error
    assert hook.webhook_id == reminder.id
    assert hook.json["type"] == "space.reminder"
    assert hook.json["data"] == {
        "space": {
            "id": SPACE, "title": "Weekly Python hangout", "state": "scheduled",
            "scheduled_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "creator_id": CREATOR,
            "creator_username": "XDevelopers", "url": f"https://x.com/i/spaces/{SPACE}",
        },
        "subscription_id": sub.id,
        "lead_time_minutes": 15,
    }
    [done] = await rows(ctx)
    assert (done.state, done.late, done.attempts, done.delivered_at) == ("delivered", False, 1, reminder.due_at)
    assert done.state_reason == "delivered"

    assert (await dispatcher.run_once(reminder.due_at + timedelta(minutes=1))).claimed == 0
    assert len(receiver.received) == 1


async def test_fan_out_twice_is_harmless(ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher) -> None:
    now = ctx.clock.now()
    await hooked_account(ctx, receiver, lead_times=[60, 15], event_types=["space.reminder", "space.scheduled"])
    await add_space(ctx, now + timedelta(hours=3))
    await dispatcher.fan_out(now)
    first = [(r.kind, r.lead_time_minutes) for r in await rows(ctx)]
    assert sorted(first) == [("space.reminder", 15), ("space.reminder", 60), ("space.scheduled", 0)]
    async with ctx.db.write() as session:
        await session.execute(update(SpaceEvent).values(fanned_out_at=None))
    assert await dispatcher.fan_out(now) == 1
    assert sorted((r.kind, r.lead_time_minutes) for r in await rows(ctx)) == sorted(first)


async def test_reschedule_moves_the_pending_reminder(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    await hooked_account(ctx, receiver, lead_times=[15], event_types=["space.reminder"])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    [before] = await rows(ctx)

    later = start + timedelta(hours=1)
    await change_space(ctx, "space.rescheduled", start=later)
    await dispatcher.run_once(now)
    [moved] = await rows(ctx)
    assert moved.id == before.id
    assert (moved.due_at, moved.next_attempt_at, moved.space_revision) == (
        later - timedelta(minutes=15), later - timedelta(minutes=15), 2,
    )
    assert (await dispatcher.run_once(before.due_at)).claimed == 0
    assert (await dispatcher.run_once(moved.due_at)).delivered == 1
    [hook] = await receiver.wait_for(1)
    assert hook.verified and hook.json["data"]["space"]["scheduled_start"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_cancel_stops_reminders_and_tells_those_who_asked(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    account, asks = await hooked_account(ctx, receiver, lead_times=[15])  # default types include canceled
    endpoint_id = asks.webhook_endpoint_id
    quiet = await add_subscription(ctx, account, webhook_endpoint_id=endpoint_id, event_types=["space.reminder"])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    assert {r.state for r in await rows(ctx)} == {"pending"}

    await change_space(ctx, "space.canceled", state="canceled")
    report = await dispatcher.run_once(now + timedelta(minutes=1))
    assert report.delivered == 1
    [notice] = await receiver.wait_for(1)
    assert notice.verified and notice.json["type"] == "space.canceled"
    assert notice.json["data"]["subscription_id"] == asks.id
    assert notice.json["data"]["space"]["state"] == "canceled"

    reminders = await rows(ctx, kind="space.reminder")
    assert {(r.subscription_id, r.state, r.state_reason) for r in reminders} == {
        (asks.id, "canceled", Reason.space_canceled), (quiet.id, "canceled", Reason.space_canceled),
    }
    assert (await dispatcher.run_once(start - timedelta(minutes=15))).claimed == 0
    assert len(receiver.received) == 1


async def test_delivered_then_rescheduled_sends_a_rescheduled_notice(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[15], event_types=["space.reminder"])
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    due = start - timedelta(minutes=15)
    assert (await dispatcher.run_once(due)).delivered == 1

    ctx.clock.set(due + timedelta(minutes=5))
    later = start + timedelta(hours=2)
    await change_space(ctx, "space.rescheduled", start=later)
    report = await dispatcher.run_once(ctx.clock.now())
    assert report.delivered == 1
    first, notice = await receiver.wait_for(2)
    assert notice.verified and notice.json["type"] == "space.rescheduled"
    assert notice.json["data"]["previous_scheduled_start"].startswith(start.strftime("%Y-%m-%dT%H:%M:%S"))
    assert notice.json["data"]["space"]["scheduled_start"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert notice.webhook_id != first.webhook_id

    # and a fresh reminder for the new time
    assert (await dispatcher.run_once(later - timedelta(minutes=15))).delivered == 1
    third = (await receiver.wait_for(3))[2]
    assert third.json["type"] == "space.reminder" and third.webhook_id not in (first.webhook_id, notice.webhook_id)


async def test_reminder_missed_while_down_is_sent_late_if_the_space_has_not_started(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await hooked_account(ctx, receiver, lead_times=[30])
    await add_space(ctx, start)
    await dispatcher.run_once(now)

    back = start - timedelta(minutes=10)  # twenty minutes after the due time
    assert (await dispatcher.run_once(back)).delivered == 1
    [hook] = await receiver.wait_for(1)
    assert hook.verified
    [row] = await rows(ctx)
    assert (row.state, row.late, row.delivered_at) == ("delivered", True, back)
    assert row.state_reason == "delivered late, 1200s after its due time"


async def test_reminder_of_a_started_space_expires(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    await hooked_account(ctx, receiver, lead_times=[30], event_types=["space.reminder"])
    await add_space(ctx, now + timedelta(hours=1))
    await add_space(ctx, now + timedelta(hours=1), space_id="1OwxWsssssss1")
    await dispatcher.run_once(now)
    assert len(await rows(ctx, state="pending")) == 2

    # One start was seen by discovery (an event), the other was missed while we were down.
    ctx.clock.set(now + timedelta(hours=1, minutes=5))
    await change_space(ctx, "space.started", state="live")
    await dispatcher.run_once(ctx.clock.now())
    assert receiver.received == []
    assert {(r.space_id, r.state, r.state_reason) for r in await rows(ctx)} == {
        (SPACE, "expired", Reason.space_started), ("1OwxWsssssss1", "expired", Reason.space_started),
    }


async def test_new_subscription_is_matched_at_once_against_stored_spaces(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    await add_space(ctx, start)
    await dispatcher.fan_out(now)  # nobody subscribed yet
    assert await rows(ctx) == []

    _account, sub = await hooked_account(ctx, receiver, keyword="python", lead_times=[60, 10])
    got = sorted((r.lead_time_minutes, r.state, r.due_at) for r in await rows(ctx, subscription_id=sub.id))
    assert got == [(10, "pending", start - timedelta(minutes=10)), (60, "pending", start - timedelta(minutes=60))]


async def test_subscription_created_after_some_lead_times_passed_gets_one_late_reminder(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    await add_space(ctx, now + timedelta(minutes=8))
    _account, sub = await hooked_account(ctx, receiver, lead_times=[60, 30, 15, 5])
    got = sorted((r.lead_time_minutes, r.due_at - now) for r in await rows(ctx, subscription_id=sub.id))
    # 60, 30 and 15 minutes before are gone: only the nearest of them is sent (now), plus 5 later.
    assert got == [(5, timedelta(minutes=3)), (15, timedelta(minutes=-7))]
    assert (await dispatcher.run_once(now)).delivered == 1
    [hook] = await receiver.wait_for(1)
    assert hook.json["data"]["lead_time_minutes"] == 15


async def test_pause_unpause_and_lead_time_changes_adjust_pending_rows(
    ctx: AppContext, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=3)
    await add_space(ctx, start)
    _account, sub = await hooked_account(ctx, receiver, lead_times=[60, 15])
    assert len(await rows(ctx, state="pending")) == 2

    await update_subscription(ctx, sub.id, paused=True)
    assert {(r.state, r.state_reason) for r in await rows(ctx)} == {("canceled", Reason.paused)}
    assert (await dispatcher.run_once(start - timedelta(minutes=15))).claimed == 0

    await update_subscription(ctx, sub.id, paused=False)
    revived = await rows(ctx)
    assert [(r.lead_time_minutes, r.state) for r in revived] == [(60, "pending"), (15, "pending")]

    await update_subscription(ctx, sub.id, lead_times=[30, 15])
    got = {(r.lead_time_minutes, r.state, r.state_reason) for r in await rows(ctx)}
    assert got == {(60, "canceled", Reason.lead_removed), (30, "pending", None), (15, "pending", None)}

    # a paused subscription gets nothing from new Spaces either
    await update_subscription(ctx, sub.id, paused=True)
    await add_space(ctx, start, space_id="1OwxWsssssss2")
    await dispatcher.run_once(now)
    assert await rows(ctx, space_id="1OwxWsssssss2") == []


async def test_deleting_a_subscription_cancels_its_rows_and_keeps_their_history(
    ctx: AppContext, receiver: WebhookReceiver
) -> None:
    now = ctx.clock.now()
    await add_space(ctx, now + timedelta(hours=3))
    _account, sub = await hooked_account(ctx, receiver, lead_times=[15])
    async with ctx.db.write() as session:
        await ReminderOutbox().cancel_subscription(session, sub.id, now, Reason.deleted)
        await session.delete(await session.get(Subscription, sub.id))
    [row] = await rows(ctx)
    assert (row.state, row.state_reason, row.subscription_id) == ("canceled", Reason.deleted, None)


async def _email_account(ctx: AppContext, *, confirmed: bool, unsubscribed: bool = False) -> tuple[str, Subscription]:
    account = await seed_account(ctx)
    sub = await add_subscription(ctx, account, email="ada@example.com", lead_times=[15])
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        recipient = await session.get(EmailRecipient, sub.email_recipient_id)
        assert recipient is not None
        recipient.confirmed_at = now if confirmed else None
        recipient.unsubscribed_at = now if unsubscribed else None
    return account, sub


async def test_unconfirmed_email_is_held_not_sent_until_released(
    ctx: AppContext, smtp: SmtpCapture, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    _account, sub = await _email_account(ctx, confirmed=False)
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    [held] = await rows(ctx)
    assert (held.state, held.state_reason, held.channel) == ("held", Reason.unconfirmed, "email")

    due = start - timedelta(minutes=15)
    assert (await dispatcher.run_once(due)).claimed == 0
    assert smtp.messages == []

    async with ctx.db.write() as session:
        recipient = await session.get(EmailRecipient, sub.email_recipient_id)
        assert recipient is not None
        recipient.confirmed_at = due
        assert await ReminderOutbox().release_held_for_recipient(session, recipient.id, due) == 1
    assert (await dispatcher.run_once(due)).delivered == 1
    [message] = await smtp.wait_for(1)
    assert message["To"] == "ada@example.com"
    assert message["Message-ID"] == f"<{held.id}@spacebell.local>"
    assert "Weekly Python hangout" in message["Subject"]
    assert message["List-Unsubscribe"].startswith("<https://spacebell.test/v1/email/unsubscribe/")


async def test_held_email_expires_after_the_confirmation_deadline(
    ctx: AppContext, smtp: SmtpCapture, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    await _email_account(ctx, confirmed=False)
    await add_space(ctx, now + timedelta(days=10))
    await dispatcher.run_once(now)
    [held] = await rows(ctx)
    assert held.next_attempt_at == now + timedelta(hours=72)
    await dispatcher.run_once(now + timedelta(hours=71))
    assert (await rows(ctx))[0].state == "held"
    await dispatcher.run_once(now + timedelta(hours=72))
    [expired] = await rows(ctx)
    assert (expired.state, expired.state_reason) == ("expired", "email address not confirmed")
    assert smtp.messages == []


async def test_held_email_expires_when_the_space_starts(ctx: AppContext, dispatcher: Dispatcher) -> None:
    now = ctx.clock.now()
    await _email_account(ctx, confirmed=False)
    await add_space(ctx, now + timedelta(hours=1))
    await dispatcher.run_once(now)
    ctx.clock.set(now + timedelta(hours=1))
    await change_space(ctx, "space.started", state="live")
    await dispatcher.run_once(ctx.clock.now())
    [expired] = await rows(ctx)
    assert (expired.state, expired.state_reason) == ("expired", "email address not confirmed")


async def test_unsubscribed_recipient_gets_nothing(ctx: AppContext, dispatcher: Dispatcher) -> None:
    now = ctx.clock.now()
    await _email_account(ctx, confirmed=True, unsubscribed=True)
    await add_space(ctx, now + timedelta(hours=1))
    await dispatcher.run_once(now)
    assert await rows(ctx) == []


async def test_confirmed_email_reminder_is_mailed(ctx: AppContext, smtp: SmtpCapture, dispatcher: Dispatcher) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await _email_account(ctx, confirmed=True)
    await add_space(ctx, start)
    await dispatcher.run_once(now)
    assert (await dispatcher.run_once(start - timedelta(minutes=15))).delivered == 1
    [message] = await smtp.wait_for(1)
    text = message.get_body(("plain",)).get_content()
    assert "Weekly Python hangout" in text and "@XDevelopers" in text
    assert f"https://x.com/i/spaces/{SPACE}" in text


def test_prebuilt_webhook_body_matches_build_webhook_body() -> None:
    from datetime import UTC

    from app.delivery.outbox import (
        ClaimedRow,
        SpaceFacts,
        space_json_of,
        webhook_body,
        webhook_body_head,
        webhook_data,
    )
    from app.delivery.webhooks import build_webhook_body

    space = SpaceFacts(
        SPACE, 'Ünïcode "quoted" 🚀 title', "scheduled", datetime(2026, 3, 2, 13, 0, 0, 250000, tzinfo=UTC),
        None, CREATOR, None,
    )
    due = datetime(2026, 3, 2, 12, 45, tzinfo=UTC)
    for kind, payload in [
        ("space.reminder", None),
        ("space.reminder", {"note": "x"}),
        ("space.canceled", None),
        ("space.rescheduled", {"previous_scheduled_start": "2026-03-02T12:00:00+00:00"}),
    ]:
        row = ClaimedRow(
            "ntf_x", "acc", "sub_x", SPACE, kind, "webhook", "we_x", None, 15, 2, payload, due, due, None, 1, "tok"
        )
        expected = build_webhook_body(kind, due, webhook_data(row, space.data()))
        assert webhook_body(row, webhook_body_head(kind, due, space_json_of(space))) == expected
