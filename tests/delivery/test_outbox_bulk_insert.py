"""The fan-out's bulk insert (unnest arrays on PostgreSQL, plain executemany on SQLite) stores exactly
what an SQLAlchemy `insert(notification)` of the same row dicts stores."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any

from sqlalchemy import insert, text

from app.core.context import AppContext
from app.delivery.outbox import _INSERT_COLUMNS, ReminderOutbox, T, _Plan
from tests.delivery.test_outbox import CREATOR, SPACE, add_endpoint, add_subscription, seed_account


async def test_bulk_insert_stores_what_sqlalchemy_stores(ctx: AppContext) -> None:
    account = await seed_account(ctx)
    endpoint = await add_endpoint(ctx, account, "http://127.0.0.1:9/hook")
    sub = await add_subscription(ctx, account, webhook_endpoint_id=endpoint.id)
    from app.spaces.models import Creator, Space

    now = ctx.clock.now()
    async with ctx.db.write() as session:
        session.add(Creator(id=CREATOR, username="XDevelopers", username_lower="xdevelopers", resolved_at=now))
        session.add(
            Space(id=SPACE, creator_id=CREATOR, title="t", state="scheduled", scheduled_start=now + timedelta(days=1),
                  host_ids=[], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False)
        )

    def row(i: int, **changes: Any) -> dict[str, Any]:
        values = {
            "id": f"ntf_bulk{i}", "account_id": account, "subscription_id": sub.id, "space_id": SPACE,
            "kind": "space.reminder", "lead_time_minutes": 1000 + i, "space_revision": 1, "channel": "webhook",
            "webhook_endpoint_id": endpoint.id, "email_recipient_id": None, "payload": None, "state": "pending",
            "state_reason": None, "due_at": now + timedelta(minutes=5, microseconds=7), "next_attempt_at": now,
            "expires_at": None, "attempts": 0, "late": False, "created_at": now, "updated_at": now,
        }
        values.update(changes)
        return values

    other_zone = timezone(timedelta(hours=-5))
    shapes = [
        {},
        {"payload": {"previous_scheduled_start": "2026-01-06T17:45:00+00:00", "ü": [1, None]}, "state": "held",
         "state_reason": "email address not confirmed", "late": True, "expires_at": now.astimezone(other_zone)},
    ]
    reference = [row(i, **shape) for i, shape in enumerate(shapes)]
    bulk = [row(i + 10, **shape) for i, shape in enumerate(shapes)]
    async with ctx.db.write() as session:
        await session.execute(insert(T), reference)
        await ReminderOutbox()._execute(session, _Plan(inserts=bulk), now)
        # A second insert of the same rows conflicts and is skipped, as ON CONFLICT DO NOTHING did.
        await ReminderOutbox()._execute(session, _Plan(inserts=bulk), now)

    columns = [c for c, _t in _INSERT_COLUMNS if c not in ("id", "lead_time_minutes")]
    select_list = ", ".join("CAST(payload AS text)" if c == "payload" and not ctx.db.is_sqlite else c for c in columns)
    async with ctx.db.session() as session:
        stored = [tuple(r) for r in await session.execute(text(f"SELECT {select_list} FROM notification ORDER BY id"))]
    assert len(stored) == 4
    by_id = dict(zip(["ntf_bulk0", "ntf_bulk1", "ntf_bulk10", "ntf_bulk11"], stored, strict=True))
    assert by_id["ntf_bulk10"] == by_id["ntf_bulk0"]
    assert by_id["ntf_bulk11"] == by_id["ntf_bulk1"]


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
