"""The reminder outbox: which notifications exist, when they are due, and what became of each.

Every rule is a method that takes a session and `now`; the dispatcher only claims rows, sends them
and hands back what happened. Inserts are `ON CONFLICT DO NOTHING` on the unique key
(subscription, Space, kind, lead time, Space revision), so anything here may run twice.
"""

from __future__ import annotations

import json
import random
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Text, bindparam, case, event, func, or_, select, text, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.clock import utc
from app.core.ids import new_ids
from app.core.models import UTCDateTime
from app.core.settings import Settings
from app.delivery.models import (
    EmailRecipient,
    Notification,
    NotificationKind,
    NotificationState,
    WebhookEndpoint,
)
from app.delivery.wake import notify_on_commit
from app.delivery.webhooks import format_utc
from app.spaces.models import Creator, Space, SpaceEvent, SpaceEventKind, SpaceState
from app.subscriptions.matching import (
    KeywordIndexCache,
    SubscriptionRow,
    subscription_rows_for_spaces,
    upcoming_spaces_for_subscription,
)
from app.subscriptions.models import Subscription

_Sub = Subscription | SubscriptionRow  # an entity (one subscription planned) or a row (fan-out)

# Core tables, not ORM entities: bulk statements need no session synchronization.
T = Notification.__table__
N = T.c
WE = WebhookEndpoint.__table__
S = NotificationState
K = NotificationKind

ACTIVE = (S.pending, S.held, S.sending)
EMAIL_KINDS = frozenset({K.reminder, K.scheduled, K.rescheduled, K.canceled, K.started, K.confirmation})
SPACE_URL = "https://x.com/i/spaces/{}"
_CHUNK = 1000
ANALYZE_AFTER_ROWS = 10_000  # a fan-out inserting this many rows refreshes the planner's statistics (PostgreSQL)


class Reason:
    """`state_reason` texts, so API clients and tests see the same words."""

    space_canceled = "the Space was canceled"
    space_started = "the Space started before the reminder was sent"
    space_unknown = "the Space is no longer known"
    paused = "the subscription was paused"
    deleted = "the subscription was deleted"
    lead_removed = "the lead time was removed from the subscription"
    reminders_off = "the subscription no longer asks for reminders"
    kind_off = "the subscription no longer asks for this event type"
    no_longer_matches = "the Space no longer matches the subscription"
    superseded = "superseded by a reminder for the Space's new time"
    moved_earlier = "the Space moved earlier, past this reminder's time"
    unconfirmed = "email address not confirmed"
    unsubscribed = "the recipient unsubscribed"
    endpoint_deleted = "the webhook endpoint was deleted"
    too_old = "too old to send"


@dataclass(slots=True)
class ClaimedRow:
    id: str
    account_id: str
    subscription_id: str | None
    space_id: str | None
    kind: str
    channel: str
    webhook_endpoint_id: str | None
    email_recipient_id: str | None
    lead_time_minutes: int
    space_revision: int
    payload: dict[str, Any] | None
    due_at: datetime
    next_attempt_at: datetime
    expires_at: datetime | None
    attempts: int
    lease_token: str


@dataclass(slots=True)
class ClaimedBatch:
    token: str
    rows: list[ClaimedRow]
    context: SendContext | None = None  # facts read by the claim itself (PostgreSQL: Spaces, endpoints)


@dataclass(slots=True)
class Completion:
    """The new state of a claimed row; applied only while `lease_token` still holds the row."""

    id: str
    lease_token: str
    state: str
    attempts: int
    reason: str | None = None
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    late: bool = False


@dataclass(slots=True)
class AttemptRecord:
    notification_id: str
    attempt: int
    started_at: datetime
    latency_ms: float | None
    outcome: str
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None


@dataclass(slots=True)
class SpaceFacts:
    id: str
    title: str | None
    state: str
    scheduled_start: datetime | None
    started_at: datetime | None
    creator_id: str
    creator_username: str | None

    def data(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "state": self.state,
            "scheduled_start": self.scheduled_start,
            "creator_id": self.creator_id,
            "creator_username": self.creator_username,
            "url": SPACE_URL.format(self.id),
        }


@dataclass(slots=True)
class EndpointFacts:
    id: str
    url: str
    secret: str
    enabled: bool
    disabled_reason: str | None
    throttled_until: datetime | None
    failing_since: datetime | None
    event_types: list[str]


@dataclass(slots=True)
class RecipientFacts:
    id: str
    address: str
    timezone: str | None
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None


@dataclass(slots=True)
class SubscriptionFacts:
    id: str
    target_kind: str
    creator_username: str | None
    keyword: str | None


@dataclass
class SendContext:
    """What a batch of claimed rows needs to be sent, read once per batch."""

    spaces: dict[str, SpaceFacts] = field(default_factory=dict)
    endpoints: dict[str, EndpointFacts] = field(default_factory=dict)
    recipients: dict[str, RecipientFacts] = field(default_factory=dict)
    subscriptions: dict[str, SubscriptionFacts] = field(default_factory=dict)


@dataclass(slots=True)
class EndpointOutcome:
    """The last webhook result of one endpoint in a batch of results."""

    endpoint_id: str
    at: datetime
    ok: bool
    throttled_until: datetime | None = None
    disable_reason: str | None = None


@dataclass(slots=True)
class _Existing:
    id: str
    space_id: str
    subscription_id: str
    lead: int
    revision: int
    state: str


@dataclass(slots=True)
class _Targets:
    endpoint_types: dict[str, frozenset[str]]
    recipients: dict[str, tuple[datetime | None, datetime | None]]  # confirmed_at, unsubscribed_at


class _Batch(NamedTuple):
    """What the new rows of a batch share; each subscription of the batch adds one row, with its own id,
    account, channel and webhook endpoint or email recipient."""

    space_id: str
    kind: str
    lead: int
    revision: int
    due: datetime
    expires: datetime | None
    hold: datetime | None  # unconfirmed email address: held until then; else pending, due at `due`
    payload: str  # JSON text ("null": none)


@dataclass
class _Plan:
    inserts: dict[_Batch, list[_Sub]] = field(default_factory=lambda: defaultdict(list))
    moves: dict[tuple[Any, ...], list[str]] = field(default_factory=lambda: defaultdict(list))
    cancels: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def insert_count(self) -> int:
        return sum(len(subs) for subs in self.inserts.values())


def _next_attempt(row: ClaimedRow) -> datetime:
    return row.next_attempt_at


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo is UTC else utc(value)


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _clean(value: str | None, limit: int | None = None) -> str | None:
    """Text from receivers goes into the database: PostgreSQL text cannot hold NUL."""
    if value is None:
        return None
    value = value.replace("\x00", "\ufffd")
    return value[:limit] if limit is not None else value


class ReminderOutbox:
    """Rules of the outbox. One instance per process (it caches the keyword index)."""

    def __init__(
        self,
        *,
        confirmation_deadline: timedelta = timedelta(hours=72),
        max_attempts: int = 12,
        lease: timedelta = timedelta(seconds=60),
        disable_after: timedelta = timedelta(hours=120),
        late_after: timedelta = timedelta(seconds=60),
        notice_ttl: timedelta = timedelta(hours=24),
        backoff_base_seconds: float = 5.0,
        backoff_cap_seconds: float = 3600.0,
    ) -> None:
        self.confirmation_deadline = confirmation_deadline
        self.max_attempts = max_attempts
        self.lease = lease
        self.disable_after = disable_after
        self.late_after = late_after
        self.notice_ttl = notice_ttl
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self._keywords = KeywordIndexCache()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReminderOutbox:
        return cls(
            confirmation_deadline=timedelta(hours=settings.email_confirmation_deadline_hours),
            max_attempts=settings.max_attempts,
            lease=timedelta(seconds=settings.dispatcher_lease_seconds),
            disable_after=timedelta(hours=settings.webhook_disable_after_hours),
        )

    # ------------------------------------------------------------------------------------------
    # Fan-out of Space events

    async def fan_out_events(self, session: AsyncSession, now: datetime, limit: int = 200) -> int:
        """Turn unprocessed SpaceEvents into notification rows and stamp them; returns how many."""
        events = list(
            await session.scalars(
                select(SpaceEvent)
                .where(SpaceEvent.fanned_out_at.is_(None))
                .order_by(SpaceEvent.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not events:
            return 0
        space_ids = sorted({e.space_id for e in events})
        spaces = {s.id: s for s in await session.scalars(select(Space).where(Space.id.in_(space_ids)))}
        index = await self._keywords.get(session)
        matched = await subscription_rows_for_spaces(session, list(spaces.values()), index)
        subs = {s.id: s for group in matched.values() for s in group}
        targets = await self._targets(session, subs.values())

        inserted = 0
        for ev in events:
            space = spaces.get(ev.space_id)
            if space is not None:
                inserted += await self._apply_event(session, ev, space, matched.get(space.id, []), targets, now)
        events_table = SpaceEvent.__table__
        await session.execute(
            update(events_table).where(events_table.c.id.in_([e.id for e in events])).values(fanned_out_at=now)
        )
        if inserted >= ANALYZE_AFTER_ROWS and session.get_bind().dialect.name == "postgresql":
            # Autovacuum refreshes the planner's statistics within a minute or so; rows due before that
            # would be claimed with plans made for the table as it was (typically: read and sort every
            # due row on each claim, so a big fan-out due soon drains quadratically). ~0.1 s per run.
            await session.execute(text("ANALYZE notification"))
        return len(events)

    async def _apply_event(
        self,
        session: AsyncSession,
        ev: SpaceEvent,
        space: Space,
        subs: list[SubscriptionRow],
        targets: _Targets,
        now: datetime,
    ) -> int:
        """Plan and apply one event; returns how many rows it tried to insert."""
        kind = ev.kind
        plan = _Plan()
        if kind in (SpaceEventKind.scheduled, SpaceEventKind.rescheduled):
            existing = await self._existing_reminders(session, space_ids=[space.id])
            delivered = self._plan_space(plan, space, subs, existing, targets, now)
            if space.state == SpaceState.scheduled:
                payload = None
                if kind == SpaceEventKind.rescheduled and ev.previous_scheduled_start is not None:
                    payload = {"previous_scheduled_start": utc(ev.previous_scheduled_start).isoformat()}
                notice = self._notice(space, kind, ev.revision, now, payload)
                for sub in subs:
                    # Whoever already got a reminder for the old time hears about the new one.
                    owed = (
                        kind == SpaceEventKind.rescheduled
                        and sub.id in delivered
                        and self._wants(sub, kind, targets, ignore_subscription_types=True)
                    )
                    if owed or self._wants(sub, kind, targets):
                        plan.inserts[self._held(notice, sub, targets, now)].append(sub)
        else:
            if kind == SpaceEventKind.canceled:
                await self._close_space_reminders(session, space.id, S.canceled, Reason.space_canceled, now)
            elif kind in (SpaceEventKind.started, SpaceEventKind.ended):
                await self._close_space_reminders(session, space.id, S.expired, Reason.space_started, now)
            notice = self._notice(space, kind, ev.revision, now, None)
            for sub in subs:
                if self._wants(sub, kind, targets):
                    plan.inserts[self._held(notice, sub, targets, now)].append(sub)
        await self._execute(session, plan, now)
        return plan.insert_count()

    async def _close_space_reminders(
        self, session: AsyncSession, space_id: str, state: str, reason: str, now: datetime
    ) -> None:
        # Held mail of any kind for a Space that is over: the address never got confirmed in time.
        if state == S.expired:
            await session.execute(
                update(T)
                .where(N.space_id == space_id, N.state == S.held)
                .values(state=S.expired, state_reason=Reason.unconfirmed, updated_at=now)
            )
        await session.execute(
            update(T)
            .where(N.space_id == space_id, N.kind == K.reminder, N.state.in_(ACTIVE))
            .values(
                state=state, state_reason=reason, lease_token=None, lease_owner=None, lease_expires_at=None,
                updated_at=now,
            )
        )

    # ------------------------------------------------------------------------------------------
    # Subscriptions

    async def plan_subscription(
        self, session: AsyncSession, sub: Subscription, now: datetime, *, new: bool = False
    ) -> None:
        """Bring the subscription's pending rows in line with it: new, changed, paused or unpaused.

        `new`: created in this transaction, so it has no rows yet — only the inserts are planned,
        none of the look-ups that bring existing rows in line (three round trips fewer per create)."""
        if sub.paused:
            await self.cancel_subscription(session, sub.id, now, Reason.paused)
            return
        spaces = await upcoming_spaces_for_subscription(session, sub, now)
        if new and not spaces:
            return
        matched_ids = [s.id for s in spaces]
        targets = await self._targets(session, [sub])
        existing = (
            {} if new else await self._existing_reminders(session, subscription_id=sub.id, space_ids=matched_ids)
        )
        plan = _Plan()
        for space in spaces:
            self._plan_space(plan, space, [sub], existing, targets, now)

        elsewhere = sorted(
            {r.space_id for rows in existing.values() for r in rows if r.state in ACTIVE} - set(matched_ids)
        )
        if elsewhere:
            upcoming = set(
                await session.scalars(
                    select(Space.id).where(
                        Space.id.in_(elsewhere), Space.state == SpaceState.scheduled, Space.scheduled_start > now
                    )
                )
            )
            for (space_id, _sub_id), rows in existing.items():
                if space_id in upcoming:
                    plan.cancels[Reason.no_longer_matches] += [r.id for r in rows if r.state in ACTIVE]
        await self._execute(session, plan, now)
        if new:
            return

        await session.execute(
            update(T)
            .where(
                N.subscription_id == sub.id,
                N.kind != K.reminder,
                N.kind.not_in(list(sub.event_types or [])),
                N.state.in_(ACTIVE),
            )
            .values(
                state=S.canceled, state_reason=Reason.kind_off, lease_token=None, lease_owner=None,
                lease_expires_at=None, updated_at=now,
            )
        )

    async def cancel_subscription(self, session: AsyncSession, subscription_id: str, now: datetime, reason: str) -> int:
        """Cancel every row of a subscription that has not finished (pause, delete)."""
        result = await session.execute(
            update(T)
            .where(N.subscription_id == subscription_id, N.state.in_(ACTIVE))
            .values(
                state=S.canceled, state_reason=reason, lease_token=None, lease_owner=None, lease_expires_at=None,
                updated_at=now,
            )
        )
        return result.rowcount or 0

    # ------------------------------------------------------------------------------------------
    # Email recipients

    async def release_held_for_recipient(self, session: AsyncSession, recipient_id: str, now: datetime) -> int:
        """The address was confirmed: its held rows become pending (due ones go out at once)."""
        result = await session.execute(
            update(T)
            .where(
                N.email_recipient_id == recipient_id,
                N.state == S.held,
                N.next_attempt_at > now,
                or_(N.expires_at.is_(None), N.expires_at > now),
            )
            .values(
                state=S.pending,
                state_reason=None,
                next_attempt_at=case((N.due_at > now, N.due_at), else_=now),
                updated_at=now,
            )
        )
        return result.rowcount or 0

    async def cancel_for_recipient(
        self, session: AsyncSession, recipient_id: str, now: datetime, reason: str = Reason.unsubscribed
    ) -> int:
        """The address unsubscribed (or was removed): nothing more goes to it."""
        result = await session.execute(
            update(T)
            .where(N.email_recipient_id == recipient_id, N.state.in_(ACTIVE), N.kind != K.confirmation)
            .values(
                state=S.canceled, state_reason=reason, lease_token=None, lease_owner=None, lease_expires_at=None,
                updated_at=now,
            )
        )
        return result.rowcount or 0

    async def expire_held(self, session: AsyncSession, now: datetime) -> int:
        """Held rows past their hold deadline, or past the time they could be useful, expire."""
        result = await session.execute(
            update(T)
            .where(N.state == S.held, or_(N.next_attempt_at <= now, N.expires_at <= now))
            .values(state=S.expired, state_reason=Reason.unconfirmed, updated_at=now)
        )
        return result.rowcount or 0

    async def replay(self, session: AsyncSession, notification: Notification, now: datetime) -> str | None:
        """Send a failed or expired notification again (same id, fresh attempt budget).

        Returns None when done, else why it cannot be replayed (the row is left as it was).
        """
        if notification.state not in (S.failed, S.expired):
            return f"only failed or expired notifications can be replayed; this one is {notification.state}"
        expires = now + self.notice_ttl
        if notification.kind == K.reminder:
            space = await session.get(Space, notification.space_id) if notification.space_id else None
            if space is None or space.state != SpaceState.scheduled or (
                space.scheduled_start is not None and space.scheduled_start <= now
            ):
                return "the Space has started, ended or been canceled: a reminder for it would be pointless"
            expires = space.scheduled_start or expires
        hold: datetime | None = None
        if notification.webhook_endpoint_id:
            endpoint = await session.get(WebhookEndpoint, notification.webhook_endpoint_id)
            if endpoint is None:
                return Reason.endpoint_deleted
            if not endpoint.enabled:
                return f"the webhook endpoint is disabled ({endpoint.disabled_reason}); enable it first"
        elif notification.email_recipient_id:
            recipient = await session.get(EmailRecipient, notification.email_recipient_id)
            if recipient is None or recipient.unsubscribed_at is not None:
                return Reason.unsubscribed
            if recipient.confirmed_at is None and notification.kind != K.confirmation:
                hold = now + self.confirmation_deadline
        result = await session.execute(
            update(T)
            .where(N.id == notification.id, N.state.in_((S.failed, S.expired)))
            .values(
                state=S.held if hold else S.pending,
                state_reason=Reason.unconfirmed if hold else None,
                next_attempt_at=hold or now,
                expires_at=expires,
                attempts=0,
                late=False,
                lease_token=None,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        if not result.rowcount:
            return "the notification changed meanwhile; it was replayed already"
        await session.refresh(notification)
        return None

    # ------------------------------------------------------------------------------------------
    # Planning helpers

    async def _targets(self, session: AsyncSession, subs: Iterable[_Sub]) -> _Targets:
        subs = list(subs)
        endpoint_ids = sorted({s.webhook_endpoint_id for s in subs if s.webhook_endpoint_id})
        recipient_ids = sorted({s.email_recipient_id for s in subs if s.email_recipient_id})
        endpoint_types: dict[str, frozenset[str]] = {}
        for chunk in _chunks(endpoint_ids):
            for eid, types in await session.execute(
                select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(WebhookEndpoint.id.in_(chunk))
            ):
                endpoint_types[eid] = frozenset(types or ())
        recipients: dict[str, tuple[datetime | None, datetime | None]] = {}
        for chunk in _chunks(recipient_ids):
            for rid, confirmed, unsubscribed in await session.execute(
                select(EmailRecipient.id, EmailRecipient.confirmed_at, EmailRecipient.unsubscribed_at).where(
                    EmailRecipient.id.in_(chunk)
                )
            ):
                recipients[rid] = (confirmed, unsubscribed)
        return _Targets(endpoint_types, recipients)

    @staticmethod
    def _wants(sub: _Sub, kind: str, targets: _Targets, *, ignore_subscription_types: bool = False) -> bool:
        if sub.paused or (not ignore_subscription_types and kind not in (sub.event_types or ())):
            return False
        if sub.webhook_endpoint_id:
            return kind in targets.endpoint_types.get(sub.webhook_endpoint_id, ())
        if sub.email_recipient_id:
            recipient = targets.recipients.get(sub.email_recipient_id)
            return recipient is not None and recipient[1] is None and kind in EMAIL_KINDS
        return False

    def _hold(self, sub: _Sub, targets: _Targets, now: datetime) -> datetime | None:
        """The hold deadline when this subscription's mail must wait for a confirmation, else None."""
        if sub.email_recipient_id:
            recipient = targets.recipients.get(sub.email_recipient_id)
            if recipient is None or recipient[0] is None:
                return now + self.confirmation_deadline
        return None

    def _held(self, batch: _Batch, sub: _Sub, targets: _Targets, now: datetime) -> _Batch:
        """`batch`, or a held copy of it when the subscription's mail must wait for a confirmation."""
        hold = self._hold(sub, targets, now)
        return batch if hold is None else batch._replace(hold=hold)

    def _notice(
        self, space: Space, kind: str, revision: int, now: datetime, payload: dict[str, Any] | None
    ) -> _Batch:
        expires = now + self.notice_ttl
        if kind in (K.scheduled, K.rescheduled) and space.scheduled_start is not None and space.scheduled_start > now:
            expires = space.scheduled_start
        return _Batch(space.id, kind, 0, revision, now, expires, None, json.dumps(payload))

    async def _existing_reminders(
        self, session: AsyncSession, *, space_ids: Sequence[str] = (), subscription_id: str | None = None
    ) -> dict[tuple[str, str], list[_Existing]]:
        cols = (N.id, N.space_id, N.subscription_id, N.lead_time_minutes, N.space_revision, N.state)
        stmt = select(*cols).where(N.kind == K.reminder, N.subscription_id.is_not(None))
        if subscription_id is not None:
            stmt = stmt.where(
                N.subscription_id == subscription_id, or_(N.space_id.in_(list(space_ids)), N.state.in_(ACTIVE))
            )
        else:
            stmt = stmt.where(N.space_id.in_(list(space_ids)))
        found: dict[tuple[str, str], list[_Existing]] = defaultdict(list)
        for row in await session.execute(stmt):
            found[(row[1], row[2])].append(_Existing(*row))
        return found

    def _plan_space(
        self,
        plan: _Plan,
        space: Space,
        subs: Sequence[_Sub],
        existing: dict[tuple[str, str], list[_Existing]],
        targets: _Targets,
        now: datetime,
    ) -> set[str]:
        """Plan each subscription's reminders for the Space's current start; returns who already got one.

        Per (subscription, lead): a row for the current revision is kept; otherwise a pending row of an
        older revision is moved to it; otherwise a row is inserted. Reminders whose time has passed
        collapse into one late reminder (the nearest), unless one was delivered already.
        """
        delivered: set[str] = set()
        start = space.scheduled_start
        upcoming = space.state == SpaceState.scheduled and start is not None and start > now
        # (lead times, hold) -> the subscription lists of the batches a subscription without rows joins
        new_rows: dict[tuple[tuple[int, ...], datetime | None], list[list[_Sub]]] = {}
        for sub in subs:
            rows = existing.get((space.id, sub.id), [])
            if any(r.state == S.delivered for r in rows):
                delivered.add(sub.id)
            if not upcoming:
                continue
            assert start is not None
            wants = self._wants(sub, K.reminder, targets)
            if not rows:
                # Nothing planned yet for this subscription and Space (every row of a fan-out to a new
                # Space): what the general case below does when there are no rows, without its books,
                # worked out once per distinct lead times.
                if wants and sub.lead_times:
                    hold = self._hold(sub, targets, now)
                    key = (tuple(sub.lead_times), hold)
                    joins = new_rows.get(key)
                    if joins is None:
                        batches = self._new_reminders(space, key[0], hold, now)
                        joins = new_rows[key] = [plan.inserts[b] for b in batches]
                    for batch_subs in joins:
                        batch_subs.append(sub)
                continue
            leads = set(sub.lead_times or ()) if wants else set()
            by_lead: dict[int, list[_Existing]] = defaultdict(list)
            for r in rows:
                by_lead[r.lead].append(r)
            for lead, lead_rows in by_lead.items():
                if lead not in leads:
                    reason = Reason.lead_removed if wants else Reason.reminders_off
                    plan.cancels[reason] += [r.id for r in lead_rows if r.state in ACTIVE]

            # (lead, due, row to reuse, whether that row is a canceled one of this revision)
            candidates: list[tuple[int, datetime, str | None, bool]] = []
            for lead in sorted(leads, reverse=True):
                lead_rows = by_lead.get(lead, [])
                current = next((r for r in lead_rows if r.revision == space.revision), None)
                older = [r for r in lead_rows if r.revision != space.revision and r.state in ACTIVE]
                if current is not None:
                    plan.cancels[Reason.superseded] += [r.id for r in older]
                    if current.state == S.canceled:  # unpaused, or the lead time came back
                        candidates.append((lead, start - timedelta(minutes=lead), current.id, True))
                elif older:
                    plan.cancels[Reason.superseded] += [r.id for r in older[1:]]
                    candidates.append((lead, start - timedelta(minutes=lead), older[0].id, False))
                else:
                    candidates.append((lead, start - timedelta(minutes=lead), None, False))

            # Of the lead times already passed only the nearest may still go out (late), once.
            passed_leads = [lead for lead in leads if start - timedelta(minutes=lead) <= now]
            nearest = min(passed_leads) if passed_leads and sub.id not in delivered else None
            keep = next((c for c in candidates if c[0] == nearest), None)
            hold = self._hold(sub, targets, now)
            for candidate in candidates:
                lead, due, target, revived = candidate
                if due <= now and candidate is not keep:
                    if target is not None and not revived:
                        plan.cancels[Reason.moved_earlier].append(target)
                    continue
                if target is None:
                    batch = _Batch(space.id, K.reminder, lead, space.revision, due, start, hold, "null")
                    plan.inserts[batch].append(sub)
                else:
                    plan.moves[(space.revision, due, start, hold)].append(target)
        return delivered

    @staticmethod
    def _new_reminders(space: Space, leads: Iterable[int], hold: datetime | None, now: datetime) -> list[_Batch]:
        """One row per lead time still ahead, and of those already passed only the nearest (late)."""
        start = space.scheduled_start
        assert start is not None
        dues = [(lead, start - timedelta(minutes=lead)) for lead in sorted(set(leads), reverse=True)]
        nearest = min((lead for lead, due in dues if due <= now), default=None)
        return [
            _Batch(space.id, K.reminder, lead, space.revision, due, start, hold, "null")
            for lead, due in dues
            if due > now or lead == nearest
        ]

    async def _execute(self, session: AsyncSession, plan: _Plan, now: datetime) -> None:
        dialect = session.get_bind().dialect.name
        for reason, ids in plan.cancels.items():
            for chunk in _chunks(sorted(set(ids))):
                await session.execute(
                    update(T)
                    .where(N.id.in_(chunk), N.state.in_(ACTIVE))
                    .values(
                        state=S.canceled, state_reason=reason, lease_token=None, lease_owner=None,
                        lease_expires_at=None, updated_at=now,
                    )
                )
        for (revision, due, start, hold), ids in plan.moves.items():
            if hold is None:
                state_values: dict[str, Any] = {"state": S.pending, "state_reason": None, "next_attempt_at": due}
            else:
                state_values = {
                    "state": S.held,
                    "state_reason": Reason.unconfirmed,
                    "next_attempt_at": case((N.state == S.held, N.next_attempt_at), else_=hold),
                }
            for chunk in _chunks(ids):
                await session.execute(
                    update(T)
                    .where(N.id.in_(chunk))
                    .values(
                        space_revision=revision, due_at=due, expires_at=start, attempts=0, late=False,
                        lease_token=None, lease_owner=None, lease_expires_at=None, updated_at=now, **state_values,
                    )
                )
        # One INSERT ... SELECT per batch and 5,000 rows: what the batch's rows share is bound once, and
        # only what differs per row (ids, account, channel, target) travels as arrays (PostgreSQL) or
        # JSON (SQLite), not one parameter per column and row.
        connection = None if dialect == "postgresql" else await session.connection()
        for batch, subs in plan.inserts.items():
            for chunk in _chunks(subs, 5000):
                if connection is None:
                    await session.execute(_PG_INSERT, _insert_params(batch, chunk, now))
                else:
                    await connection.exec_driver_sql(_SQLITE_INSERT, _sqlite_insert_params(batch, chunk, now))

    # ------------------------------------------------------------------------------------------
    # Claiming and completing (the dispatcher's side)

    async def claim_due(
        self,
        session: AsyncSession,
        now: datetime,
        limit: int,
        owner: str,
        *,
        horizon: datetime | None = None,
        reclaim: bool = True,
    ) -> ClaimedBatch:
        """Lease up to `limit` pending rows due by `horizon` (default `now`), soonest first.

        PostgreSQL: FOR UPDATE SKIP LOCKED, so workers never claim one row twice. SQLite: one
        UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING inside BEGIN IMMEDIATE (one writer).
        With `reclaim`, rows whose lease expired (a worker died) become pending again first.
        """
        postgres = session.get_bind().dialect.name == "postgresql"
        if reclaim:
            await self._reclaim_expired(session, now, postgres)
        token = secrets.token_hex(16)
        if postgres:
            result = await session.execute(
                _PG_CLAIM,
                {
                    "horizon": horizon or now, "limit": limit, "token": token, "owner": owner[:128],
                    "expires": now + self.lease, "now": now, "pending": S.pending, "sending": S.sending,
                },
            )
            # Untyped columns: asyncpg decodes JSON and gives aware UTC datetimes, so the typed result
            # processors only repeated that work on every column of every row.
            context = SendContext()
            spaces, endpoints = context.spaces, context.endpoints
            rows = []
            for r in result:
                row = ClaimedRow(*r[:15], token)
                row.due_at, row.next_attempt_at, row.expires_at = _aware(r[11]), _aware(r[12]), _aware(r[13])
                rows.append(row)
                if r[15] is not None and r[15] not in spaces:
                    space = spaces[r[15]] = SpaceFacts(*r[15:22])
                    space.scheduled_start, space.started_at = _aware(r[18]), _aware(r[19])
                if r[22] is not None and r[22] not in endpoints:
                    endpoint = endpoints[r[22]] = EndpointFacts(*r[22:30])
                    endpoint.throttled_until, endpoint.failing_since = _aware(r[27]), _aware(r[28])
            rows.sort(key=_next_attempt)
            return ClaimedBatch(token, rows, context)
        due = (
            select(N.id)
            .where(N.state == S.pending, N.next_attempt_at <= (horizon or now))
            .order_by(N.next_attempt_at)
            .limit(limit)
        )
        stmt = (
            update(T)
            .where(N.id.in_(due.scalar_subquery()))
            .values(
                state=S.sending, lease_token=token, lease_owner=owner[:128], lease_expires_at=now + self.lease,
                attempts=N.attempts + 1, updated_at=now,
            )
            .returning(
                N.id, N.account_id, N.subscription_id, N.space_id, N.kind, N.channel, N.webhook_endpoint_id,
                N.email_recipient_id, N.lead_time_minutes, N.space_revision, type_coerce(N.payload, Text),
                type_coerce(N.due_at, Text), type_coerce(N.next_attempt_at, Text), type_coerce(N.expires_at, Text),
                N.attempts,
            )
        )
        # Times come back as SQLite's text and are parsed here once per distinct value: the rows of a
        # batch mostly share their due times.
        parsed: dict[str, datetime] = {}

        def when(value: str | None) -> datetime | None:
            if value is None:
                return None
            moment = parsed.get(value)
            if moment is None:
                moment = parsed[value] = utc(datetime.fromisoformat(value))
            return moment

        rows = []
        for r in await session.execute(stmt):
            row = ClaimedRow(*r, token)
            if row.payload is not None:
                row.payload = json.loads(row.payload)  # type: ignore[arg-type]
            row.due_at, row.next_attempt_at, row.expires_at = (  # type: ignore[assignment]
                when(r[11]), when(r[12]), when(r[13])
            )
            rows.append(row)
        rows.sort(key=_next_attempt)
        return ClaimedBatch(token, rows)

    async def _reclaim_expired(self, session: AsyncSession, now: datetime, postgres: bool) -> int:
        if postgres:
            result = await session.execute(_PG_RECLAIM, {"now": now, "pending": S.pending, "sending": S.sending})
            return result.rowcount or 0
        stale = select(N.id).where(N.state == S.sending, N.lease_expires_at < now).limit(1000)
        result = await session.execute(
            update(T)
            .where(N.id.in_(stale.scalar_subquery()))
            .values(state=S.pending, lease_token=None, lease_owner=None, lease_expires_at=None, updated_at=now)
        )
        return result.rowcount or 0

    async def extend_leases(self, session: AsyncSession, tokens: Sequence[str], now: datetime) -> int:
        if not tokens:
            return 0
        result = await session.execute(
            update(T)
            .where(N.lease_token.in_(list(tokens)), N.state == S.sending)
            .values(lease_expires_at=now + self.lease)
        )
        return result.rowcount or 0

    async def release(self, session: AsyncSession, rows: Sequence[ClaimedRow], now: datetime) -> int:
        """Hand claimed rows that were never sent back to the pool, without spending an attempt."""
        released = 0
        by_token: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            by_token[row.lease_token].append(row.id)
        for token, ids in by_token.items():
            for chunk in _chunks(ids):
                result = await session.execute(
                    update(T)
                    .where(N.id.in_(chunk), N.lease_token == token)
                    .values(
                        state=S.pending, attempts=N.attempts - 1, lease_token=None, lease_owner=None,
                        lease_expires_at=None, updated_at=now,
                    )
                )
                released += result.rowcount or 0
        return released

    async def complete(self, session: AsyncSession, completion: Completion, now: datetime) -> int:
        """Record one row's new state; 0 when the lease was lost (the token no longer holds the row)."""
        return len(await self.complete_many(session, [completion], now))

    async def complete_many(self, session: AsyncSession, completions: Sequence[Completion], now: datetime) -> set[str]:
        """One statement for a whole batch; returns the ids whose lease still held (the others are refused)."""
        if not completions:
            return set()
        done: set[str] = set()
        postgres = session.get_bind().dialect.name == "postgresql"
        for chunk in _chunks(completions, 2000):
            if postgres:
                result = await session.execute(_PG_COMPLETE, _completion_arrays(chunk, now))
            else:
                dt = _sqlite_dt_memo()
                rows = [
                    [
                        c.id, c.lease_token, c.state, _clean(c.reason, 300), dt(c.next_attempt_at),
                        c.attempts, _clean(c.last_error, 2000), dt(c.delivered_at), 1 if c.late else 0,
                    ]
                    for c in chunk
                ]
                result = await session.execute(_SQLITE_COMPLETE, {"rows": json.dumps(rows), "now": now})
            done.update(r[0] for r in result)
        return done

    async def log_attempts(self, session: AsyncSession, attempts: Sequence[AttemptRecord]) -> None:
        """Insert attempt rows in one statement (rows whose notification was deleted meanwhile are skipped)."""
        if not attempts:
            return
        postgres = session.get_bind().dialect.name == "postgresql"
        for chunk in _chunks(attempts, 2000):
            if postgres:
                await session.execute(_PG_ATTEMPTS, _attempt_arrays(chunk))
            else:
                dt = _sqlite_dt_memo()
                rows = [
                    [
                        a.notification_id, a.attempt, dt(a.started_at), a.latency_ms, a.outcome,
                        a.status_code, _clean(a.error, 2000), _clean(a.response_excerpt, 1024),
                    ]
                    for a in chunk
                ]
                await session.execute(_SQLITE_ATTEMPTS, {"rows": json.dumps(rows)})

    async def complete_and_log(
        self,
        session: AsyncSession,
        completions: Sequence[Completion],
        attempts: Sequence[AttemptRecord],
        now: datetime,
    ) -> set[str]:
        """`complete_many` then `log_attempts`; on PostgreSQL one statement when both fit one chunk."""
        postgres = session.get_bind().dialect.name == "postgresql"
        if postgres and completions and attempts and len(completions) <= 2000 and len(attempts) <= 2000:
            params = _completion_arrays(completions, now) | _attempt_arrays(attempts)
            return {r[0] for r in await session.execute(_PG_COMPLETE_AND_LOG, params)}
        done = await self.complete_many(session, completions, now)
        await self.log_attempts(session, attempts)
        return done

    async def record_endpoint_outcomes(
        self, session: AsyncSession, outcomes: Sequence[EndpointOutcome], now: datetime
    ) -> list[tuple[str, str]]:
        """Apply a batch's last result per endpoint; returns (endpoint id, reason) of endpoints disabled now."""
        ok = sorted({o.endpoint_id for o in outcomes if o.ok})
        failing = [o for o in outcomes if not o.ok]
        disabled: list[tuple[str, str]] = []
        if ok:
            await session.execute(
                update(WE)
                .where(
                    WE.c.id.in_(ok),
                    or_(WE.c.failing_since.is_not(None), WE.c.throttled_until.is_not(None)),
                )
                .values(failing_since=None, throttled_until=None)
            )
        if not failing:
            return disabled
        ids = sorted({o.endpoint_id for o in failing})
        await session.execute(
            update(WE)
            .where(WE.c.id.in_(ids), WE.c.failing_since.is_(None))
            .values(failing_since=min(o.at for o in failing))
        )
        for o in failing:
            if o.throttled_until is not None:
                await session.execute(
                    update(WE)
                    .where(
                        WE.c.id == o.endpoint_id,
                        or_(WE.c.throttled_until.is_(None), WE.c.throttled_until < o.throttled_until),
                    )
                    .values(throttled_until=o.throttled_until)
                )
            if o.disable_reason is not None:
                result = await session.execute(
                    update(WE)
                    .where(WE.c.id == o.endpoint_id, WE.c.enabled.is_(True))
                    .values(enabled=False, disabled_reason=o.disable_reason[:300], disabled_at=now, updated_at=now)
                )
                if result.rowcount:
                    disabled.append((o.endpoint_id, o.disable_reason))
        hours = self.disable_after.total_seconds() / 3600
        reason = f"failing without a success for {hours:g} hours"
        result = await session.execute(
            update(WE)
            .where(
                WE.c.id.in_(ids),
                WE.c.enabled.is_(True),
                WE.c.failing_since <= now - self.disable_after,
            )
            .values(enabled=False, disabled_reason=reason, disabled_at=now, updated_at=now)
            .returning(WE.c.id)
        )
        disabled += [(eid, reason) for (eid,) in result]
        return disabled

    async def load_context(
        self, session: AsyncSession, rows: Sequence[ClaimedRow], known: SendContext | None = None
    ) -> SendContext:
        """What sending `rows` needs; facts already in `known` (read by the claim) are not read again."""
        context = known or SendContext()
        space_ids = sorted({r.space_id for r in rows if r.space_id} - context.spaces.keys())
        endpoint_ids = sorted({r.webhook_endpoint_id for r in rows if r.webhook_endpoint_id} - context.endpoints.keys())
        recipient_ids = sorted({r.email_recipient_id for r in rows if r.email_recipient_id})
        sub_ids = sorted({r.subscription_id for r in rows if r.channel == "email" and r.subscription_id})
        for chunk in _chunks(space_ids):
            for row in await session.execute(_SPACE_FACTS, {"ids": list(chunk)}):
                context.spaces[row[0]] = SpaceFacts(*row)
        for chunk in _chunks(endpoint_ids):
            for row in await session.execute(_ENDPOINT_FACTS, {"ids": list(chunk)}):
                context.endpoints[row[0]] = EndpointFacts(*row)
        for chunk in _chunks(recipient_ids):
            for row in await session.execute(_RECIPIENT_FACTS, {"ids": list(chunk)}):
                context.recipients[row[0]] = RecipientFacts(*row)
        for chunk in _chunks(sub_ids):
            for row in await session.execute(_SUBSCRIPTION_FACTS, {"ids": list(chunk)}):
                context.subscriptions[row[0]] = SubscriptionFacts(*row)
        return context

    async def next_due_at(self, session: AsyncSession) -> datetime | None:
        """The earliest next attempt of a pending row (expired leases are reclaimed periodically)."""
        return await session.scalar(select(func.min(N.next_attempt_at)).where(N.state == S.pending))

    async def depth(self, session: AsyncSession) -> dict[str, int]:
        """Rows not finished, by state (one count per state, each over its partial index)."""
        return {
            state: int(await session.scalar(select(func.count()).select_from(T).where(N.state == state)) or 0)
            for state in ACTIVE
        }

    # ------------------------------------------------------------------------------------------
    # Decisions about one claimed row (pure: no I/O)

    def check_before_send(
        self,
        row: ClaimedRow,
        context: SendContext,
        now: datetime,
        throttled_until: datetime | None = None,
    ) -> Completion | None:
        """None when the row should be sent now; otherwise its new state without a send."""

        def finish(state: str, reason: str, next_at: datetime | None = None) -> Completion:
            return Completion(row.id, row.lease_token, state, row.attempts - 1, reason, next_attempt_at=next_at)

        if row.kind == K.reminder:
            space = context.spaces.get(row.space_id or "")
            if space is None:
                return finish(S.canceled, Reason.space_unknown)
            if space.state == SpaceState.canceled:
                return finish(S.canceled, Reason.space_canceled)
            started = space.state != SpaceState.scheduled or (
                space.scheduled_start is not None and space.scheduled_start <= now
            )
            if started or (row.expires_at is not None and row.expires_at <= now):
                return finish(S.expired, Reason.space_started)
        elif row.expires_at is not None and row.expires_at <= now:
            return finish(S.expired, Reason.too_old)

        if row.channel == "webhook":
            endpoint = context.endpoints.get(row.webhook_endpoint_id or "")
            if endpoint is None:
                return finish(S.failed, Reason.endpoint_deleted)
            if not endpoint.enabled:
                return finish(S.failed, f"webhook endpoint disabled: {endpoint.disabled_reason or 'no reason given'}")
            if row.kind not in endpoint.event_types:
                return finish(S.canceled, f"the webhook endpoint no longer accepts {row.kind}")
            until = endpoint.throttled_until
            if throttled_until is not None and (until is None or throttled_until > until):
                until = throttled_until
            if until is not None and until > now:
                if row.expires_at is not None and until >= row.expires_at:
                    reason = Reason.space_started if row.kind == K.reminder else Reason.too_old
                    return finish(S.expired, f"{reason} (endpoint throttled until {until.isoformat()})")
                return finish(S.pending, f"endpoint throttled until {until.isoformat()}", until)
        else:
            recipient = context.recipients.get(row.email_recipient_id or "")
            if recipient is None or recipient.unsubscribed_at is not None:
                if row.kind != K.confirmation:
                    return finish(S.canceled, Reason.unsubscribed)
            elif recipient.confirmed_at is None and row.kind != K.confirmation:
                return finish(S.held, Reason.unconfirmed, now + self.confirmation_deadline)
        return None

    def retry_delay(self, attempt: int) -> timedelta:
        """Exponential backoff with ±20 % jitter: 5 s, 10 s, 20 s, … capped at an hour."""
        base = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2 ** max(0, attempt - 1))
        return timedelta(seconds=base * random.uniform(0.8, 1.2))

    def after_attempt(
        self,
        row: ClaimedRow,
        outcome: str,
        error: str | None,
        sent_at: datetime,
        retry_after_seconds: float | None = None,
    ) -> Completion:
        """The row's new state after one send: delivered, retried later, or terminal."""
        if outcome == "delivered":
            lateness = sent_at - row.due_at
            late = lateness > self.late_after
            reason = f"delivered late, {lateness.total_seconds():.0f}s after its due time" if late else "delivered"
            return Completion(
                row.id, row.lease_token, S.delivered, row.attempts, reason, delivered_at=sent_at, late=late
            )
        error = error or outcome
        if outcome in ("failed", "gone"):
            return Completion(row.id, row.lease_token, S.failed, row.attempts, error, last_error=error)
        if row.attempts >= self.max_attempts:
            reason = f"gave up after {row.attempts} attempts: {error}"
            return Completion(row.id, row.lease_token, S.failed, row.attempts, reason, last_error=error)
        next_at = sent_at + self.retry_delay(row.attempts)
        if retry_after_seconds:
            next_at = max(next_at, sent_at + timedelta(seconds=retry_after_seconds))
        if row.expires_at is not None and next_at >= row.expires_at:
            what = Reason.space_started if row.kind == K.reminder else Reason.too_old
            reason = f"{what} (no time left for another attempt): {error}"
            return Completion(row.id, row.lease_token, S.expired, row.attempts, reason, last_error=error)
        return Completion(
            row.id, row.lease_token, S.pending, row.attempts, f"retrying: {error}", next_attempt_at=next_at,
            last_error=error,
        )


# What sending needs, read once per claimed batch; built once here (an `IN` list of any length binds
# to the expanding parameter), not per batch.
_IDS = bindparam("ids", expanding=True)
_SPACE_FACTS = (
    select(Space.id, Space.title, Space.state, Space.scheduled_start, Space.started_at, Space.creator_id, Creator.username)
    .outerjoin(Creator, Creator.id == Space.creator_id)
    .where(Space.id.in_(_IDS))
)
_ENDPOINT_FACTS = select(
    WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.secret, WebhookEndpoint.enabled,
    WebhookEndpoint.disabled_reason, WebhookEndpoint.throttled_until, WebhookEndpoint.failing_since,
    WebhookEndpoint.event_types,
).where(WebhookEndpoint.id.in_(_IDS))
_RECIPIENT_FACTS = select(
    EmailRecipient.id, EmailRecipient.address, EmailRecipient.timezone, EmailRecipient.confirmed_at,
    EmailRecipient.unsubscribed_at,
).where(EmailRecipient.id.in_(_IDS))
_SUBSCRIPTION_FACTS = select(
    Subscription.id, Subscription.target_kind, Subscription.creator_username, Subscription.keyword
).where(Subscription.id.in_(_IDS))


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return format_utc(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_json_default).encode


def space_json_of(space: SpaceFacts) -> str:
    """The Space object of webhook bodies, serialized once per claimed batch."""
    return _encode(space.data())


def webhook_body_head(kind: str, due_at: datetime, space_json: str) -> str:
    """Everything of a body before the subscription's own fields; shared by many rows of a batch."""
    return f'{{"type":{_encode(kind)},"timestamp":"{format_utc(due_at)}","data":{{"space":{space_json},'


def webhook_body(row: ClaimedRow, head: str) -> bytes:
    """The same bytes as `build_webhook_body(kind, due_at, webhook_data(...))`, from a prebuilt head."""
    if row.payload:
        rest: dict[str, Any] = {"subscription_id": row.subscription_id}
        if row.kind == K.reminder:
            rest["lead_time_minutes"] = row.lead_time_minutes
        rest.update(row.payload)
        return f"{head}{_encode(rest)[1:]}}}".encode()
    if row.kind == K.reminder:
        lead = row.lead_time_minutes
        return f'{head}"subscription_id":{_encode(row.subscription_id)},"lead_time_minutes":{lead}}}}}'.encode()
    return f'{head}"subscription_id":{_encode(row.subscription_id)}}}}}'.encode()


def webhook_data(row: ClaimedRow, space: dict[str, Any] | None) -> dict[str, Any]:
    """The `data` of a webhook body; `space` is `SpaceFacts.data()` of the Space row as it is now."""
    data: dict[str, Any] = {"space": space if space is not None else {"id": row.space_id}}
    data["subscription_id"] = row.subscription_id
    if row.kind == K.reminder:
        data["lead_time_minutes"] = row.lead_time_minutes
    if row.payload:
        data.update(row.payload)
    return data


def outbox_for(ctx: Any) -> ReminderOutbox:
    """The process's outbox (it caches the keyword index), kept in the AppContext's components."""
    outbox = ctx.components.get("reminder_outbox")
    if outbox is None:
        outbox = ctx.components["reminder_outbox"] = ReminderOutbox.from_settings(ctx.settings)
    return outbox


def wake_dispatcher_after_commit(session: AsyncSession, ctx: Any) -> None:
    """Poke this process's dispatcher once the session commits, so new rows are visible when it looks;
    on PostgreSQL also the workers of other processes, by a NOTIFY sent with the commit."""
    notify_on_commit(session, ctx)
    dispatcher = ctx.components.get("dispatcher")
    if dispatcher is None:
        return
    event.listen(session.sync_session, "after_commit", lambda _s: dispatcher.wake(), once=True)


def _sqlite_dt(value: datetime | None) -> str | None:
    """The text SQLAlchemy's SQLite DateTime stores (naive UTC), for rows passed as JSON."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = utc(value)
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _sqlite_dt_memo() -> Callable[[datetime | None], str | None]:
    """`_sqlite_dt` remembering its answers: the rows of a batch share a few times (those fired together)."""
    seen: dict[datetime, str | None] = {}

    def convert(value: datetime | None) -> str | None:
        if value is None:
            return None
        text = seen.get(value)
        if text is None:
            text = seen[value] = _sqlite_dt(value)
        return text

    return convert


_PG_COMPLETE_SQL = """
UPDATE notification AS n SET
    state = v.state,
    state_reason = v.reason,
    next_attempt_at = COALESCE(v.next_at, n.next_attempt_at),
    attempts = v.attempts,
    last_error = COALESCE(v.last_error, n.last_error),
    delivered_at = COALESCE(v.delivered_at, n.delivered_at),
    late = v.late,
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = :now
FROM unnest(
    CAST(:ids AS text[]), CAST(:tokens AS text[]), CAST(:states AS text[]), CAST(:reasons AS text[]),
    CAST(:next_ats AS timestamptz[]), CAST(:attempts AS int[]), CAST(:errors AS text[]),
    CAST(:delivered AS timestamptz[]), CAST(:late AS boolean[])
) AS v(id, token, state, reason, next_at, attempts, last_error, delivered_at, late)
WHERE n.id = ANY(CAST(:ids AS text[])) AND n.id = v.id AND n.lease_token = v.token
RETURNING n.id
"""
_PG_COMPLETE = text(_PG_COMPLETE_SQL).bindparams(bindparam("now", type_=UTCDateTime()))

# The PostgreSQL statements below reach rows through `id = ANY(<array>)` so the plan is primary-key
# probes whatever the table's size: a join against a CTE or `unnest()`, or `IN (subquery)`, is often
# planned as a hash join over a sequential scan of the whole table (every claim and every result
# batch then reads every row). The claim locks its rows in the ARRAY() subquery (an InitPlan,
# evaluated once), as the MATERIALIZED CTE did, and returns the facts of each row's Space and webhook
# endpoint (what `load_context` would read next): under load every round trip waits behind the event
# loop's HTTP work, and the claim's round trips bound the dispatcher's rate.
_PG_CLAIM = (
    text(
        """
WITH claimed AS (
    UPDATE notification SET
        state = :sending, lease_token = :token, lease_owner = :owner, lease_expires_at = :expires,
        attempts = attempts + 1, updated_at = :now
    WHERE id = ANY(ARRAY(
        SELECT id FROM notification
        WHERE state = :pending AND next_attempt_at <= :horizon
        ORDER BY next_attempt_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, account_id, subscription_id, space_id, kind, channel, webhook_endpoint_id, email_recipient_id,
        lead_time_minutes, space_revision, payload, due_at, next_attempt_at, expires_at, attempts
)
SELECT c.id, c.account_id, c.subscription_id, c.space_id, c.kind, c.channel, c.webhook_endpoint_id,
    c.email_recipient_id, c.lead_time_minutes, c.space_revision, c.payload, c.due_at, c.next_attempt_at,
    c.expires_at, c.attempts,
    s.id, s.title, s.state, s.scheduled_start, s.started_at, s.creator_id, cr.username,
    e.id, e.url, e.secret, e.enabled, e.disabled_reason, e.throttled_until, e.failing_since, e.event_types
FROM claimed AS c
LEFT JOIN space AS s ON s.id = c.space_id
LEFT JOIN creator AS cr ON cr.id = s.creator_id
LEFT JOIN webhook_endpoint AS e ON e.id = c.webhook_endpoint_id
"""
    )
    .bindparams(
        bindparam("horizon", type_=UTCDateTime()),
        bindparam("expires", type_=UTCDateTime()),
        bindparam("now", type_=UTCDateTime()),
    )
)

_PG_RECLAIM = text(
    """
UPDATE notification SET state = :pending, lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = :now
WHERE id = ANY(ARRAY(
    SELECT id FROM notification
    WHERE state = :sending AND lease_expires_at < :now
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
))
"""
).bindparams(bindparam("now", type_=UTCDateTime()))

_PG_INSERT = text(
    """
INSERT INTO notification (id, account_id, subscription_id, channel, webhook_endpoint_id, email_recipient_id,
    space_id, kind, lead_time_minutes, space_revision, payload, state, state_reason, due_at, next_attempt_at,
    expires_at, attempts, late, created_at, updated_at)
SELECT v.id, v.account_id, v.subscription_id, v.channel, v.webhook_endpoint_id, v.email_recipient_id,
    CAST(:space_id AS text), CAST(:kind AS text), CAST(:lead AS int), CAST(:revision AS int), CAST(:payload AS json),
    CAST(:state AS text), CAST(:state_reason AS text), CAST(:due_at AS timestamptz),
    CAST(:next_attempt_at AS timestamptz), CAST(:expires_at AS timestamptz), 0, false, CAST(:now AS timestamptz),
    CAST(:now AS timestamptz)
FROM unnest(CAST(:ids AS text[]), CAST(:account_ids AS text[]), CAST(:subscription_ids AS text[]),
    CAST(:channels AS text[]), CAST(:endpoint_ids AS text[]), CAST(:recipient_ids AS text[]))
    AS v(id, account_id, subscription_id, channel, webhook_endpoint_id, email_recipient_id)
ON CONFLICT DO NOTHING
"""
)

# `WHERE true`: without a WHERE clause SQLite would read `ON CONFLICT` as the start of a join constraint.
_SQLITE_INSERT = """
INSERT INTO notification (id, account_id, subscription_id, channel, webhook_endpoint_id, email_recipient_id,
    space_id, kind, lead_time_minutes, space_revision, payload, state, state_reason, due_at, next_attempt_at,
    expires_at, attempts, late, created_at, updated_at)
SELECT j.value ->> '$[0]', j.value ->> '$[1]', j.value ->> '$[2]', j.value ->> '$[3]', j.value ->> '$[4]',
    j.value ->> '$[5]', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?
FROM json_each(?) AS j WHERE true
ON CONFLICT DO NOTHING
"""


def _row_values(subs: Sequence[_Sub]) -> tuple[list[Any], ...]:
    """Per row of a batch: a new id, and the account, subscription, channel, webhook endpoint and email
    recipient of its subscription."""
    return (
        new_ids("ntf", len(subs)),
        [s.account_id for s in subs],
        [s.id for s in subs],
        ["webhook" if s.webhook_endpoint_id else "email" for s in subs],
        [s.webhook_endpoint_id for s in subs],
        [s.email_recipient_id for s in subs],
    )


def _insert_params(batch: _Batch, subs: Sequence[_Sub], now: datetime) -> dict[str, Any]:
    ids, accounts, sub_ids, channels, endpoints, recipients = _row_values(subs)
    return {
        "space_id": batch.space_id, "kind": batch.kind, "lead": batch.lead, "revision": batch.revision,
        "payload": batch.payload, "state": S.held if batch.hold else S.pending,
        "state_reason": Reason.unconfirmed if batch.hold else None, "due_at": batch.due,
        "next_attempt_at": batch.hold or batch.due, "expires_at": batch.expires, "now": now,
        "ids": ids, "account_ids": accounts, "subscription_ids": sub_ids, "channels": channels,
        "endpoint_ids": endpoints, "recipient_ids": recipients,
    }


def _sqlite_insert_params(batch: _Batch, subs: Sequence[_Sub], now: datetime) -> tuple[Any, ...]:
    """`_SQLITE_INSERT`'s parameters in SQLite's own formats (what the column types would bind)."""
    rows = json.dumps(list(zip(*_row_values(subs), strict=True)))
    return (
        batch.space_id, batch.kind, batch.lead, batch.revision, batch.payload, S.held if batch.hold else S.pending,
        Reason.unconfirmed if batch.hold else None, _sqlite_dt(batch.due), _sqlite_dt(batch.hold or batch.due),
        _sqlite_dt(batch.expires), _sqlite_dt(now), _sqlite_dt(now), rows,
    )


_SQLITE_COMPLETE = text(
    """
UPDATE notification SET
    state = v.state,
    state_reason = v.reason,
    next_attempt_at = COALESCE(v.next_at, notification.next_attempt_at),
    attempts = v.attempts,
    last_error = COALESCE(v.last_error, notification.last_error),
    delivered_at = COALESCE(v.delivered_at, notification.delivered_at),
    late = v.late,
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = :now
FROM (
    SELECT j.value ->> '$[0]' AS id, j.value ->> '$[1]' AS token, j.value ->> '$[2]' AS state,
           j.value ->> '$[3]' AS reason, j.value ->> '$[4]' AS next_at, j.value ->> '$[5]' AS attempts,
           j.value ->> '$[6]' AS last_error, j.value ->> '$[7]' AS delivered_at, j.value ->> '$[8]' AS late
    FROM json_each(:rows) AS j
) AS v
WHERE notification.id = v.id AND notification.lease_token = v.token
RETURNING notification.id
"""
).bindparams(bindparam("now", type_=UTCDateTime()))

_PG_ATTEMPTS_SQL = """
INSERT INTO delivery_attempt
    (notification_id, attempt, started_at, latency_ms, outcome, status_code, error, response_excerpt)
SELECT v.nid, v.attempt, v.started_at, v.latency_ms, v.outcome, v.status_code, v.error, v.excerpt
FROM unnest(
    CAST(:a_nids AS text[]), CAST(:a_attempts AS int[]), CAST(:a_started AS timestamptz[]),
    CAST(:a_latency AS float8[]), CAST(:a_outcomes AS text[]), CAST(:a_codes AS int[]), CAST(:a_errors AS text[]),
    CAST(:a_excerpts AS text[])
) AS v(nid, attempt, started_at, latency_ms, outcome, status_code, error, excerpt)
WHERE EXISTS (SELECT 1 FROM notification n WHERE n.id = v.nid AND n.id = ANY(CAST(:a_nids AS text[])))
"""
_PG_ATTEMPTS = text(_PG_ATTEMPTS_SQL)

# A batch of results in one statement: the UPDATE and the INSERT see the same snapshot, and neither
# needs the other's effects (the attempt log only needs the notification to exist).
_PG_COMPLETE_AND_LOG = text(
    f"WITH done AS ({_PG_COMPLETE_SQL}), logged AS ({_PG_ATTEMPTS_SQL}) SELECT id FROM done"
).bindparams(bindparam("now", type_=UTCDateTime()))


def _completion_arrays(chunk: Sequence[Completion], now: datetime) -> dict[str, Any]:
    return {
        "ids": [c.id for c in chunk],
        "tokens": [c.lease_token for c in chunk],
        "states": [c.state for c in chunk],
        "reasons": [_clean(c.reason, 300) for c in chunk],
        "next_ats": [c.next_attempt_at for c in chunk],
        "attempts": [c.attempts for c in chunk],
        "errors": [_clean(c.last_error, 2000) for c in chunk],
        "delivered": [c.delivered_at for c in chunk],
        "late": [c.late for c in chunk],
        "now": now,
    }


def _attempt_arrays(chunk: Sequence[AttemptRecord]) -> dict[str, Any]:
    return {
        "a_nids": [a.notification_id for a in chunk],
        "a_attempts": [a.attempt for a in chunk],
        "a_started": [a.started_at for a in chunk],
        "a_latency": [a.latency_ms for a in chunk],
        "a_outcomes": [a.outcome for a in chunk],
        "a_codes": [a.status_code for a in chunk],
        "a_errors": [_clean(a.error, 2000) for a in chunk],
        "a_excerpts": [_clean(a.response_excerpt, 1024) for a in chunk],
    }


_SQLITE_ATTEMPTS = text(
    """
INSERT INTO delivery_attempt
    (notification_id, attempt, started_at, latency_ms, outcome, status_code, error, response_excerpt)
SELECT j.value ->> '$[0]', j.value ->> '$[1]', j.value ->> '$[2]', j.value ->> '$[3]', j.value ->> '$[4]',
       j.value ->> '$[5]', j.value ->> '$[6]', j.value ->> '$[7]'
FROM json_each(:rows) AS j
WHERE EXISTS (SELECT 1 FROM notification n WHERE n.id = j.value ->> '$[0]')
"""
)

__all__ = [
    "ACTIVE",
    "AttemptRecord",
    "ClaimedBatch",
    "ClaimedRow",
    "Completion",
    "EndpointOutcome",
    "Reason",
    "ReminderOutbox",
    "SendContext",
    "outbox_for",
    "space_json_of",
    "wake_dispatcher_after_commit",
    "webhook_body",
    "webhook_body_head",
    "webhook_data",
]
