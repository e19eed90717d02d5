from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class SpaceState:
    scheduled = "scheduled"
    live = "live"
    ended = "ended"
    canceled = "canceled"


class Space(Base):
    """The last known version of an X Space; `revision` rises when its start time or state changes."""

    __tablename__ = "space"
    __table_args__ = (Index("ix_space_state_scheduled_start", "state", "scheduled_start"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    creator_id: Mapped[str] = mapped_column(String(20), index=True)
    title: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    scheduled_start: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    lang: Mapped[str | None] = mapped_column(String(16))
    host_ids: Mapped[list[str]]
    is_ticketed: Mapped[bool] = mapped_column(Boolean, default=False)
    x_updated_at: Mapped[datetime | None]
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    revision: Mapped[int] = mapped_column(Integer, default=1)


class Creator(Base):
    """X user id <-> username, as last resolved through X's user lookup."""

    __tablename__ = "creator"

    id: Mapped[str] = mapped_column(String(20), primary_key=True)
    username: Mapped[str] = mapped_column(String(15))
    username_lower: Mapped[str] = mapped_column(String(15), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    resolved_at: Mapped[datetime]


class SpaceEventKind:
    scheduled = "space.scheduled"
    rescheduled = "space.rescheduled"
    canceled = "space.canceled"
    started = "space.started"
    ended = "space.ended"

    all = (scheduled, rescheduled, canceled, started, ended)


class SpaceEvent(Base):
    """A change discovery noticed; the outbox fans it out to subscriptions, then stamps `fanned_out_at`."""

    __tablename__ = "space_event"
    __table_args__ = (UniqueConstraint("space_id", "kind", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    space_id: Mapped[str] = mapped_column(ForeignKey("space.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    revision: Mapped[int] = mapped_column(Integer)
    occurred_at: Mapped[datetime]
    previous_scheduled_start: Mapped[datetime | None]
    scheduled_start: Mapped[datetime | None]
    fanned_out_at: Mapped[datetime | None] = mapped_column(index=True)
