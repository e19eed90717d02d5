"""Tenant isolation over real HTTP, on SQLite and PostgreSQL: account A can neither read, change,
replay nor delete account B's objects, and no list shows A anything of B's.

Every refusal is a 404 problem that looks exactly like the one for an id that never existed, and
carries no trace of B's data. (The problem's `instance` echoes the path A asked for, which holds the
id A sent; that is A's own input, so it is compared to the path and left out of the trace search.)
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.core.context import AppContext
from app.delivery.models import Notification, WebhookEndpoint
from tests.delivery.test_outbox import CREATOR, SPACE, add_space

PROBLEM = "application/problem+json"
B_KEYWORD = "bravo-only keyword ☂ zebra"
B_EMAIL = "bravo.private@example.org"
B_TITLE = "Bravo's weekly zebra hangout"


@pytest.fixture
async def world(ctx: AppContext, other_client: httpx.AsyncClient) -> dict[str, Any]:
    """Account B's objects: a webhook endpoint (and its secret), a keyword and a creator subscription,
    an email subscription, the Space the creator subscription matches, and its reminder, failed (so
    that B could replay it)."""
    b = other_client
    await add_space(ctx, ctx.clock.now() + timedelta(hours=3), title=B_TITLE)
    r = await b.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/bravo-hook"})
    assert r.status_code == 201, r.text
    endpoint = r.json()
    keyword_sub = (await b.post(
        "/v1/subscriptions", json={"keyword": B_KEYWORD, "webhook_endpoint_id": endpoint["id"]}
    )).json()
    creator_sub = (await b.post(
        "/v1/subscriptions", json={"creator_id": CREATOR, "webhook_endpoint_id": endpoint["id"], "lead_times": [30]}
    )).json()
    email_sub = (await b.post("/v1/subscriptions", json={"keyword": "bravo mail", "email": B_EMAIL})).json()
    reminders = (await b.get("/v1/notifications", params={"subscription_id": creator_sub["id"]})).json()["data"]
    [notification] = [n for n in reminders if n["kind"] == "space.reminder"]
    async with ctx.db.write() as session:
        await session.execute(
            update(Notification).where(Notification.id == notification["id"]).values(
                state="failed", state_reason="HTTP 500 from the endpoint", attempts=3
            )
        )
    space = await b.get(f"/v1/spaces/{SPACE}")
    assert space.status_code == 200, space.text
    return {
        "endpoint": endpoint,
        "subscriptions": [keyword_sub, creator_sub, email_sub],
        "notification": notification,
        "space": space.json(),
    }


def traces(world: dict[str, Any]) -> list[str]:
    """Strings that must never reach account A."""
    subs = world["subscriptions"]
    return [
        world["endpoint"]["id"], world["endpoint"]["secret"], world["endpoint"]["url"],
        *(s["id"] for s in subs), B_KEYWORD, B_KEYWORD.split()[0], B_EMAIL, B_TITLE, "bravo",
        world["notification"]["id"],
    ]


def assert_no_trace(r: httpx.Response, world: dict[str, Any], *, path: str | None = None) -> None:
    body = r.json()
    if path is not None:
        assert body.pop("instance", None) == path
    text = json.dumps(body, ensure_ascii=False)
    leaked = [t for t in traces(world) if t.lower() in text.lower()]
    assert not leaked, (leaked, r.text)


def refused_like_a_missing_id(r: httpx.Response, missing: httpx.Response) -> None:
    """A 404 problem indistinguishable (but for the echoed path) from the answer for an unknown id."""
    assert r.status_code == 404, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM
    assert missing.status_code == 404
    strip = lambda p: {k: v for k, v in p.items() if k != "instance"}  # noqa: E731
    assert strip(r.json()) == strip(missing.json())


SUB_CALLS = [
    ("GET", "/v1/subscriptions/{}", {}),
    ("PATCH", "/v1/subscriptions/{}", {"json": {"paused": True, "lead_times": [5]}}),
    ("DELETE", "/v1/subscriptions/{}", {}),
]
ENDPOINT_CALLS = [
    ("GET", "/v1/webhook-endpoints/{}", {}),
    ("PATCH", "/v1/webhook-endpoints/{}", {"json": {"enabled": False, "event_types": ["space.ended"]}}),
    ("POST", "/v1/webhook-endpoints/{}/rotate-secret", {}),
    ("POST", "/v1/webhook-endpoints/{}/enable", {}),
    ("DELETE", "/v1/webhook-endpoints/{}", {}),
]
NOTIFICATION_CALLS = [
    ("GET", "/v1/notifications/{}", {}),
    ("POST", "/v1/notifications/{}/replay", {}),
]
SPACE_CALLS = [
    ("GET", "/v1/spaces/{}", {}),
    ("GET", "/v1/spaces/{}/events", {}),
]


async def test_a_cannot_read_change_replay_or_delete_bs_objects(
    ctx: AppContext, client: httpx.AsyncClient, other_client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    a, b = client, other_client
    endpoint, notification = world["endpoint"], world["notification"]
    targets = [
        *((SUB_CALLS, sub["id"], "sub_01jzzzzzzzzzzzzzzzzzzzzzzz") for sub in world["subscriptions"]),
        (ENDPOINT_CALLS, endpoint["id"], "we_01jzzzzzzzzzzzzzzzzzzzzzzz"),
        (NOTIFICATION_CALLS, notification["id"], "ntf_01jzzzzzzzzzzzzzzzzzzzzzzz"),
        (SPACE_CALLS, SPACE, "1ZZZZZZZZZZZZ"),
    ]
    for calls, b_id, unknown_id in targets:
        for method, template, kwargs in calls:
            path = template.format(b_id)
            r = await a.request(method, path, **kwargs)
            missing = await a.request(method, template.format(unknown_id), **kwargs)
            refused_like_a_missing_id(r, missing)
            assert_no_trace(r, world, path=path)

    # B's objects are as B left them.
    for sub in world["subscriptions"]:
        got = await b.get(f"/v1/subscriptions/{sub['id']}")
        assert got.status_code == 200 and got.json() == sub
    got_endpoint = (await b.get(f"/v1/webhook-endpoints/{endpoint['id']}")).json()
    assert got_endpoint == {k: v for k, v in endpoint.items() if k != "secret"}
    async with ctx.db.session() as session:
        stored = await session.get(WebhookEndpoint, endpoint["id"])
        assert stored is not None and stored.secret == endpoint["secret"]  # rotate-secret did nothing
    got_notification = (await b.get(f"/v1/notifications/{notification['id']}")).json()
    assert (got_notification["state"], got_notification["attempts"]) == ("failed", 3)
    # ...and B itself may replay it: A's 404 was isolation, not a notification that cannot be replayed.
    replayed = await b.post(f"/v1/notifications/{notification['id']}/replay")
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["state"] == "pending"


async def test_lists_and_filters_never_show_bs_objects(
    ctx: AppContext, client: httpx.AsyncClient, other_client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    a = client
    endpoint = world["endpoint"]
    # A has objects of its own, so the lists below are not empty by accident.
    mine = (await a.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/alpha"})).json()
    my_sub = (await a.post("/v1/subscriptions", json={"keyword": "alpha topic", "webhook_endpoint_id": mine["id"]})).json()

    for path, params in [
        ("/v1/subscriptions", {}),
        ("/v1/subscriptions", {"keyword": B_KEYWORD}),
        ("/v1/subscriptions", {"webhook_endpoint_id": endpoint["id"]}),
        ("/v1/subscriptions", {"creator_id": CREATOR}),
        ("/v1/subscriptions", {"target_kind": "creator"}),
        ("/v1/webhook-endpoints", {}),
        ("/v1/notifications", {}),
        ("/v1/notifications", {"subscription_id": world["subscriptions"][1]["id"]}),
        ("/v1/notifications", {"space_id": SPACE}),
        ("/v1/notifications", {"state": "failed"}),
        ("/v1/spaces", {}),
        ("/v1/spaces", {"creator_id": CREATOR}),
        ("/v1/spaces", {"keyword": "zebra"}),
    ]:
        r = await a.get(path, params=params)
        assert r.status_code == 200, (path, params, r.text)
        assert_no_trace(r, world)
        ids = {item["id"] for item in r.json()["data"]}
        assert ids <= {mine["id"], my_sub["id"]}, (path, params, ids)

    assert [e["id"] for e in (await a.get("/v1/webhook-endpoints")).json()["data"]] == [mine["id"]]
    assert [s["id"] for s in (await a.get("/v1/subscriptions")).json()["data"]] == [my_sub["id"]]
    # Walking every page with a limit of 1 shows nothing more.
    seen, cursor = [], None
    while True:
        page = (await a.get("/v1/subscriptions", params={"limit": 1} | ({"cursor": cursor} if cursor else {}))).json()
        seen += [s["id"] for s in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == [my_sub["id"]]


async def test_a_cannot_use_bs_endpoint_or_idempotency_keys(
    client: httpx.AsyncClient, other_client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    a, b = client, other_client
    stolen = await a.post("/v1/subscriptions", json={"keyword": "x", "webhook_endpoint_id": world["endpoint"]["id"]})
    assert stolen.status_code == 422 and stolen.json()["invalid_params"][0]["name"] == "body.webhook_endpoint_id"
    assert_no_trace(stolen, world, path="/v1/subscriptions")

    # Idempotency keys are per account: the same key and body from A is a new request, not B's replay.
    body = {"keyword": "shared words", "email": "someone@example.com"}
    b_first = await b.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "same-key"})
    assert b_first.status_code == 201
    a_same = await a.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "same-key"})
    assert a_same.status_code == 201 and "idempotent-replayed" not in a_same.headers
    assert a_same.json()["id"] != b_first.json()["id"]
    a_other = await a.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/a"}, headers={"Idempotency-Key": "same-key"}
    )
    assert a_other.status_code == 422  # A's own earlier use of the key, not B's, decides
    b_again = await b.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "same-key"})
    assert b_again.json() == b_first.json() and b_again.headers["idempotent-replayed"] == "true"


async def test_spaces_are_visible_only_through_ones_own_subscriptions(
    client: httpx.AsyncClient, other_client: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    a = client
    assert (await a.get(f"/v1/spaces/{SPACE}")).status_code == 404
    # A subscription that does not match the Space changes nothing.
    await a.post("/v1/subscriptions", json={"keyword": "unrelated", "email": "a@example.com"})
    assert (await a.get(f"/v1/spaces/{SPACE}")).status_code == 404
    assert (await a.get("/v1/spaces")).json()["data"] == []

    # Once A subscribes to the creator itself, A sees the Space, with only A's subscription ids.
    mine = (await a.post("/v1/subscriptions", json={"creator_id": CREATOR, "email": "a@example.com"})).json()
    got = await a.get(f"/v1/spaces/{SPACE}")
    assert got.status_code == 200
    assert got.json()["matched_subscription_ids"] == [mine["id"]]
    listed = (await a.get("/v1/spaces")).json()["data"]
    assert [s["matched_subscription_ids"] for s in listed] == [[mine["id"]]]
    for r in (got, await a.get("/v1/spaces")):
        text = r.text
        assert all(s["id"] not in text for s in world["subscriptions"])
    # B's view is untouched by A's subscription.
    b_view = (await other_client.get(f"/v1/spaces/{SPACE}")).json()
    assert mine["id"] not in b_view["matched_subscription_ids"]
    assert b_view["matched_subscription_ids"] == world["space"]["matched_subscription_ids"]
