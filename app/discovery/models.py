from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class PollTarget(Base):
    """When each creator id or normalized keyword was last polled, for fair least-recently-polled rotation."""

    __tablename__ = "poll_target"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # creator / keyword
    value: Mapped[str] = mapped_column(String(512), primary_key=True)
    last_polled_at: Mapped[datetime | None] = mapped_column(index=True)


class XReadLedger(Base):
    """Resources read from X per UTC day: X bills each resource once a day, so this is the spend estimate."""

    __tablename__ = "x_read_ledger"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(16), primary_key=True)  # space / user
    resource_id: Mapped[str] = mapped_column(String(20), primary_key=True)
