"""What discovery keeps in the database besides Spaces: why polling is stopped, its own X call log, and
the pay-per-use ledger. Every process reads them, so every process's /readyz tells the same story."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.clock import utc
from app.core.models import ServiceState
from app.core.settings import Settings
from app.discovery.lease import dialect_insert
from app.discovery.models import XReadLedger
from app.discovery.planner import billing_day, estimated_spend
from app.x.client import RateLimit

STOP_KEY = "x_polling_stopped"
CALLS_KEY = "discovery_x_calls"

SPEND_CAP_REASON = "daily-spend-cap"
# Reasons that need someone to act (buy credits, fix the token, wait for the cap): the service is not ready.
NOT_READY_REASONS = ("usage-capped", "credits", "payment-required", "unauthorized", "forbidden")


@dataclass(frozen=True)
class PollingStop:
    reason: str
    detail: str
    since: datetime
    resume_at: datetime
    status: int | None = None
    period: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat()
        data["resume_at"] = self.resume_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PollingStop | None:
        if not data or not data.get("reason"):
            return None
        return cls(
            reason=str(data["reason"]),
            detail=str(data.get("detail") or ""),
            since=utc(datetime.fromisoformat(data["since"])),
            resume_at=utc(datetime.fromisoformat(data["resume_at"])),
            status=data.get("status"),
            period=data.get("period"),
        )

    @property
    def blocks_readiness(self) -> bool:
        return self.reason in NOT_READY_REASONS


async def _put(session: AsyncSession, key: str, value: dict[str, Any], now: datetime) -> None:
    stmt = dialect_insert(session, ServiceState).values(key=key, value=value, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ServiceState.key], set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at}
    )
    await session.execute(stmt)


async def _get(session: AsyncSession, key: str) -> dict[str, Any]:
    value = await session.scalar(select(ServiceState.value).where(ServiceState.key == key))
    return value or {}


async def load_stop(session: AsyncSession) -> PollingStop | None:
    return PollingStop.from_json(await _get(session, STOP_KEY))


async def save_stop(session: AsyncSession, stop: PollingStop, now: datetime) -> None:
    await _put(session, STOP_KEY, stop.to_json(), now)


async def clear_stop(session: AsyncSession) -> None:
    await session.execute(delete(ServiceState).where(ServiceState.key == STOP_KEY))


# --- our own log of calls to X, per endpoint, for pacing across cycles and across leaders -------------


@dataclass
class CallLog:
    history: dict[str, list[tuple[datetime, int]]]
    rate_limits: dict[str, RateLimit]


async def load_call_log(session: AsyncSession) -> CallLog:
    raw = await _get(session, CALLS_KEY)
    history = {
        endpoint: [(utc(datetime.fromisoformat(at)), int(count)) for at, count in entries]
        for endpoint, entries in (raw.get("history") or {}).items()
    }
    rate_limits = {
        endpoint: RateLimit(int(r["limit"]), int(r["remaining"]), utc(datetime.fromisoformat(r["reset_at"])))
        for endpoint, r in (raw.get("rate_limits") or {}).items()
    }
    return CallLog(history, rate_limits)


async def save_call_log(
    session: AsyncSession,
    log: CallLog,
    calls: Mapping[str, Sequence[datetime]],
    rate_limits: Mapping[str, RateLimit],
    now: datetime,
    keep_seconds: float,
) -> None:
    """Append this cycle's calls (one entry per endpoint, at its last call: conservative) and prune."""
    since = now - timedelta(seconds=keep_seconds)
    history: dict[str, list[list[Any]]] = {}
    for endpoint in set(log.history) | set(calls):
        entries = [(at, n) for at, n in log.history.get(endpoint, []) if at > since]
        times = calls.get(endpoint) or []
        if times:
            entries.append((max(times), len(times)))
        if entries:
            history[endpoint] = [[at.isoformat(), n] for at, n in entries]
    merged = {**log.rate_limits, **rate_limits}
    limits = {
        e: {"limit": r.limit, "remaining": r.remaining, "reset_at": r.reset_at.isoformat()}
        for e, r in merged.items()
        if r.reset_at > now
    }
    await _put(session, CALLS_KEY, {"history": history, "rate_limits": limits}, now)


# --- pay-per-use ledger -----------------------------------------------------------------------------


async def read_counts(session: AsyncSession, day: date) -> tuple[int, int]:
    rows = await session.execute(
        select(XReadLedger.resource_type, func.count())
        .where(XReadLedger.day == day)
        .group_by(XReadLedger.resource_type)
    )
    counts = dict(rows.all())
    return int(counts.get("space", 0)), int(counts.get("user", 0))


async def spend_today(session: AsyncSession, settings: Settings, now: datetime) -> float:
    spaces, users = await read_counts(session, billing_day(now))
    return estimated_spend(spaces, users, settings.x_space_read_cost_usd, settings.x_user_read_cost_usd)


async def ledger_ids(session: AsyncSession, day: date) -> tuple[set[str], set[str]]:
    rows = await session.execute(
        select(XReadLedger.resource_type, XReadLedger.resource_id).where(XReadLedger.day == day)
    )
    spaces: set[str] = set()
    users: set[str] = set()
    for kind, resource_id in rows.all():
        (spaces if kind == "space" else users).add(resource_id)
    return spaces, users


async def record_reads(session: AsyncSession, day: date, spaces: Iterable[str], users: Iterable[str]) -> None:
    rows = [{"day": day, "resource_type": "space", "resource_id": s} for s in spaces]
    rows += [{"day": day, "resource_type": "user", "resource_id": u} for u in users]
    for start in range(0, len(rows), 500):
        stmt = dialect_insert(session, XReadLedger).values(rows[start : start + 500]).on_conflict_do_nothing()
        await session.execute(stmt)


async def purge_ledger(session: AsyncSession, before: date) -> None:
    await session.execute(delete(XReadLedger).where(XReadLedger.day < before))
