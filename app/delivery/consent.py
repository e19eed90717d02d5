"""Double opt-in and unsubscribes: who may be mailed, decided by the address owner, never by the API client."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.ids import new_id
from app.core.settings import Settings
from app.delivery.links import LinkClaim, sign_link
from app.delivery.models import EmailRecipient, Notification, NotificationKind, NotificationState
from app.delivery.outbox import ReminderOutbox
from app.subscriptions.models import Subscription

ALL = "all"


def confirm_url(settings: Settings, key: bytes, recipient_id: str) -> str:
    return f"{settings.public_base_url}/v1/email/confirm/{sign_link(key, LinkClaim('confirm', recipient_id, ALL))}"


async def request_confirmation(
    session: AsyncSession, recipient: EmailRecipient, now: datetime, settings: Settings, key: bytes
) -> str:
    """Queue one confirmation mail unless the address needs none or the rate limits say not now.

    Returns what happened: "queued", "confirmed", "unsubscribed", "pending", "address_rate_limited",
    "account_rate_limited". The mail carries only our fixed text and the link.
    """
    if recipient.confirmed_at is not None and recipient.unsubscribed_at is None:
        return "confirmed"
    if recipient.unsubscribed_at is not None:
        # They said stop: a new subscription does not get to mail them again, not even to ask.
        return "unsubscribed"
    confirmations = select(func.count()).where(Notification.kind == NotificationKind.confirmation)
    in_flight = await session.scalar(
        confirmations.where(
            Notification.email_recipient_id == recipient.id,
            Notification.state.in_([NotificationState.pending, NotificationState.sending]),
        )
    )
    if in_flight:
        return "pending"
    per_address = await session.scalar(
        confirmations.where(
            Notification.email_recipient_id == recipient.id, Notification.created_at > now - timedelta(days=1)
        )
    )
    if (per_address or 0) >= settings.email_confirmations_per_address_per_day:
        return "address_rate_limited"
    per_account = await session.scalar(
        confirmations.where(
            Notification.account_id == recipient.account_id, Notification.created_at > now - timedelta(hours=1)
        )
    )
    if (per_account or 0) >= settings.email_confirmations_per_account_per_hour:
        return "account_rate_limited"
    session.add(
        Notification(
            id=new_id("ntf"), account_id=recipient.account_id, kind=NotificationKind.confirmation, channel="email",
            email_recipient_id=recipient.id, payload={"confirm_url": confirm_url(settings, key, recipient.id)},
            state=NotificationState.pending, due_at=now, next_attempt_at=now,
            expires_at=now + timedelta(hours=settings.email_confirmation_deadline_hours),
            lead_time_minutes=0, space_revision=0, attempts=0, late=False, created_at=now, updated_at=now,
        )
    )
    recipient.confirmation_sent_at = now
    await session.flush()
    return "queued"


async def confirm_address(session: AsyncSession, recipient: EmailRecipient, outbox: ReminderOutbox, now: datetime) -> None:
    """The owner pressed Confirm: held mail goes out, and subscriptions they had left resume."""
    recipient.confirmed_at = recipient.confirmed_at if recipient.unsubscribed_at is None and recipient.confirmed_at else now
    recipient.unsubscribed_at = None
    resumed = list(
        await session.scalars(
            select(Subscription).where(
                Subscription.email_recipient_id == recipient.id, Subscription.unsubscribed_at.is_not(None)
            )
        )
    )
    for sub in resumed:
        sub.unsubscribed_at = None
        sub.paused = False
        sub.updated_at = now
    await session.flush()
    for sub in resumed:
        await outbox.plan_subscription(session, sub, now)
    await outbox.release_held_for_recipient(session, recipient.id, now)


async def unsubscribe(
    session: AsyncSession, recipient: EmailRecipient, scope: str, outbox: ReminderOutbox, now: datetime
) -> None:
    """Effective at once: from one subscription, or from everything this account sends to the address."""
    if scope == ALL:
        recipient.unsubscribed_at = now
        await outbox.cancel_for_recipient(session, recipient.id, now)
        return
    await session.execute(
        update(Subscription)
        .where(Subscription.id == scope, Subscription.email_recipient_id == recipient.id)
        .values(unsubscribed_at=now, paused=True, updated_at=now)
    )
    await outbox.cancel_subscription(session, scope, now, "the recipient unsubscribed")
