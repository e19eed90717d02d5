"""The leader lease: one row per singleton role, taken or renewed by a single conditional upsert.

`INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE owner = me OR expired RETURNING owner` is atomic on
both databases: PostgreSQL locks the conflicting row and re-checks the WHERE against its latest version,
SQLite runs it inside BEGIN IMMEDIATE. Whoever gets a row back holds the lease.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.models import LeaderLease

DISCOVERY_LEASE = "discovery"


def dialect_insert(session: AsyncSession, table: Any) -> Any:
    """`insert()` of the session's dialect, which has on_conflict_do_nothing/do_update on both."""
    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(table)


async def acquire_lease(session: AsyncSession, name: str, owner: str, now: datetime, seconds: float) -> bool:
    """Take the lease if it is free or expired, renew it if `owner` holds it. True when `owner` holds it."""
    expires_at = now + timedelta(seconds=seconds)
    stmt = dialect_insert(session, LeaderLease).values(name=name, owner=owner, expires_at=expires_at, acquired_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[LeaderLease.name],
        set_={
            "owner": stmt.excluded.owner,
            "expires_at": stmt.excluded.expires_at,
            "acquired_at": case(
                (LeaderLease.owner == stmt.excluded.owner, LeaderLease.acquired_at), else_=stmt.excluded.acquired_at
            ),
        },
        where=(LeaderLease.owner == stmt.excluded.owner) | (LeaderLease.expires_at <= now),
    ).returning(LeaderLease.owner)
    return (await session.execute(stmt)).scalar_one_or_none() == owner


async def hold_lease(session: AsyncSession, name: str, owner: str, now: datetime, seconds: float) -> bool:
    """Renew a lease `owner` still holds (not expired). On PostgreSQL the row stays locked until commit,
    so a write transaction that starts with this is fenced against a new leader's writes."""
    result = await session.execute(
        update(LeaderLease)
        .where(LeaderLease.name == name, LeaderLease.owner == owner, LeaderLease.expires_at > now)
        .values(expires_at=now + timedelta(seconds=seconds))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


async def release_lease(session: AsyncSession, name: str, owner: str) -> None:
    await session.execute(delete(LeaderLease).where(LeaderLease.name == name, LeaderLease.owner == owner))
