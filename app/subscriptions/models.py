from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class TargetKind:
    creator = "creator"
    keyword = "keyword"


class TargetStatus:
    active = "active"  # creator id known, or a keyword
    resolving = "resolving"  # @username given, not yet looked up
    unknown_username = "unknown_username"
    suspended = "suspended"


class Subscription(Base):
    __tablename__ = "subscription"
    __table_args__ = (
        Index("ix_subscription_account_id_id", "account_id", "id"),
        Index("ix_subscription_keyword_normalized", "keyword_normalized"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    target_kind: Mapped[str] = mapped_column(String(16))
    creator_id: Mapped[str | None] = mapped_column(String(20), index=True)
    creator_username: Mapped[str | None] = mapped_column(String(15))
    keyword: Mapped[str | None] = mapped_column(String(512))
    keyword_normalized: Mapped[str | None] = mapped_column(String(512))
    include_hosts: Mapped[bool] = mapped_column(Boolean, default=False)
    target_status: Mapped[str] = mapped_column(String(32))
    target_status_detail: Mapped[str | None] = mapped_column(String(300))
    webhook_endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoint.id", ondelete="CASCADE"), index=True
    )
    email_recipient_id: Mapped[str | None] = mapped_column(
        ForeignKey("email_recipient.id", ondelete="CASCADE"), index=True
    )
    lead_times: Mapped[list[int]]
    event_types: Mapped[list[str]]
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # The email recipient unsubscribed from this subscription: it stays paused until they confirm again.
    unsubscribed_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
