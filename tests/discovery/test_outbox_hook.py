"""The after_cycle hook is where the lead wires the outbox: discovery writes events, the outbox fans out."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from sqlalchemy import func, select

from app.core.clock import ManualClock
from app.core.context import AppContext
from app.delivery.models import Notification
from app.delivery.outbox import ReminderOutbox
from app.discovery.component import DiscoveryComponent, x_client_from_settings
from app.spaces.models import SpaceEvent
from app.x.sim import RunningSim, SimState
from tests.conftest import make_settings
from tests.discovery.conftest import ClockSleep, later, make_xclient


async def test_after_cycle_fans_out_the_new_events(
    ctx: AppContext, client: httpx.AsyncClient, sim: RunningSim, sim_state: SimState, sleep: ClockSleep
) -> None:
    alice = sim_state.add_user("alice", id="1001")
    sim_state.add_space(alice.id, "Fan me out", scheduled_start=later(ctx, hours=2), id="1AAAAAAAAAAAA")
    endpoint = (await client.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook"})).json()
    r = await client.post(
        "/v1/subscriptions",
        json={"creator_id": alice.id, "webhook_endpoint_id": endpoint["id"], "lead_times": [15],
              "event_types": ["space.reminder", "space.scheduled"]},
    )
    assert r.status_code == 201, r.text
    outbox = ReminderOutbox.from_settings(ctx.settings)
    fanned: list[int] = []

    async def fan_out(now: datetime) -> None:
        async with ctx.db.write() as session:
            fanned.append(await outbox.fan_out_events(session, now))

    component = DiscoveryComponent(ctx, lambda: make_xclient(ctx, sim, sleep), after_cycle=fan_out, schedule=False)
    await component.start()
    try:
        report = await component.tick()
    finally:
        await component.stop()
    assert report is not None and report.events == [("1AAAAAAAAAAAA", "space.scheduled")]
    assert fanned == [1]
    async with ctx.db.session() as session:
        assert await session.scalar(select(func.count()).where(SpaceEvent.fanned_out_at.is_(None))) == 0
        notified = await session.scalar(select(func.count()).where(Notification.space_id == "1AAAAAAAAAAAA"))
        assert notified and notified >= 1


async def test_x_client_from_settings() -> None:
    settings = make_settings("sqlite+aiosqlite:///unused.db", x_api_base_url="http://127.0.0.1:8787/")
    client = x_client_from_settings(settings, ManualClock())
    assert client._base_url == "http://127.0.0.1:8787"  # noqa: SLF001
    await client.aclose()
    settings.x_bearer_token = None
    with pytest.raises(RuntimeError, match="X_BEARER_TOKEN"):
        x_client_from_settings(settings, ManualClock())
