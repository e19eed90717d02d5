from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.core.context import AppContext
from app.delivery.models import Notification
from app.spaces.models import Space
from app.subscriptions.models import Subscription
from app.x.client import XClient
from app.x.sim import RunningSim
from tests.discovery.conftest import cycle, new_account, subscribe


async def test_username_resolving_later_gets_reminders_for_already_stored_spaces(
    ctx: AppContext, sim: RunningSim, xclient: XClient
) -> None:
    now = ctx.clock.now()
    creator = sim.state.add_user("late_resolver")
    space = sim.state.add_space(creator.id, "Already known", scheduled_start=now + timedelta(hours=3))
    async with ctx.db.write() as session:  # stored earlier (say, through a keyword), with no event left to fan out
        session.add(Space(id=space.id, creator_id=creator.id, title="Already known", state="scheduled",
                          scheduled_start=space.scheduled_start, host_ids=[creator.id], is_ticketed=False,
                          first_seen_at=now, last_seen_at=now, revision=1))
    account = await new_account(ctx)
    by_name = await subscribe(ctx, account, creator_username="late_resolver", lead_times=[30])
    assert by_name.target_status == "resolving"

    await cycle(ctx, xclient)

    async with ctx.db.session() as session:
        sub = await session.get(Subscription, by_name.id)
        assert sub is not None and sub.target_status == "active" and sub.creator_id == creator.id
        rows = list(await session.scalars(select(Notification).where(Notification.subscription_id == by_name.id)))
    assert [(n.kind, n.space_id, n.lead_time_minutes) for n in rows if n.kind == "space.reminder"] == [
        ("space.reminder", space.id, 30)
    ]
