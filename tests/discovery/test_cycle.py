"""What one cycle stores: Spaces, their revisions and events, creators and resolved usernames."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core.context import AppContext
from app.spaces.models import Creator, Space, SpaceEvent
from app.subscriptions.models import Subscription
from app.x.client import XClient
from app.x.sim import SimState
from tests.discovery.conftest import cycle, later, new_account, subscribe


async def events_of(ctx: AppContext, space_id: str) -> list[tuple[str, int]]:
    async with ctx.db.session() as session:
        rows = await session.scalars(select(SpaceEvent).where(SpaceEvent.space_id == space_id).order_by(SpaceEvent.id))
        return [(e.kind, e.revision) for e in rows]


async def space_row(ctx: AppContext, space_id: str) -> Space:
    async with ctx.db.session() as session:
        space = await session.get(Space, space_id)
        assert space is not None
        return space


async def test_new_scheduled_space_from_creator_and_keyword(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    alice = sim_state.add_user("alice", id="1001")
    bob = sim_state.add_user("bob", id="1002")
    mine = sim_state.add_space(alice.id, "Morning coffee", scheduled_start=later(ctx, hours=2), id="1AAAAAAAAAAAA")
    python = sim_state.add_space(bob.id, "Weekly PYTHON hangout", scheduled_start=later(ctx, hours=3), id="1BBBBBBBBBBBB")
    sim_state.add_space(bob.id, "Gardening", scheduled_start=later(ctx, hours=3), id="1CCCCCCCCCCCC")
    account = await new_account(ctx)
    by_creator = await subscribe(ctx, account, creator_id=alice.id)
    by_keyword = await subscribe(ctx, account, keyword="python")

    report = await cycle(ctx, xclient)

    assert report.stopped is None and report.errors == []
    assert sorted(report.events) == [(mine.id, "space.scheduled"), (python.id, "space.scheduled")]
    assert report.matched_subscriptions == {mine.id: [by_creator.id], python.id: [by_keyword.id]}
    stored = await space_row(ctx, mine.id)
    assert (stored.state, stored.revision, stored.creator_id, stored.title) == ("scheduled", 1, alice.id, "Morning coffee")
    assert stored.scheduled_start == mine.scheduled_start and stored.first_seen_at == report.started_at
    async with ctx.db.session() as session:
        assert (await session.get(Creator, alice.id)).username == "alice"  # type: ignore[union-attr]
        assert await session.get(Space, "1CCCCCCCCCCCC") is None
    assert await events_of(ctx, mine.id) == [("space.scheduled", 1)]

    again = await cycle(ctx, xclient)
    assert again.events == []
    assert (await space_row(ctx, mine.id)).last_seen_at == again.started_at
    assert await events_of(ctx, mine.id) == [("space.scheduled", 1)]


async def test_reschedule_then_cancel_by_state(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    alice = sim_state.add_user("alice", id="1001")
    first = later(ctx, hours=2)
    space = sim_state.add_space(alice.id, "Launch", scheduled_start=first, id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    await cycle(ctx, xclient)

    moved = first + timedelta(minutes=45)
    sim_state.reschedule(space.id, moved)
    report = await cycle(ctx, xclient)
    assert report.events == [(space.id, "space.rescheduled")]
    async with ctx.db.session() as session:
        event = await session.scalar(select(SpaceEvent).where(SpaceEvent.kind == "space.rescheduled"))
        assert event is not None
        assert (event.revision, event.previous_scheduled_start, event.scheduled_start) == (2, first, moved)
        assert event.fanned_out_at is None

    sim_state.cancel(space.id)  # gone_mode "state": lookups answer state=canceled
    report = await cycle(ctx, xclient)
    assert report.rechecked == [space.id]  # dropped from its creator's results, so looked up by id
    assert report.events == [(space.id, "space.canceled")]
    assert (await space_row(ctx, space.id)).state == "canceled"
    assert await events_of(ctx, space.id) == [("space.scheduled", 1), ("space.rescheduled", 2), ("space.canceled", 3)]

    quiet = await cycle(ctx, xclient)
    assert quiet.events == [] and quiet.rechecked == []


@pytest.mark.parametrize("how", ["cancel", "delete"])
async def test_gone_not_found_means_canceled(ctx: AppContext, sim_state: SimState, xclient: XClient, how: str) -> None:
    sim_state.configure(gone_mode="not_found")
    alice = sim_state.add_user("alice", id="1001")
    space = sim_state.add_space(alice.id, "Soon gone", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    await cycle(ctx, xclient)

    getattr(sim_state, how)(space.id)
    report = await cycle(ctx, xclient)
    assert report.rechecked == [space.id]
    assert report.events == [(space.id, "space.canceled")]
    assert (await space_row(ctx, space.id)).state == "canceled"


async def test_gone_not_canceled_when_setting_says_so(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    ctx.settings.x_gone_means_canceled = False
    sim_state.configure(gone_mode="not_found")
    alice = sim_state.add_user("alice", id="1001")
    space = sim_state.add_space(alice.id, "Maybe gone", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    await cycle(ctx, xclient)
    sim_state.cancel(space.id)
    report = await cycle(ctx, xclient)
    assert report.rechecked == [space.id] and report.events == []
    assert (await space_row(ctx, space.id)).state == "scheduled"


@pytest.mark.parametrize("gone_mode", ["state", "not_found"])
async def test_live_then_ended(ctx: AppContext, sim_state: SimState, xclient: XClient, gone_mode: str) -> None:
    sim_state.configure(gone_mode=gone_mode)  # type: ignore[arg-type]
    alice = sim_state.add_user("alice", id="1001")
    space = sim_state.add_space(alice.id, "Going live", scheduled_start=later(ctx, minutes=10), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    await cycle(ctx, xclient)

    sim_state.start(space.id)
    report = await cycle(ctx, xclient)
    assert report.events == [(space.id, "space.started")]
    stored = await space_row(ctx, space.id)
    assert stored.state == "live" and stored.started_at is not None and stored.revision == 2

    sim_state.end(space.id)
    report = await cycle(ctx, xclient)
    assert report.events == [(space.id, "space.ended")]
    stored = await space_row(ctx, space.id)
    assert stored.state == "ended" and stored.ended_at is not None and stored.revision == 3


async def test_keyword_space_going_live_is_told_apart_from_cancel(
    ctx: AppContext, sim_state: SimState, xclient: XClient
) -> None:
    """A scheduled-only search stops returning a Space once it is live; a lookup says it started."""
    bob = sim_state.add_user("bob", id="1002")
    space = sim_state.add_space(bob.id, "Rust meetup", scheduled_start=later(ctx, minutes=5), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), keyword="rust")
    await cycle(ctx, xclient)
    sim_state.start(space.id)
    report = await cycle(ctx, xclient)
    assert report.rechecked == [space.id]
    assert report.events == [(space.id, "space.started")]
    sim_state.end(space.id)
    # No search returns live Spaces for this keyword: the lookup of stale live Spaces finds the end.
    reports = [await cycle(ctx, xclient) for _ in range(3)]
    assert [e for r in reports for e in r.events] == [(space.id, "space.ended")]


async def test_brand_new_live_space_gets_started(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    carol = sim_state.add_user("carol", id="1003")
    await subscribe(ctx, await new_account(ctx), keyword="jazz", event_types=["space.reminder", "space.started"])
    await cycle(ctx, xclient)
    space = sim_state.add_space(carol.id, "Late night JAZZ", state="live", id="1AAAAAAAAAAAA")
    report = await cycle(ctx, xclient)
    assert report.events == [(space.id, "space.started")]
    kinds = {t.kind for t in report.polled}
    assert kinds == {"keyword", "keyword_live"}
    stored = await space_row(ctx, space.id)
    assert (stored.state, stored.revision, stored.scheduled_start) == ("live", 1, None)


async def test_username_resolution(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    dora = sim_state.add_user("Dora_X", id="1004")
    sim_state.add_user("shady", id="1005", suspended=True)
    space = sim_state.add_space(dora.id, "Dora talks", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    account = await new_account(ctx)
    found = await subscribe(ctx, account, creator_username="@dora_x")
    unknown = await subscribe(ctx, account, creator_username="nobody_here")
    suspended = await subscribe(ctx, account, creator_username="shady")
    assert found.target_status == "resolving"

    report = await cycle(ctx, xclient)

    assert report.settled_subscriptions == {
        found.id: "active", unknown.id: "unknown_username", suspended.id: "suspended"
    }
    # The resolved creator is polled in the same cycle.
    assert report.events == [(space.id, "space.scheduled")]
    async with ctx.db.session() as session:
        subs = {s.id: s for s in await session.scalars(select(Subscription))}
        assert (subs[found.id].creator_id, subs[found.id].target_status_detail) == (dora.id, None)
        assert subs[unknown.id].target_status_detail == "X has no user @nobody_here"
        assert subs[suspended.id].target_status_detail == "X reports @shady as suspended"
        assert (await session.get(Creator, dora.id)).username == "Dora_X"  # type: ignore[union-attr]
    assert report.calls["users_by"] == 1
    assert (await cycle(ctx, xclient)).calls.get("users_by", 0) == 0


async def test_partial_errors_keep_the_good_part(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    bob = sim_state.add_user("bob", id="1002")
    sim_state.add_space(bob.id, "Rust one", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), keyword="rust")
    body = {
        "data": [{"id": "1AAAAAAAAAAAA", "state": "scheduled", "title": "Rust one", "creator_id": bob.id,
                  "scheduled_start": "2026-03-02T13:00:00.000Z"}],
        "errors": [{"title": "Authorization Error", "detail": "Sorry, you are not authorized to see [x].",
                    "type": "https://api.twitter.com/2/problems/not-authorized-for-resource"}],
        "meta": {"result_count": 1},
    }
    sim_state.set_fault(200, body=body, endpoint="spaces_search")
    report = await cycle(ctx, xclient)
    assert report.events == [("1AAAAAAAAAAAA", "space.scheduled")]
    assert len(report.errors) == 1 and "Authorization Error" in report.errors[0]
