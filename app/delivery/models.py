from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoint"
    __table_args__ = (Index("ix_webhook_endpoint_account_id_id", "account_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(100))
    event_types: Mapped[list[str]]
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(300))
    disabled_at: Mapped[datetime | None]
    failing_since: Mapped[datetime | None]
    throttled_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class EmailRecipient(Base):
    """An address one account mails; reminders go only to confirmed, not unsubscribed addresses."""

    __tablename__ = "email_recipient"
    __table_args__ = (UniqueConstraint("account_id", "address"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    timezone: Mapped[str | None] = mapped_column(String(64))
    confirmed_at: Mapped[datetime | None]
    unsubscribed_at: Mapped[datetime | None]
    confirmation_sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class NotificationKind:
    reminder = "space.reminder"
    # Notices: one per Space event a subscription asked for, due when the event is fanned out.
    scheduled = "space.scheduled"
    rescheduled = "space.rescheduled"
    canceled = "space.canceled"
    started = "space.started"
    ended = "space.ended"
    confirmation = "email.confirmation"


class NotificationState:
    pending = "pending"  # waiting for next_attempt_at (due_at, or a retry)
    sending = "sending"  # claimed under a lease
    held = "held"  # waiting for the email address to be confirmed; next_attempt_at is the hold deadline
    delivered = "delivered"
    failed = "failed"
    expired = "expired"
    canceled = "canceled"

    terminal = (delivered, failed, expired, canceled)


def _partial_index(name: str, column: str, *, state: str) -> Index:
    where = text(f"state = '{state}'")
    return Index(name, column, postgresql_where=where, sqlite_where=where)


class Notification(Base):
    """The outbox: one row per message to deliver, unique per (subscription, Space, kind, lead, revision)."""

    __tablename__ = "notification"
    __table_args__ = (
        UniqueConstraint("subscription_id", "space_id", "kind", "lead_time_minutes", "space_revision"),
        # The queue indexes hold only rows in one state, so they stay small while finished rows pile
        # up, and a state change touches few index entries (the outbox's write amplification).
        _partial_index("ix_notification_due", "next_attempt_at", state="pending"),
        _partial_index("ix_notification_lease", "lease_expires_at", state="sending"),
        _partial_index("ix_notification_hold", "next_attempt_at", state="held"),
        Index("ix_notification_account_id_id", "account_id", "id"),
        Index("ix_notification_space_id_kind", "space_id", "kind"),
        Index("ix_notification_email_recipient_id", "email_recipient_id"),
        Index("ix_notification_webhook_endpoint_id", "webhook_endpoint_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    # A deleted subscription leaves its notifications behind (canceled), so their history stays readable.
    subscription_id: Mapped[str | None] = mapped_column(ForeignKey("subscription.id", ondelete="SET NULL"))
    space_id: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32))
    lead_time_minutes: Mapped[int] = mapped_column(Integer, default=0)
    space_revision: Mapped[int] = mapped_column(Integer, default=0)
    channel: Mapped[str] = mapped_column(String(16))
    webhook_endpoint_id: Mapped[str | None] = mapped_column(ForeignKey("webhook_endpoint.id", ondelete="CASCADE"))
    email_recipient_id: Mapped[str | None] = mapped_column(ForeignKey("email_recipient.id", ondelete="CASCADE"))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str | None] = mapped_column(String(300))
    due_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_token: Mapped[str | None] = mapped_column(String(40))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notification_id: Mapped[str] = mapped_column(ForeignKey("notification.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    latency_ms: Mapped[float | None]
    outcome: Mapped[str] = mapped_column(String(16))  # delivered / retry / failed
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
