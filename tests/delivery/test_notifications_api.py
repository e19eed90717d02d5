"""Notifications API over real HTTP: listing with filters and cursors, attempts, replay, tenant isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.core.context import AppContext
from app.delivery.dispatcher import Dispatcher
from app.delivery.email import SmtpSender
from app.delivery.notifications import router as notifications_router
from app.delivery.outbox import outbox_for
from tests.conftest import RunningServer, free_port
from tests.delivery.test_outbox import SPACE, add_space, change_space, dispatcher, smtp  # noqa: F401  (fixtures)
from tests.support.receivers import Reply, SmtpCapture, WebhookReceiver

PROBLEM = "application/problem+json"


@pytest.fixture
async def api(ctx: AppContext) -> AsyncIterator[RunningServer]:
    """The real app with the notifications router (included here until app/main.py includes it)."""
    from app.main import create_app

    app = create_app(ctx)
    if not any(getattr(route, "path", "").startswith("/v1/notifications") for route in app.routes):
        app.include_router(notifications_router)
    async with RunningServer(app, free_port()) as server:
        yield server


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(check_timestamp=False) as r:
        yield r


async def subscribe(client: httpx.AsyncClient, receiver: WebhookReceiver, **fields: Any) -> dict[str, Any]:
    r = await client.post("/v1/webhook-endpoints", json={"url": receiver.url})
    assert r.status_code == 201, r.text
    endpoint = r.json()
    receiver.secret = endpoint["secret"]
    body = {"creator_id": "2244994945", "webhook_endpoint_id": endpoint["id"], "lead_times": [15]} | fields
    r = await client.post("/v1/subscriptions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def test_list_filter_paginate_and_read_attempts(
    ctx: AppContext, client: httpx.AsyncClient, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    await add_space(ctx, start)
    await add_space(ctx, start, space_id="1OwxWsecond00")
    sub = await subscribe(client, receiver, lead_times=[30, 15])

    # the subscription was matched against the stored Spaces when it was created
    listed = (await client.get("/v1/notifications")).json()
    assert len(listed["data"]) == 4 and listed["next_cursor"] is None
    assert {(n["kind"], n["state"], n["channel"]) for n in listed["data"]} == {("space.reminder", "pending", "webhook")}

    receiver.respond_with([Reply(500, body="try later")])
    await dispatcher.run_once(start - timedelta(minutes=30))
    first_retry = (await client.get("/v1/notifications", params={"state": "pending", "space_id": SPACE})).json()["data"]
    retried = next(n for n in first_retry if n["attempts"] == 1)
    await dispatcher.run_once(start - timedelta(minutes=15))

    delivered = (await client.get("/v1/notifications", params={"state": "delivered"})).json()["data"]
    assert len(delivered) == 4
    assert (await client.get("/v1/notifications", params={"kind": "space.canceled"})).json()["data"] == []
    by_sub = (await client.get("/v1/notifications", params={"subscription_id": sub["id"]})).json()["data"]
    assert len(by_sub) == 4
    by_space = (await client.get("/v1/notifications", params={"space_id": "1OwxWsecond00"})).json()["data"]
    assert {n["space_id"] for n in by_space} == {"1OwxWsecond00"} and len(by_space) == 2

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/v1/notifications", params=params)).json()
        seen += [n["id"] for n in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(n["id"] for n in listed["data"])

    detail = (await client.get(f"/v1/notifications/{retried['id']}")).json()
    assert detail["state"] == "delivered" and detail["attempts"] == 2
    attempts = detail["delivery_attempts"]
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in attempts] == [
        (1, "retry", 500), (2, "delivered", 200),
    ]
    assert attempts[0]["response_excerpt"] == "try later" and attempts[0]["error"] == "HTTP 500 Internal Server Error"
    hooks = [h for h in receiver.received if h.webhook_id == retried["id"]]
    assert len(hooks) == 2 and all(h.verified for h in hooks)

    bad = await client.get("/v1/notifications", params={"state": "lost"})
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM


async def test_replay_a_failed_notification_after_fixing_the_endpoint(
    ctx: AppContext, client: httpx.AsyncClient, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=2)
    await add_space(ctx, start)
    sub = await subscribe(client, receiver, lead_times=[30])
    receiver.respond_with([410])
    due = start - timedelta(minutes=30)
    await dispatcher.run_once(due)
    [failed] = (await client.get("/v1/notifications", params={"state": "failed"})).json()["data"]
    assert "410" in failed["state_reason"]
    endpoint = (await client.get(f"/v1/webhook-endpoints/{sub['delivery']['webhook_endpoint_id']}")).json()
    assert endpoint["enabled"] is False and "410" in endpoint["disabled_reason"]

    refused = await client.post(f"/v1/notifications/{failed['id']}/replay")
    assert refused.status_code == 409 and refused.headers["content-type"] == PROBLEM
    assert "disabled" in refused.json()["detail"]

    assert (await client.post(f"/v1/webhook-endpoints/{endpoint['id']}/enable")).status_code == 200
    ctx.clock.set(due + timedelta(minutes=5))
    replayed = await client.post(f"/v1/notifications/{failed['id']}/replay")
    assert replayed.status_code == 200, replayed.text
    body = replayed.json()
    assert (body["id"], body["state"], body["attempts"]) == (failed["id"], "pending", 0)
    assert body["next_attempt_at"] == ctx.clock.now().isoformat().replace("+00:00", "Z")

    assert (await dispatcher.run_once(ctx.clock.now())).delivered == 1
    done = (await client.get(f"/v1/notifications/{failed['id']}")).json()
    assert done["state"] == "delivered"
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in done["delivery_attempts"]] == [
        (1, "gone", 410), (1, "delivered", 200),
    ]
    assert [h.webhook_id for h in receiver.received] == [failed["id"], failed["id"]]

    again = await client.post(f"/v1/notifications/{failed['id']}/replay")
    assert again.status_code == 409 and again.json()["type"].endswith("/cannot-replay")
    assert (await client.post("/v1/notifications/ntf_nope/replay")).status_code == 404


async def test_expired_reminder_of_a_started_space_cannot_be_replayed(
    ctx: AppContext, client: httpx.AsyncClient, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await add_space(ctx, start)
    await subscribe(client, receiver, lead_times=[15], event_types=["space.reminder"])
    ctx.clock.set(start + timedelta(minutes=1))
    await change_space(ctx, "space.started", state="live")
    await dispatcher.run_once(ctx.clock.now())
    [expired] = (await client.get("/v1/notifications", params={"state": "expired"})).json()["data"]
    r = await client.post(f"/v1/notifications/{expired['id']}/replay")
    assert r.status_code == 409 and "started" in r.json()["detail"]


async def test_another_accounts_notifications_are_not_found(
    ctx: AppContext,
    client: httpx.AsyncClient,
    other_client: httpx.AsyncClient,
    receiver: WebhookReceiver,
    dispatcher: Dispatcher,
) -> None:
    now = ctx.clock.now()
    start = now + timedelta(hours=1)
    await add_space(ctx, start)
    sub = await subscribe(client, receiver, lead_times=[15])
    receiver.respond_with([404])
    await dispatcher.run_once(start - timedelta(minutes=15))
    [mine] = (await client.get("/v1/notifications")).json()["data"]
    assert mine["state"] == "failed"

    for method, path in [
        ("GET", f"/v1/notifications/{mine['id']}"),
        ("POST", f"/v1/notifications/{mine['id']}/replay"),
    ]:
        r = await other_client.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.headers["content-type"] == PROBLEM and r.json()["detail"] == "notification not found"
    assert (await other_client.get("/v1/notifications")).json()["data"] == []
    assert (await other_client.get("/v1/notifications", params={"subscription_id": sub["id"]})).json()["data"] == []
    assert (await client.get(f"/v1/notifications/{mine['id']}")).json()["state"] == "failed"
    assert (await httpx.AsyncClient(base_url=str(client.base_url)).get("/v1/notifications")).status_code == 401


async def test_a_new_subscription_wakes_the_running_dispatcher(
    ctx: AppContext, client: httpx.AsyncClient, receiver: WebhookReceiver, smtp: SmtpCapture
) -> None:
    now = ctx.clock.now()
    await add_space(ctx, now + timedelta(minutes=5))  # the 15-minute mark has passed: due at once, late
    dispatcher = Dispatcher(ctx, outbox=outbox_for(ctx), smtp_sender=SmtpSender(smtp.host, smtp.port))
    await dispatcher.start()
    try:
        # The clock never moves in this test: only the poke after the API's commit can start the send.
        sub = await subscribe(client, receiver, lead_times=[15])
        [hook] = await receiver.wait_for(1)
        assert hook.verified and hook.json["data"]["subscription_id"] == sub["id"]
        await dispatcher.settle()
        [row] = (await client.get("/v1/notifications")).json()["data"]
        due = (now - timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
        assert (row["state"], row["due_at"]) == ("delivered", due)
    finally:
        await dispatcher.stop()
