"""Turning what X answered into rows: Spaces with revisions, the events between revisions, creators,
poll times and resolved usernames. Discovery writes only these; the outbox fans the events out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.discovery.lease import dialect_insert
from app.discovery.models import PollTarget
from app.discovery.planner import Target
from app.spaces.models import Creator, Space, SpaceEvent, SpaceEventKind, SpaceState
from app.subscriptions.models import Subscription, TargetKind, TargetStatus
from app.x.client import XSpace, XUser

_CHUNK = 500


@dataclass
class SpaceChange:
    space: Space
    new: bool
    events: list[SpaceEvent] = field(default_factory=list)


def transition_events(
    old_state: str | None, old_start: datetime | None, new_state: str, new_start: datetime | None
) -> list[str]:
    """Event kinds for one observed change; `old_state` None means the Space was never seen before."""
    if old_state is None:
        if new_state == SpaceState.scheduled:
            return [SpaceEventKind.scheduled]
        if new_state == SpaceState.live:
            return [SpaceEventKind.started]
        return []  # first seen already over: nobody was waiting for it
    if new_state != old_state:
        return {
            SpaceState.canceled: [SpaceEventKind.canceled],
            SpaceState.live: [SpaceEventKind.started],
            SpaceState.ended: [SpaceEventKind.ended],
            SpaceState.scheduled: [SpaceEventKind.scheduled],
        }.get(new_state, [])
    if new_state == SpaceState.scheduled and new_start != old_start:
        return [SpaceEventKind.rescheduled]
    return []


def _event(space: Space, kind: str, now: datetime, previous_start: datetime | None) -> SpaceEvent:
    return SpaceEvent(
        space_id=space.id, kind=kind, revision=space.revision, occurred_at=now,
        previous_scheduled_start=previous_start if kind == SpaceEventKind.rescheduled else None,
        scheduled_start=space.scheduled_start, fanned_out_at=None,
    )


async def _existing(session: AsyncSession, ids: Sequence[str]) -> dict[str, Space]:
    found: dict[str, Space] = {}
    for start in range(0, len(ids), _CHUNK):
        for space in await session.scalars(select(Space).where(Space.id.in_(ids[start : start + _CHUNK]))):
            found[space.id] = space
    return found


async def apply_observed_spaces(session: AsyncSession, observed: Sequence[XSpace], now: datetime) -> list[SpaceChange]:
    """Upsert what X returned; `revision` rises when the state or the start time moved, with its events."""
    latest = {x.id: x for x in observed if x.creator_id or x.host_ids}
    existing = await _existing(session, sorted(latest))
    changes: list[SpaceChange] = []
    for space_id, x in latest.items():
        space = existing.get(space_id)
        if space is None:
            space = Space(
                id=space_id, creator_id=x.creator_id or x.host_ids[0], title=x.title, state=x.state,
                scheduled_start=x.scheduled_start, started_at=x.started_at, ended_at=x.ended_at, lang=x.lang,
                host_ids=list(x.host_ids), is_ticketed=bool(x.is_ticketed), x_updated_at=x.updated_at,
                first_seen_at=now, last_seen_at=now, revision=1,
            )
            session.add(space)
            kinds = transition_events(None, None, x.state, x.scheduled_start)
            changes.append(SpaceChange(space, True, [_event(space, k, now, None) for k in kinds]))
            continue
        old_state, old_start = space.state, space.scheduled_start
        space.title = x.title if x.title is not None else space.title
        space.lang = x.lang or space.lang
        space.host_ids = list(x.host_ids) or space.host_ids
        space.is_ticketed = bool(x.is_ticketed) if x.is_ticketed is not None else space.is_ticketed
        space.x_updated_at = x.updated_at or space.x_updated_at
        space.started_at = x.started_at or space.started_at
        space.ended_at = x.ended_at or space.ended_at
        space.last_seen_at = now
        moved = x.state != old_state or (x.scheduled_start is not None and x.scheduled_start != old_start)
        if not moved:
            changes.append(SpaceChange(space, False))
            continue
        space.state = x.state
        space.scheduled_start = x.scheduled_start or old_start
        space.revision += 1
        kinds = transition_events(old_state, old_start, space.state, space.scheduled_start)
        changes.append(SpaceChange(space, False, [_event(space, k, now, old_start) for k in kinds]))
    await _add_events(session, changes)
    return changes


async def apply_gone(
    session: AsyncSession, space_ids: Iterable[str], now: datetime, *, gone_means_canceled: bool
) -> list[SpaceChange]:
    """Known Spaces that X answered not-found for: a live one has ended; a scheduled one was canceled
    (when the setting says X's not-found means that: X drops canceled Spaces from its endpoints)."""
    existing = await _existing(session, sorted(set(space_ids)))
    changes: list[SpaceChange] = []
    for space in existing.values():
        if space.state == SpaceState.live:
            space.state, space.ended_at, kind = SpaceState.ended, space.ended_at or now, SpaceEventKind.ended
        elif space.state == SpaceState.scheduled and gone_means_canceled:
            space.state, kind = SpaceState.canceled, SpaceEventKind.canceled
        else:
            continue
        space.revision += 1
        changes.append(SpaceChange(space, False, [_event(space, kind, now, None)]))
    await _add_events(session, changes)
    return changes


async def _add_events(session: AsyncSession, changes: Sequence[SpaceChange]) -> None:
    await session.flush()  # new Space rows first: events reference them
    rows = [
        {
            "space_id": e.space_id, "kind": e.kind, "revision": e.revision, "occurred_at": e.occurred_at,
            "previous_scheduled_start": e.previous_scheduled_start, "scheduled_start": e.scheduled_start,
            "fanned_out_at": None,
        }
        for change in changes
        for e in change.events
    ]
    for start in range(0, len(rows), _CHUNK):
        # (space_id, kind, revision) is unique: a replayed cycle must not store an event twice.
        stmt = dialect_insert(session, SpaceEvent).values(rows[start : start + _CHUNK]).on_conflict_do_nothing()
        await session.execute(stmt)


async def upsert_creators(session: AsyncSession, users: Iterable[XUser], now: datetime) -> None:
    rows = {
        u.id: {"id": u.id, "username": u.username, "username_lower": u.username.lower(), "name": u.name,
               "resolved_at": now}
        for u in users
        if u.username
    }
    values = list(rows.values())
    for start in range(0, len(values), _CHUNK):
        stmt = dialect_insert(session, Creator).values(values[start : start + _CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=[Creator.id],
            set_={k: getattr(stmt.excluded, k) for k in ("username", "username_lower", "name", "resolved_at")},
        )
        await session.execute(stmt)


async def poll_times(session: AsyncSession) -> dict[tuple[str, str], datetime | None]:
    rows = await session.execute(select(PollTarget.kind, PollTarget.value, PollTarget.last_polled_at))
    return {(kind, value): at for kind, value, at in rows.all()}


async def mark_polled(session: AsyncSession, targets: Iterable[Target], now: datetime) -> None:
    unique = {(t.kind, t.value): {"kind": t.kind, "value": t.value, "last_polled_at": now} for t in targets}
    values = list(unique.values())
    for start in range(0, len(values), _CHUNK):
        stmt = dialect_insert(session, PollTarget).values(values[start : start + _CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=[PollTarget.kind, PollTarget.value], set_={"last_polled_at": stmt.excluded.last_polled_at}
        )
        await session.execute(stmt)


async def resolve_usernames(
    session: AsyncSession,
    found: Mapping[str, XUser],
    unknown: Iterable[str],
    suspended: Iterable[str],
    now: datetime,
) -> dict[str, str]:
    """Settle `resolving` creator subscriptions by what X said of their usernames (keys lower case).

    Returns subscription id -> new status.
    """
    unknown, suspended = set(unknown), set(suspended)
    subs = await session.scalars(
        select(Subscription).where(
            Subscription.target_kind == TargetKind.creator, Subscription.target_status == TargetStatus.resolving
        )
    )
    settled: dict[str, str] = {}
    for sub in subs:
        key = (sub.creator_username or "").lower()
        if key in found:
            sub.creator_id = found[key].id
            sub.target_status, sub.target_status_detail = TargetStatus.active, None
        elif key in suspended:
            sub.target_status = TargetStatus.suspended
            sub.target_status_detail = f"X reports @{sub.creator_username} as suspended"
        elif key in unknown:
            sub.target_status = TargetStatus.unknown_username
            sub.target_status_detail = f"X has no user @{sub.creator_username}"
        else:
            continue
        sub.updated_at = now
        settled[sub.id] = sub.target_status
    return settled


__all__ = [
    "SpaceChange",
    "apply_gone",
    "apply_observed_spaces",
    "mark_polled",
    "poll_times",
    "resolve_usernames",
    "transition_events",
    "upsert_creators",
]
