from __future__ import annotations

import asyncio

import httpx
import pytest

PROBLEM = "application/problem+json"


async def make_endpoint(client: httpx.AsyncClient, url: str = "http://127.0.0.1:9/hook") -> dict:
    r = await client.post("/v1/webhook-endpoints", json={"url": url, "event_types": ["space.reminder"]})
    assert r.status_code == 201, r.text
    return r.json()


async def test_webhook_endpoint_lifecycle(client: httpx.AsyncClient) -> None:
    created = await make_endpoint(client)
    assert created["id"].startswith("we_")
    assert created["secret"].startswith("whsec_")
    assert created["event_types"] == ["space.reminder"]

    got = (await client.get(f"/v1/webhook-endpoints/{created['id']}")).json()
    assert "secret" not in got
    assert got["url"] == "http://127.0.0.1:9/hook"

    listed = (await client.get("/v1/webhook-endpoints")).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert all("secret" not in e for e in listed["data"])

    rotated = (await client.post(f"/v1/webhook-endpoints/{created['id']}/rotate-secret")).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]

    disabled = (await client.patch(f"/v1/webhook-endpoints/{created['id']}", json={"enabled": False})).json()
    assert disabled["enabled"] is False and disabled["disabled_reason"]
    enabled = (await client.post(f"/v1/webhook-endpoints/{created['id']}/enable")).json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None

    assert (await client.delete(f"/v1/webhook-endpoints/{created['id']}")).status_code == 204
    assert (await client.get(f"/v1/webhook-endpoints/{created['id']}")).status_code == 404


async def test_keyword_subscription_create_get_list(client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    r = await client.post(
        "/v1/subscriptions",
        json={"keyword": "  Python   Async 🐍 ", "webhook_endpoint_id": endpoint["id"], "lead_times": [15, 60, 15]},
    )
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["id"].startswith("sub_")
    assert sub["target"] == {
        "kind": "keyword", "creator_id": None, "creator_username": None, "keyword": "Python Async 🐍",
        "include_hosts": False, "status": "active", "status_detail": None,
    }
    assert sub["lead_times"] == [60, 15]
    assert sub["delivery"]["channel"] == "webhook"
    assert sub["event_types"] == ["space.reminder", "space.rescheduled", "space.canceled"]

    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json() == sub
    listed = (await client.get("/v1/subscriptions", params={"keyword": "python async 🐍"})).json()
    assert [s["id"] for s in listed["data"]] == [sub["id"]]
    assert (await client.get("/v1/subscriptions", params={"keyword": "other"})).json()["data"] == []


async def test_creator_subscriptions_by_id_and_username_with_email(client: httpx.AsyncClient) -> None:
    by_id = await client.post("/v1/subscriptions", json={"creator_id": "2244994945", "email": "Ada@Example.COM"})
    assert by_id.status_code == 201, by_id.text
    body = by_id.json()
    assert body["target"]["status"] == "active"
    assert body["delivery"] == {
        "channel": "email", "webhook_endpoint_id": None, "email": "Ada@example.com", "email_confirmed": False,
    }
    by_name = await client.post("/v1/subscriptions", json={"creator_username": "@XDevelopers", "email": "ada@example.com"})
    assert by_name.status_code == 201, by_name.text
    target = by_name.json()["target"]
    assert target["creator_username"] == "XDevelopers"
    assert target["creator_id"] is None and target["status"] == "resolving"

    creators = (await client.get("/v1/subscriptions", params={"target_kind": "creator"})).json()["data"]
    assert len(creators) == 2
    named = (await client.get("/v1/subscriptions", params={"creator_username": "xdevelopers"})).json()["data"]
    assert [s["id"] for s in named] == [by_name.json()["id"]]


async def test_patch_and_delete(client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    sub = (await client.post("/v1/subscriptions", json={"keyword": "ai", "webhook_endpoint_id": endpoint["id"]})).json()
    patched = await client.patch(
        f"/v1/subscriptions/{sub['id']}", json={"lead_times": [30, 5], "paused": True, "event_types": ["space.started"]}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["lead_times"] == [30, 5]
    assert patched.json()["paused"] is True
    assert patched.json()["event_types"] == ["space.started"]
    bad = await client.patch(f"/v1/subscriptions/{sub['id']}", json={"lead_times": []})
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
    assert (await client.delete(f"/v1/subscriptions/{sub['id']}")).status_code == 204
    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).status_code == 404


async def test_cursor_pagination_walks_every_item_once(client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    ids = []
    for i in range(7):
        r = await client.post("/v1/subscriptions", json={"keyword": f"topic {i}", "webhook_endpoint_id": endpoint["id"]})
        ids.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/v1/subscriptions", params=params)).json()
        seen += [s["id"] for s in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    assert pages == 3
    bad = await client.get("/v1/subscriptions", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422
    assert bad.json()["invalid_params"][0]["name"] == "query.cursor"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"keyword": "   ", "email": "a@example.com"}, "body.keyword"),
        ({"keyword": "x" * 513, "email": "a@example.com"}, "body.keyword"),
        ({"creator_username": "has space", "email": "a@example.com"}, "body.creator_username"),
        ({"creator_username": "sixteen_chars_xx", "email": "a@example.com"}, "body.creator_username"),
        ({"creator_id": "12ab", "email": "a@example.com"}, "body.creator_id"),
        ({"creator_id": "12345678901234567890", "email": "a@example.com"}, "body.creator_id"),
        ({"keyword": "ai", "email": "not-an-address"}, "body.email"),
        ({"keyword": "ai", "email": "a@example.com", "lead_times": [0]}, "body.lead_times.0"),
        ({"keyword": "ai", "email": "a@example.com", "lead_times": [20161]}, "body.lead_times.0"),
        ({"keyword": "ai", "email": "a@example.com", "lead_times": [1, 2, 3, 4, 5, 6]}, "body.lead_times"),
        ({"keyword": "ai", "email": "a@example.com", "event_types": ["space.exploded"]}, "body.event_types.0"),
        ({"keyword": "ai", "email": "a@example.com", "email_timezone": "Mars/Olympus"}, "body.email_timezone"),
        ({"keyword": "ai", "email": "a@example.com", "surprise": 1}, "body.surprise"),
        ({"keyword": "ai", "creator_id": "1", "email": "a@example.com"}, "body"),
        ({"keyword": "ai"}, "body"),
    ],
)
async def test_bad_subscription_bodies_get_problem_json_naming_the_field(
    client: httpx.AsyncClient, body: dict, field: str
) -> None:
    r = await client.post("/v1/subscriptions", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == 422 and problem["type"].endswith("/validation")
    assert field in [p["name"] for p in problem["invalid_params"]], problem
    assert problem["detail"]


async def test_unknown_endpoint_in_subscription_is_422_naming_it(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/subscriptions", json={"keyword": "ai", "webhook_endpoint_id": "we_nope"})
    assert r.status_code == 422
    assert r.json()["invalid_params"][0]["name"] == "body.webhook_endpoint_id"


async def test_malformed_json_and_oversized_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/subscriptions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    big = await client.post("/v1/subscriptions", json={"keyword": "x" * 70000, "email": "a@example.com"})
    assert big.status_code == 413 and big.headers["content-type"] == PROBLEM


async def test_idempotency_key_replays_and_refuses_other_body(client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    body = {"keyword": "rust", "webhook_endpoint_id": endpoint["id"]}
    first = await client.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "k-1"})
    again = await client.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert len((await client.get("/v1/subscriptions")).json()["data"]) == 1
    other = await client.post(
        "/v1/subscriptions", json=body | {"keyword": "go"}, headers={"Idempotency-Key": "k-1"}
    )
    assert other.status_code == 422
    assert other.json()["type"].endswith("/idempotency-key-reused")


async def test_concurrent_idempotent_posts_create_one_subscription(client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    body = {"keyword": "zig", "webhook_endpoint_id": endpoint["id"]}
    results = await asyncio.gather(
        *[client.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "same"}) for _ in range(4)]
    )
    created = {r.json().get("id") for r in results if r.status_code == 201}
    assert len(created) == 1
    assert all(r.status_code in (201, 409) for r in results), [r.status_code for r in results]
    assert len((await client.get("/v1/subscriptions")).json()["data"]) == 1


async def test_tenant_isolation(client: httpx.AsyncClient, other_client: httpx.AsyncClient) -> None:
    endpoint = await make_endpoint(client)
    sub = (await client.post("/v1/subscriptions", json={"keyword": "mine", "webhook_endpoint_id": endpoint["id"]})).json()
    for method, path, kwargs in [
        ("GET", f"/v1/subscriptions/{sub['id']}", {}),
        ("PATCH", f"/v1/subscriptions/{sub['id']}", {"json": {"paused": True}}),
        ("DELETE", f"/v1/subscriptions/{sub['id']}", {}),
        ("GET", f"/v1/webhook-endpoints/{endpoint['id']}", {}),
        ("POST", f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret", {}),
        ("DELETE", f"/v1/webhook-endpoints/{endpoint['id']}", {}),
    ]:
        r = await other_client.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path, r.status_code)
        assert "mine" not in r.text and endpoint["secret"] not in r.text
    assert (await other_client.get("/v1/subscriptions")).json()["data"] == []
    stolen = await other_client.post("/v1/subscriptions", json={"keyword": "x", "webhook_endpoint_id": endpoint["id"]})
    assert stolen.status_code == 422
    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["paused"] is False


async def test_subscription_limit_per_account(api, ctx) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import create_account

    ctx.settings.max_subscriptions_per_account = 2
    key = await create_account(ctx)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(2):
            assert (await http.post("/v1/subscriptions", json={"keyword": f"k{i}", "email": "a@example.com"})).status_code == 201
        r = await http.post("/v1/subscriptions", json={"keyword": "k3", "email": "a@example.com"})
        assert r.status_code == 409 and r.json()["type"].endswith("/limit-reached")


async def test_idempotency_records_are_forgotten_after_a_day(client: httpx.AsyncClient, ctx) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from app.core.idempotency import purge_old_records

    body = {"keyword": "kept", "email": "a@example.com"}
    first = await client.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "day"})
    async with ctx.db.write() as session:
        assert await purge_old_records(session, ctx.clock.now() + timedelta(hours=23)) == 0
        assert await purge_old_records(session, ctx.clock.now() + timedelta(hours=25)) == 1
    again = await client.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": "day"})
    assert again.status_code == 201 and again.json()["id"] != first.json()["id"]


async def test_every_subscription_document_is_exactly_what_its_schema_says(client: httpx.AsyncClient) -> None:
    """The routes build documents by hand (cheaper than models); each must equal what SubscriptionOut makes of it."""
    from app.core.pagination import Page
    from app.subscriptions.schemas import SubscriptionOut

    endpoint = await make_endpoint(client)
    bodies = [
        {"keyword": "Rust", "webhook_endpoint_id": endpoint["id"], "lead_times": [5]},
        {"creator_id": "2244994945", "include_hosts": True, "webhook_endpoint_id": endpoint["id"]},
        {"creator_username": "@nobody_known", "email": "ada@example.com", "lead_times": [60, 1440]},
    ]
    documents = []
    for body in bodies:
        r = await client.post("/v1/subscriptions", json=body)
        assert r.status_code == 201, r.text
        documents.append(r.json())
    patched = await client.patch(f"/v1/subscriptions/{documents[0]['id']}", json={"paused": True})
    assert patched.status_code == 200 and patched.json()["paused"] is True
    documents[0] = patched.json()
    for document in documents:
        assert SubscriptionOut.model_validate(document).model_dump(mode="json") == document
        assert (await client.get(f"/v1/subscriptions/{document['id']}")).json() == document
        assert document["created_at"].endswith("Z")
    listed = (await client.get("/v1/subscriptions", params={"limit": 2})).json()
    assert Page[SubscriptionOut].model_validate(listed).model_dump(mode="json") == listed
    rest = (await client.get("/v1/subscriptions", params={"cursor": listed["next_cursor"]})).json()
    assert listed["data"] + rest["data"] == documents
    email = documents[2]["delivery"]
    assert email == {"channel": "email", "webhook_endpoint_id": None, "email": "ada@example.com", "email_confirmed": False}


async def test_list_filters_each_alone_and_combined(client: httpx.AsyncClient) -> None:
    one = await make_endpoint(client)
    two = await make_endpoint(client, "http://127.0.0.1:9/other")

    async def create(body: dict) -> str:
        r = await client.post("/v1/subscriptions", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    rust = await create({"keyword": "Rust Lang", "webhook_endpoint_id": one["id"]})
    python = await create({"keyword": "python", "webhook_endpoint_id": two["id"]})
    by_id = await create({"creator_id": "2244994945", "webhook_endpoint_id": one["id"]})
    by_name = await create({"creator_username": "@Some_Host", "webhook_endpoint_id": two["id"]})
    paused = await create({"creator_id": "2244994945", "webhook_endpoint_id": two["id"]})
    assert (await client.patch(f"/v1/subscriptions/{paused}", json={"paused": True})).status_code == 200

    async def ids(**params: object) -> list[str]:
        r = await client.get("/v1/subscriptions", params=params)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["data"]]

    assert await ids() == sorted([rust, python, by_id, by_name, paused])
    assert await ids(target_kind="keyword") == sorted([rust, python])
    assert await ids(target_kind="creator") == sorted([by_id, by_name, paused])
    assert await ids(creator_id="2244994945") == sorted([by_id, paused])
    assert await ids(creator_username="some_HOST") == [by_name]
    assert await ids(creator_username="@Some_Host") == [by_name]
    assert await ids(keyword="  RUST   lang ") == [rust]
    assert await ids(webhook_endpoint_id=one["id"]) == sorted([rust, by_id])
    assert await ids(paused="true") == [paused]
    assert await ids(paused="false") == sorted([rust, python, by_id, by_name])
    assert await ids(creator_id="2244994945", paused="false") == [by_id]
    assert await ids(webhook_endpoint_id=two["id"], target_kind="creator", paused="false") == [by_name]
    assert await ids(keyword="go") == []
    # A filtered walk, one item per page, visits each match once, in order.
    seen, cursor = [], None
    while True:
        params = {"webhook_endpoint_id": two["id"], "limit": 1} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/v1/subscriptions", params=params)).json()
        seen += [d["id"] for d in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == sorted([python, by_name, paused])
