"""GET /v1/spaces after discovery cycles against the simulator, over real HTTP, on both databases."""

from __future__ import annotations

from datetime import timedelta

import httpx

from app.core.context import AppContext
from app.x.client import XClient
from app.x.sim import RunningSim, SimState
from tests.discovery.conftest import cycle, later

PROBLEM = "application/problem+json"


async def subscribe(client: httpx.AsyncClient, **target: object) -> dict:
    r = await client.post("/v1/subscriptions", json={"email": "ada@example.com", **target})
    assert r.status_code == 201, r.text
    return r.json()


def world(ctx: AppContext, sim_state: SimState) -> dict[str, str]:
    alice = sim_state.add_user("alice", id="1001")
    bob = sim_state.add_user("bob", id="1002")
    sim_state.add_user("carol", id="1003")
    sim_state.add_space(alice.id, "Alice late", scheduled_start=later(ctx, hours=5), id="1ALATE0000000")
    sim_state.add_space(alice.id, "Alice early", scheduled_start=later(ctx, hours=1), id="1AEARLY000000")
    sim_state.add_space(bob.id, "Café PYTHON ☕", scheduled_start=later(ctx, hours=3), id="1BPYTHON00000", lang="fr")
    sim_state.add_space(bob.id, "Gardening", scheduled_start=later(ctx, hours=2), id="1BGARDEN00000")
    sim_state.add_space("1003", "Python with carol", scheduled_start=later(ctx, hours=4), id="1CPYTHON00000",
                        host_ids=["1001"])
    return {"alice": alice.id, "bob": bob.id}


async def test_creator_and_keyword_subscriptions_see_their_spaces_after_one_cycle(
    ctx: AppContext, client: httpx.AsyncClient, other_client: httpx.AsyncClient, sim_state: SimState, xclient: XClient
) -> None:
    ids = world(ctx, sim_state)
    by_creator = await subscribe(client, creator_id=ids["alice"])
    by_keyword = await subscribe(client, keyword="python")
    assert (await client.get("/v1/spaces")).json() == {"data": [], "next_cursor": None}

    await cycle(ctx, xclient)

    body = (await client.get("/v1/spaces")).json()
    assert [s["id"] for s in body["data"]] == ["1AEARLY000000", "1BPYTHON00000", "1CPYTHON00000", "1ALATE0000000"]
    assert body["next_cursor"] is None
    early = body["data"][0]
    assert early == {
        "id": "1AEARLY000000", "title": "Alice early", "state": "scheduled",
        "scheduled_start": "2026-03-02T13:00:00Z", "started_at": None, "ended_at": None,
        "creator_id": "1001", "creator_username": "alice", "lang": "en", "host_ids": ["1001"],
        "url": "https://x.com/i/spaces/1AEARLY000000", "revision": 1,
        "first_seen_at": "2026-03-02T12:00:00Z", "last_seen_at": "2026-03-02T12:00:00Z",
        "matched_subscription_ids": [by_creator["id"]],
    }
    assert body["data"][1]["matched_subscription_ids"] == [by_keyword["id"]]
    assert body["data"][1]["creator_username"] == "bob" and body["data"][1]["lang"] == "fr"

    got = await client.get("/v1/spaces/1BPYTHON00000")
    assert got.status_code == 200 and got.json() == body["data"][1]
    # Another tenant sees none of it, and cannot tell a Space exists.
    assert (await other_client.get("/v1/spaces")).json()["data"] == []
    hidden = await other_client.get("/v1/spaces/1BPYTHON00000")
    assert hidden.status_code == 404 and hidden.headers["content-type"] == PROBLEM
    assert (await client.get("/v1/spaces/1BGARDEN00000")).status_code == 404  # nobody asked for it
    assert (await client.get("/v1/spaces/1NOSUCHSPACE0")).status_code == 404


async def test_include_hosts_and_filters_and_pagination(
    ctx: AppContext, client: httpx.AsyncClient, sim_state: SimState, xclient: XClient
) -> None:
    ids = world(ctx, sim_state)
    hosts = await subscribe(client, creator_id=ids["alice"], include_hosts=True)
    await subscribe(client, keyword="python")
    await cycle(ctx, xclient)

    def listed(r: httpx.Response) -> list[str]:
        assert r.status_code == 200, r.text
        return [s["id"] for s in r.json()["data"]]

    carol = (await client.get("/v1/spaces/1CPYTHON00000")).json()
    assert hosts["id"] in carol["matched_subscription_ids"] and len(carol["matched_subscription_ids"]) == 2
    assert listed(await client.get("/v1/spaces", params={"creator_id": "1001"})) == ["1AEARLY000000", "1ALATE0000000"]
    assert listed(await client.get("/v1/spaces", params={"creator_username": "@BOB"})) == ["1BPYTHON00000"]
    assert listed(await client.get("/v1/spaces", params={"creator_username": "nobody"})) == []
    assert listed(await client.get("/v1/spaces", params={"keyword": "café"})) == ["1BPYTHON00000"]
    window = {"starts_after": later(ctx, hours=2).isoformat(), "starts_before": later(ctx, hours=4, minutes=1).isoformat()}
    assert listed(await client.get("/v1/spaces", params=window)) == ["1BPYTHON00000", "1CPYTHON00000"]
    assert listed(await client.get("/v1/spaces", params={"state": "live"})) == []

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/spaces", params=params)).json()
        seen += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["1AEARLY000000", "1BPYTHON00000", "1CPYTHON00000", "1ALATE0000000"]

    bad = await client.get("/v1/spaces", params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["invalid_params"][0]["name"] == "query.cursor"
    backwards = await client.get("/v1/spaces", params={"starts_after": window["starts_before"],
                                                        "starts_before": window["starts_after"]})
    assert backwards.status_code == 422
    assert (await client.get("/v1/spaces", params={"state": "gone"})).status_code == 422
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anonymous:
        assert (await anonymous.get("/v1/spaces")).status_code == 401


async def test_events_of_a_space_and_state_filter(
    ctx: AppContext, client: httpx.AsyncClient, sim: RunningSim, sim_state: SimState, xclient: XClient
) -> None:
    ids = world(ctx, sim_state)
    await subscribe(client, creator_id=ids["alice"])
    await cycle(ctx, xclient)
    async with httpx.AsyncClient(base_url=sim.base_url) as admin:  # the simulator's admin API
        moved = (ctx.clock.now() + timedelta(minutes=90)).isoformat()
        r = await admin.post("/_sim/spaces/1AEARLY000000/reschedule", json={"scheduled_start": moved})
        assert r.status_code == 200, r.text
        await cycle(ctx, xclient)
        assert (await admin.post("/_sim/spaces/1AEARLY000000/cancel")).status_code == 200
        await cycle(ctx, xclient)

    events = (await client.get("/v1/spaces/1AEARLY000000/events")).json()
    assert [(e["kind"], e["revision"]) for e in events["data"]] == [
        ("space.scheduled", 1), ("space.rescheduled", 2), ("space.canceled", 3)
    ]
    assert events["data"][1]["previous_scheduled_start"] == "2026-03-02T13:00:00Z"
    assert events["data"][1]["scheduled_start"] == "2026-03-02T13:30:30Z"
    paged = (await client.get("/v1/spaces/1AEARLY000000/events", params={"limit": 2})).json()
    assert len(paged["data"]) == 2 and paged["next_cursor"]
    rest = (await client.get("/v1/spaces/1AEARLY000000/events", params={"cursor": paged["next_cursor"]})).json()
    assert [e["kind"] for e in rest["data"]] == ["space.canceled"]

    upcoming = [s["id"] for s in (await client.get("/v1/spaces")).json()["data"]]
    assert upcoming == ["1ALATE0000000"]
    canceled = (await client.get("/v1/spaces", params={"state": "canceled"})).json()["data"]
    assert [(s["id"], s["state"], s["revision"]) for s in canceled] == [("1AEARLY000000", "canceled", 3)]
    assert (await client.get("/v1/spaces/1BGARDEN00000/events")).status_code == 404


async def test_username_resolution_is_visible_on_the_subscription(
    ctx: AppContext, client: httpx.AsyncClient, sim_state: SimState, xclient: XClient
) -> None:
    world(ctx, sim_state)
    sim_state.add_user("Banned_One", id="1009", suspended=True)
    found = await subscribe(client, creator_username="ALICE")
    unknown = await subscribe(client, creator_username="no_such_user")
    suspended = await subscribe(client, creator_username="banned_one")
    assert found["target"]["status"] == "resolving"

    await cycle(ctx, xclient)

    target = (await client.get(f"/v1/subscriptions/{found['id']}")).json()["target"]
    assert (target["status"], target["creator_id"], target["status_detail"]) == ("active", "1001", None)
    target = (await client.get(f"/v1/subscriptions/{unknown['id']}")).json()["target"]
    assert (target["status"], target["status_detail"]) == ("unknown_username", "X has no user @no_such_user")
    target = (await client.get(f"/v1/subscriptions/{suspended['id']}")).json()["target"]
    assert (target["status"], target["status_detail"]) == ("suspended", "X reports @banned_one as suspended")
    # Resolved and polled in the same cycle: Alice's Spaces are listed.
    assert [s["id"] for s in (await client.get("/v1/spaces")).json()["data"]] == ["1AEARLY000000", "1ALATE0000000"]
    # A later subscription to the same (now known) user is active at once.
    again = await subscribe(client, creator_username="alice")
    assert again["target"]["status"] == "active" and again["target"]["creator_id"] == "1001"
