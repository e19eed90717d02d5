"""Double opt-in and one-click unsubscribe, end to end: API -> outbox -> dispatcher -> SMTP -> links."""

from __future__ import annotations

import re
from datetime import timedelta
from email.message import EmailMessage

import httpx
import pytest

from app.core.context import AppContext
from app.delivery.dispatcher import Dispatcher
from app.delivery.models import Notification
from app.spaces.models import Space, SpaceEvent
from sqlalchemy import select
from tests.support.receivers import SmtpCapture

LINK = re.compile(r"(https://spacebell\.test/v1/email/(?:confirm|unsubscribe)/[A-Za-z0-9_\-.]+)")


def links_in(message: EmailMessage, kind: str) -> list[str]:
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    return [u for u in LINK.findall(text) if f"/{kind}/" in u]


async def add_space(ctx: AppContext, space_id: str, title: str, minutes_ahead: int) -> None:
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        session.add(
            Space(
                id=space_id, creator_id="42", title=title, state="scheduled",
                scheduled_start=now + timedelta(minutes=minutes_ahead), host_ids=["42"], is_ticketed=False,
                first_seen_at=now, last_seen_at=now, revision=1,
            )
        )
        await session.flush()
        session.add(SpaceEvent(space_id=space_id, kind="space.scheduled", revision=1, occurred_at=now,
                               scheduled_start=now + timedelta(minutes=minutes_ahead)))


@pytest.fixture
async def smtp():  # type: ignore[no-untyped-def]
    async with SmtpCapture() as capture:
        yield capture


@pytest.fixture
async def dispatcher(ctx: AppContext, smtp: SmtpCapture):  # type: ignore[no-untyped-def]
    ctx.settings.smtp_port = smtp.port
    ctx.settings.smtp_host = "127.0.0.1"
    d = Dispatcher(ctx)
    yield d
    await d.stop()


def to_local(url: str, api_url: str) -> str:
    return url.replace("https://spacebell.test", api_url)


async def test_unconfirmed_address_gets_only_the_confirmation_then_reminders_after_confirming(
    ctx: AppContext, api, client: httpx.AsyncClient, dispatcher: Dispatcher, smtp: SmtpCapture  # type: ignore[no-untyped-def]
) -> None:
    sub = (await client.post("/v1/subscriptions", json={"keyword": "rust", "email": "ada@example.com", "lead_times": [10]})).json()
    await add_space(ctx, "1RustSpace001", "Rust weekly", 60)
    await dispatcher.fan_out(ctx.clock.now())
    await dispatcher.run_once(ctx.clock.now())
    [confirmation] = await smtp.wait_for(1)
    assert confirmation["To"] == "ada@example.com"
    assert "rust" not in confirmation.as_string().lower()  # no requester text in it
    ctx.clock.advance(timedelta(minutes=50))
    await dispatcher.run_once(ctx.clock.now())
    assert len(smtp.messages) == 1  # the reminder waits: the address is not confirmed
    async with ctx.db.session() as session:
        states = {n.kind: n.state for n in await session.scalars(select(Notification))}
    assert states["space.reminder"] == "held"

    [url] = links_in(confirmation, "confirm")
    async with httpx.AsyncClient() as browser:
        page = await browser.get(to_local(url, api.url))
        assert page.status_code == 200 and "<form method=\"post\">" in page.text
        assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["delivery"]["email_confirmed"] is False
        done = await browser.post(to_local(url, api.url))
        assert done.status_code == 200
    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["delivery"]["email_confirmed"] is True
    await dispatcher.run_once(ctx.clock.now())
    messages = await smtp.wait_for(2)
    assert "Rust weekly" in messages[1]["Subject"] + messages[1].get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


async def test_one_click_unsubscribe_then_everything_and_get_changes_nothing(
    ctx: AppContext, api, client: httpx.AsyncClient, dispatcher: Dispatcher, smtp: SmtpCapture  # type: ignore[no-untyped-def]
) -> None:
    sub = (await client.post("/v1/subscriptions", json={"keyword": "go", "email": "bob@example.com", "lead_times": [30, 10]})).json()
    await dispatcher.run_once(ctx.clock.now())
    [confirmation] = await smtp.wait_for(1)
    async with httpx.AsyncClient() as browser:
        await browser.post(to_local(links_in(confirmation, "confirm")[0], api.url))
    await add_space(ctx, "1GoSpace00001", "Go hangout", 60)
    await dispatcher.fan_out(ctx.clock.now())
    ctx.clock.advance(timedelta(minutes=30))
    await dispatcher.run_once(ctx.clock.now())
    reminder = (await smtp.wait_for(2))[1]
    assert reminder["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = reminder["List-Unsubscribe"].strip("<>")
    async with httpx.AsyncClient(follow_redirects=False) as mail_client:
        scan = await mail_client.get(to_local(url, api.url))
        assert scan.status_code == 200
        ctx.clock.advance(timedelta(minutes=20))
        await dispatcher.run_once(ctx.clock.now())
        assert len(await smtp.wait_for(3)) == 3  # the scanner's GET unsubscribed nobody
        one_click = await mail_client.post(
            to_local(url, api.url), content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert one_click.status_code == 200 and "location" not in one_click.headers
        assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["paused"] is True
        forged = await mail_client.post(to_local(url[:-3] + "xyz", api.url))
        assert forged.status_code == 404
        everything = re.findall(r'action="([^"]+)"', (await mail_client.get(to_local(url, api.url))).text)
        assert len(everything) == 1
        assert (await mail_client.post(to_local(everything[0], api.url))).status_code == 200
    # A new Space and a new subscription to the same address: nothing more is mailed, not even a confirmation.
    other = (await client.post("/v1/subscriptions", json={"keyword": "gopher", "email": "bob@example.com"})).json()
    assert other["delivery"]["email_confirmed"] is False
    await add_space(ctx, "1GoSpace00002", "Go gopher meetup", 90)
    await dispatcher.fan_out(ctx.clock.now())
    ctx.clock.advance(timedelta(minutes=85))
    report = await dispatcher.run_once(ctx.clock.now())  # returns once every claimed row was sent and recorded
    assert report.sent == 0
    assert len(smtp.messages) == 3


async def test_unsubscribe_from_one_subscription_pauses_only_it(
    ctx: AppContext, api, client: httpx.AsyncClient, dispatcher: Dispatcher, smtp: SmtpCapture  # type: ignore[no-untyped-def]
) -> None:
    first = (await client.post("/v1/subscriptions", json={"keyword": "alpha", "email": "cy@example.com"})).json()
    second = (await client.post("/v1/subscriptions", json={"keyword": "beta", "email": "cy@example.com"})).json()
    await dispatcher.run_once(ctx.clock.now())
    [confirmation] = await smtp.wait_for(1)
    async with httpx.AsyncClient() as browser:
        await browser.post(to_local(links_in(confirmation, "confirm")[0], api.url))
    await add_space(ctx, "1AlphaSpace01", "alpha talk", 30)
    await dispatcher.fan_out(ctx.clock.now())
    ctx.clock.advance(timedelta(minutes=15))
    await dispatcher.run_once(ctx.clock.now())
    reminder = (await smtp.wait_for(2))[1]
    url = reminder["List-Unsubscribe"].strip("<>")
    async with httpx.AsyncClient() as mail_client:
        assert (await mail_client.post(to_local(url, api.url), content=b"List-Unsubscribe=One-Click")).status_code == 200
    got_first = (await client.get(f"/v1/subscriptions/{first['id']}")).json()
    got_second = (await client.get(f"/v1/subscriptions/{second['id']}")).json()
    assert got_first["paused"] is True and got_second["paused"] is False
    refused = await client.patch(f"/v1/subscriptions/{first['id']}", json={"paused": False})
    assert refused.status_code == 422 and refused.json()["invalid_params"][0]["name"] == "body.paused"


async def test_confirmation_mails_are_rate_limited_per_address(
    ctx: AppContext, client: httpx.AsyncClient, dispatcher: Dispatcher, smtp: SmtpCapture  # type: ignore[no-untyped-def]
) -> None:
    ctx.settings.email_confirmations_per_address_per_day = 2
    for i in range(5):
        await client.post("/v1/subscriptions", json={"keyword": f"k{i}", "email": "dee@example.com"})
        await dispatcher.run_once(ctx.clock.now())
        await smtp.wait_for(min(i + 1, 2))
        ctx.clock.advance(timedelta(minutes=1))
    assert len(smtp.messages) == 2
