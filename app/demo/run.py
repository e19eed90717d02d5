"""`spacebell demo`: the whole service in one process on SQLite, against a simulated X, with local
mail and webhook sinks, so reminders visibly flow within a minute of starting."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from sqlalchemy import func, select

from app.core.clock import SystemClock
from app.core.context import AppContext
from app.core.settings import Settings, load_settings
from app.demo.sinks import DemoReceiver, MailDrop
from app.delivery.models import Notification
from app.roles import build_components, serve_api
from app.spaces.models import Space

log = logging.getLogger(__name__)

DEMO_CREATORS = [("spacebell_demo", "Spacebell Demo"), ("pyconf_live", "PyConf Live")]
# (creator index, seconds from now, title): the first reminder falls due ~15 s after start.
DEMO_SPACES = [
    (0, 75, "Launch day: Spacebell live Q&A 🚀"),
    (1, 120, "Python async deep dive 🐍"),
    (0, 165, "Office hours — ask anything"),
    (1, 210, "Python packaging in 2026"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DemoWorld:
    ctx: AppContext
    api_url: str
    mail: MailDrop
    receiver: DemoReceiver
    data_dir: Path
    started: float


def demo_settings(data_dir: Path, port: int, smtp_port: int, sim_url: str) -> Settings:
    return load_settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{data_dir / 'spacebell.db'}",
        api_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        x_api_base_url=sim_url,
        x_bearer_token="sim-token",
        discovery_interval_seconds=5,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_from="Spacebell Demo <reminders@spacebell.local>",
        webhook_allow_http=True,
        webhook_allowed_networks=["127.0.0.0/8"],
        dispatcher_idle_seconds=1,
    )


async def _subscribe(api_url: str, api_key: str, receiver: DemoReceiver) -> None:
    """What an API client would do: one webhook endpoint, creator and keyword subscriptions."""
    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        endpoint = (await http.post("/v1/webhook-endpoints", json={"url": receiver.url})).raise_for_status().json()
        receiver.secret = endpoint["secret"]
        events = ["space.reminder", "space.scheduled", "space.rescheduled", "space.canceled", "space.started"]
        for username, _ in DEMO_CREATORS:
            body = {"creator_username": username, "webhook_endpoint_id": endpoint["id"], "lead_times": [1],
                    "event_types": events}
            (await http.post("/v1/subscriptions", json=body)).raise_for_status()
        body = {"keyword": "python", "email": "demo@example.com", "lead_times": [1], "event_types": events}
        (await http.post("/v1/subscriptions", json=body)).raise_for_status()


async def _confirm_addresses(world: DemoWorld, stop: asyncio.Event) -> None:
    """Plays the recipient: finds the confirmation mail and presses its Confirm button (a POST)."""
    confirmed: set[int] = set()
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            for index, body in enumerate(list(world.mail.bodies)):
                if index in confirmed:
                    continue
                match = re.search(r"(https?://\S+/v1/email/confirm/\S+)", body)
                if match:
                    confirmed.add(index)
                    await http.post(match.group(1).rstrip(".>)"))
            await asyncio.sleep(0.5)


async def _snapshot(world: DemoWorld) -> dict[str, Any]:
    async with world.ctx.db.session() as session:
        spaces = await session.scalar(select(func.count()).select_from(Space)) or 0
        by_state = dict(
            (await session.execute(select(Notification.state, func.count()).group_by(Notification.state))).all()
        )
        by_channel = dict(
            (
                await session.execute(
                    select(Notification.channel, func.count())
                    .where(Notification.state == "delivered")
                    .group_by(Notification.channel)
                )
            ).all()
        )
        reminders = (
            await session.execute(
                select(Notification.due_at, Notification.delivered_at, Notification.late).where(
                    Notification.kind == "space.reminder", Notification.state == "delivered"
                )
            )
        ).all()
        upcoming = (
            await session.execute(
                select(Notification.due_at, Notification.channel, Notification.kind)
                .where(Notification.state.in_(["pending", "held", "sending"]))
                .order_by(Notification.due_at)
                .limit(5)
            )
        ).all()
    lateness = sorted((d - due).total_seconds() * 1000 for due, d, _late in reminders if d is not None)
    return {"spaces": spaces, "by_state": by_state, "by_channel": by_channel, "lateness": lateness,
            "upcoming": upcoming}


def _render(world: DemoWorld, snap: dict[str, Any]) -> Group:
    now = world.ctx.clock.now()
    counts = Table(title="Spacebell demo", show_header=False, expand=False)
    counts.add_row("running for", f"{time.monotonic() - world.started:.0f} s")
    counts.add_row("Spaces discovered", str(snap["spaces"]))
    for state in ("held", "pending", "sending", "delivered", "failed", "expired", "canceled"):
        counts.add_row(f"notifications {state}", str(snap["by_state"].get(state, 0)))
    counts.add_row("delivered by webhook / email", f"{snap['by_channel'].get('webhook', 0)} / {snap['by_channel'].get('email', 0)}")
    counts.add_row("webhooks received, signature verified", f"{world.receiver.received}, {world.receiver.verified}")
    counts.add_row("mails saved", str(world.mail.count))
    lat = snap["lateness"]
    if lat:
        counts.add_row("reminder lateness p50 / max", f"{lat[len(lat) // 2]:.1f} ms / {lat[-1]:.1f} ms")
    due = Table(title="next due", show_header=True)
    due.add_column("in")
    due.add_column("channel")
    due.add_column("kind")
    for at, channel, kind in snap["upcoming"]:
        due.add_row(f"{max(0.0, (at - now).total_seconds()):.0f} s", channel, kind)
    where = (
        f"API docs: {world.api_url}/docs   ·   mail folder: {world.mail.folder}\n"
        f"webhook receiver: {world.receiver.url}   ·   Ctrl-C stops"
    )
    return Group(counts, due, Panel(where))


async def run_demo(*, data_dir: Path, port: int = 8000, duration: float | None = None, console: Console | None = None) -> dict[str, int]:
    from app.accounts.service import create_account
    from app.core.logging import configure_logging
    from app.x.sim.server import running_sim

    console = console or Console()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with running_sim(seed=42, seed_creators=12, spaces_per_creator=2) as sim:
        now = sim.state.now()
        creators = [sim.state.add_user(name, name=display) for name, display in DEMO_CREATORS]
        for who, seconds, title in DEMO_SPACES:
            sim.state.add_space(creators[who].id, title, scheduled_start=now + timedelta(seconds=seconds))

        mail = MailDrop(data_dir / "mail", _free_port())
        mail.start()
        receiver = DemoReceiver(_free_port())
        await receiver.start()
        settings = demo_settings(data_dir, port, mail.port, sim.base_url)
        settings.log_level = "WARNING"
        configure_logging(settings)
        ctx = AppContext.from_settings(settings, clock=SystemClock())
        started = asyncio.Event()
        server = asyncio.create_task(
            serve_api(ctx, build_components(ctx, {"api", "scheduler", "worker"}), stop=stop, started=started)
        )
        await asyncio.wait([asyncio.create_task(started.wait()), server], return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()
        world = DemoWorld(ctx, f"http://127.0.0.1:{port}", mail, receiver, data_dir, time.monotonic())
        async with ctx.db.write() as session:
            issued = await create_account(session, "demo", ctx.clock.now())
        await _subscribe(world.api_url, issued.api_key, receiver)
        console.print(f"demo account API key: [bold]{issued.api_key}[/bold]")
        confirmer = asyncio.create_task(_confirm_addresses(world, stop))
        if duration is not None:
            loop.call_later(duration, stop.set)

        snap: dict[str, Any] = {}
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stop.is_set():
                snap = await _snapshot(world)
                live.update(_render(world, snap))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                except TimeoutError:
                    pass
        confirmer.cancel()
        await server
        await receiver.stop()
        mail.stop()

    delivered = snap.get("by_channel", {}) if snap else {}
    summary = {"webhooks": receiver.verified, "emails": mail.count, "delivered_webhook": delivered.get("webhook", 0),
               "delivered_email": delivered.get("email", 0)}
    console.print(
        f"demo finished: {summary['delivered_webhook']} webhooks and {summary['delivered_email']} emails delivered "
        f"({receiver.verified} signatures verified, {mail.count} mails saved in {mail.folder})"
    )
    return summary
