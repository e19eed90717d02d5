"""The fan-out's bulk insert (one INSERT ... SELECT per batch: what the rows share bound once, the rest as
arrays on PostgreSQL and JSON on SQLite) stores exactly what an SQLAlchemy `insert(notification)` of the
same rows stores."""

from __future__ import annotations

import json
import re
from datetime import timedelta, timezone
from typing import Any

from sqlalchemy import delete, insert, text

from app.core.context import AppContext
from app.core.ids import new_id, new_ids
from app.delivery.models import EmailRecipient
from app.delivery.outbox import Reason, ReminderOutbox, T, _Batch, _Plan
from app.subscriptions.matching import SubscriptionRow
from tests.delivery.test_outbox import CREATOR, SPACE, add_endpoint, add_subscription, seed_account


async def test_bulk_insert_stores_what_sqlalchemy_stores(ctx: AppContext) -> None:
    from app.spaces.models import Creator, Space
    from app.subscriptions.models import Subscription

    account = await seed_account(ctx)
    endpoint = await add_endpoint(ctx, account, "http://127.0.0.1:9/hook")
    hooked = await add_subscription(ctx, account, webhook_endpoint_id=endpoint.id)
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        recipient = EmailRecipient(id=new_id("er"), account_id=account, address="ada@example.com", created_at=now)
        session.add(recipient)
        session.add(Creator(id=CREATOR, username="XDevelopers", username_lower="xdevelopers", resolved_at=now))
        session.add(
            Space(id=SPACE, creator_id=CREATOR, title="t", state="scheduled", scheduled_start=now + timedelta(days=1),
                  host_ids=[], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False)
        )
        await session.flush()
        mailed = Subscription(
            id=new_id("sub"), account_id=account, target_kind="creator", creator_id=CREATOR, target_status="active",
            email_recipient_id=recipient.id, lead_times=[15], event_types=["space.reminder"], created_at=now,
            updated_at=now,
        )
        session.add(mailed)
    # Both kinds of subscription the planner gets: an ORM entity, and a row as the fan-out loads it.
    mailed_row = SubscriptionRow(
        mailed.id, account, CREATOR, None, False, None, recipient.id, (15,), ("space.reminder",), False
    )
    other_zone = timezone(timedelta(hours=-5))
    payload = {"previous_scheduled_start": "2026-01-06T17:45:00+00:00", "ü": [1, None]}
    batches = {
        _Batch(SPACE, "space.reminder", 15, 1, now + timedelta(minutes=5, microseconds=7), now + timedelta(days=1),
               None, "null"): [hooked, mailed_row],
        _Batch(SPACE, "space.rescheduled", 0, 2, now, (now + timedelta(days=1)).astimezone(other_zone),
               now + timedelta(hours=72), json.dumps(payload)): [mailed_row],
    }

    def row(batch: _Batch, sub: Any) -> dict[str, Any]:
        """The row the planner means, as the column types bind it."""
        return {
            "id": new_id("ntf"), "account_id": sub.account_id, "subscription_id": sub.id, "space_id": batch.space_id,
            "kind": batch.kind, "lead_time_minutes": batch.lead, "space_revision": batch.revision,
            "channel": "webhook" if sub.webhook_endpoint_id else "email",
            "webhook_endpoint_id": sub.webhook_endpoint_id, "email_recipient_id": sub.email_recipient_id,
            "payload": json.loads(batch.payload), "state": "held" if batch.hold else "pending",
            "state_reason": Reason.unconfirmed if batch.hold else None, "due_at": batch.due,
            "next_attempt_at": batch.hold or batch.due, "expires_at": batch.expires, "attempts": 0, "late": False,
            "created_at": now, "updated_at": now,
        }

    async def stored() -> list[tuple[Any, ...]]:
        payload = "payload" if ctx.db.is_sqlite else "CAST(payload AS text)"
        async with ctx.db.session() as session:
            found = await session.execute(
                text(f"SELECT *, {payload} AS payload_text FROM notification ORDER BY kind, channel")
            )
            return [tuple(v for k, v in r._mapping.items() if k not in ("id", "payload")) for r in found]

    async with ctx.db.write() as session:
        await session.execute(insert(T), [row(b, sub) for b, subs in batches.items() for sub in subs])
    reference = await stored()
    async with ctx.db.write() as session:
        await session.execute(delete(T))

    async with ctx.db.write() as session:
        await ReminderOutbox()._execute(session, _Plan(inserts=batches), now)
        # A second insert of the same rows conflicts and is skipped, as ON CONFLICT DO NOTHING did.
        await ReminderOutbox()._execute(session, _Plan(inserts=batches), now)
    assert len(reference) == 3
    assert await stored() == reference
    async with ctx.db.session() as session:
        ids = list(await session.scalars(text("SELECT id FROM notification")))
    assert all(re.fullmatch(r"ntf_[0-9a-hjkmnp-tv-z]{26}", i) for i in ids)


def test_new_ids_have_the_layout_of_new_id() -> None:
    alphabet = re.compile(r"ntf_[0-9a-hjkmnp-tv-z]{26}")
    before = new_id("ntf")
    ids = new_ids("ntf", 10_000)
    after = new_id("ntf")
    assert len(set(ids)) == 10_000
    assert all(alphabet.fullmatch(i) for i in ids)
    assert len({i[:14] for i in ids}) == 1  # one millisecond for the lot
    assert before[:14] <= ids[0][:14] <= after[:14]
    assert new_ids("ntf", 0) == []
    # Every random char is uniform over the 32 of the alphabet (each holds 5 of the 80 random bits).
    assert len({c for i in ids for c in i[14:]}) == 32


async def test_a_big_fan_out_refreshes_the_planner_statistics(ctx: AppContext, monkeypatch: Any) -> None:
    """PostgreSQL only: after inserting ANALYZE_AFTER_ROWS rows or more, the fan-out runs ANALYZE in its
    transaction (SQLite has no statistics to go stale: nothing is run there)."""
    import app.delivery.outbox as outbox_module
    from app.spaces.models import Creator, Space, SpaceEvent

    monkeypatch.setattr(outbox_module, "ANALYZE_AFTER_ROWS", 3)
    account = await seed_account(ctx)
    endpoint = await add_endpoint(ctx, account, "http://127.0.0.1:9/hook")
    for _ in range(3):
        await add_subscription(ctx, account, webhook_endpoint_id=endpoint.id, lead_times=[15, 60])
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        session.add(Creator(id=CREATOR, username="XDevelopers", username_lower="xdevelopers", resolved_at=now))
        session.add(
            Space(id=SPACE, creator_id=CREATOR, title="t", state="scheduled", scheduled_start=now + timedelta(days=1),
                  host_ids=[], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False)
        )
        await session.flush()
        session.add(SpaceEvent(space_id=SPACE, kind="space.scheduled", revision=1, occurred_at=now,
                               scheduled_start=now + timedelta(days=1)))
    async with ctx.db.write() as session:
        assert await ReminderOutbox().fan_out_events(session, now) == 1
    async with ctx.db.session() as session:
        rows = await session.scalar(text("SELECT count(*) FROM notification WHERE kind = 'space.reminder'"))
        assert rows == 6
        if not ctx.db.is_sqlite:
            assert await session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'notification'")) >= 6
