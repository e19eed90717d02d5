"""Cross-process wake-up on PostgreSQL (LISTEN/NOTIFY): a worker asleep for an hour delivers at once what
another process (the API, the scheduler's fan-out, a stopping worker) makes due, without the clock moving.

Each "process" is an AppContext of its own (own Database and engine, own components); they share one
ManualClock so due times agree. These tests need PostgreSQL by nature and never skip: like the rest of
the suite they fail when it is not there.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.core.clock import ManualClock
from app.core.context import AppContext
from app.core.db import Database
from app.delivery.dispatcher import Dispatcher, fan_out_hook
from app.delivery.models import Notification
from app.delivery.outbox import ReminderOutbox, wake_dispatcher_after_commit
from app.delivery.wake import CHANNEL, OutboxListener, asyncpg_dsn, notify_enabled
from app.subscriptions.schemas import SubscriptionCreate
from app.subscriptions.service import create_subscription
from tests.conftest import T0, TABLES, RunningServer, _pg_admin_db, create_account, free_port, make_settings
from tests.delivery.test_outbox import CREATOR, add_endpoint, add_space, add_subscription, rows, seed_account
from tests.support.receivers import WebhookReceiver

WORKER_IDLE = 3600.0  # the worker would not poll again for an hour


class WatchedClock(ManualClock):
    """A ManualClock that can tell whether someone sleeps on it with no wake-up pending."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self._sleeping: list[asyncio.Event | None] = []

    async def sleep_until(self, when: datetime, wake: asyncio.Event | None = None) -> None:
        self._sleeping.append(wake)
        try:
            await super().sleep_until(when, wake)
        finally:
            self._sleeping.remove(wake)

    def sleepers(self) -> int:
        return sum(1 for wake in self._sleeping if wake is None or not wake.is_set())

    def asleep(self) -> bool:
        return self.sleepers() > 0


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 5.0) -> None:
    """Wait for a real event (a connection, a background task's state), never for a due time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def notify_wakeups() -> float:
    return REGISTRY.get_sample_value("spacebell_dispatch_notify_wakeups_total") or 0.0


@pytest.fixture
async def pg_url(pg_database: str) -> str:
    await _pg_admin_db(pg_database, f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    return pg_database


@pytest.fixture
def clock() -> WatchedClock:
    return WatchedClock(T0)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(check_timestamp=False) as r:  # the sender's clock is manual
        yield r


def make_context(url: str, clock: ManualClock, **settings: object) -> AppContext:
    return AppContext(settings=make_settings(url, **settings), db=Database(url, pool_size=2), clock=clock)


@pytest.fixture
async def api_ctx(pg_url: str, clock: WatchedClock) -> AsyncIterator[AppContext]:
    """The API process: no dispatcher among its components."""
    ctx = make_context(pg_url, clock, dispatcher_listen=True)
    yield ctx
    await ctx.db.dispose()


@pytest.fixture
async def api(api_ctx: AppContext) -> AsyncIterator[httpx.AsyncClient]:
    from app.main import create_app

    key = await create_account(api_ctx, "tenant")
    async with RunningServer(create_app(api_ctx), free_port()) as server:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
            yield http


@pytest.fixture
async def probe(pg_url: str) -> AsyncIterator[list[str]]:
    """A connection of the test's own listening on the outbox channel: what was really sent."""
    received: list[str] = []
    conn = await asyncpg.connect(asyncpg_dsn(pg_url))
    await conn.add_listener(CHANNEL, lambda _c, _pid, _channel, payload: received.append(payload))
    yield received
    await conn.close()


async def start_worker(url: str, clock: WatchedClock, **settings: object) -> Dispatcher:
    """A worker process's dispatcher, started and asleep (no wake pending), listening if it should."""
    settings.setdefault("dispatcher_idle_seconds", WORKER_IDLE)
    ctx = make_context(url, clock, **settings)
    dispatcher = Dispatcher(ctx, outbox=ReminderOutbox())
    sleepers = clock.sleepers()  # other workers' loops
    await dispatcher.start()
    if dispatcher.listener is not None:
        await asyncio.wait_for(dispatcher.listener.connected.wait(), 10)
    await until(lambda: clock.sleepers() > sleepers, "the worker to sleep")
    return dispatcher


async def stop_worker(dispatcher: Dispatcher) -> None:
    await dispatcher.stop()
    await dispatcher.ctx.db.dispose()


@pytest.fixture
async def worker(pg_url: str, clock: WatchedClock) -> AsyncIterator[Dispatcher]:
    dispatcher = await start_worker(pg_url, clock)
    yield dispatcher
    await stop_worker(dispatcher)


async def endpoint_for(api: httpx.AsyncClient, receiver: WebhookReceiver) -> str:
    r = await api.post("/v1/webhook-endpoints", json={"url": receiver.url, "event_types": ["space.reminder"]})
    assert r.status_code == 201, r.text
    receiver.secret = r.json()["secret"]
    return r.json()["id"]


async def subscribe_due_now(api: httpx.AsyncClient, endpoint_id: str) -> str:
    """A subscription whose 15-minute reminder of a Space 10 minutes away is due at once."""
    r = await api.post(
        "/v1/subscriptions", json={"creator_id": CREATOR, "webhook_endpoint_id": endpoint_id, "lead_times": [15]}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def delivered(ctx: AppContext) -> list[Notification]:
    return [r for r in await rows(ctx) if r.state == "delivered"]


# ---------------------------------------------------------------------------------------------


async def test_api_subscription_wakes_a_sleeping_worker_in_another_process_postgres(
    api_ctx: AppContext, api: httpx.AsyncClient, receiver: WebhookReceiver, worker: Dispatcher, clock: WatchedClock
) -> None:
    assert worker.ctx.db is not api_ctx.db and "dispatcher" not in api_ctx.components
    await add_space(api_ctx, T0 + timedelta(minutes=10), event=False)
    endpoint_id = await endpoint_for(api, receiver)
    await until(clock.asleep, "the worker to sleep")
    before = notify_wakeups()

    await subscribe_due_now(api, endpoint_id)

    [hook] = await receiver.wait_for(1)
    await worker.settle()
    [row] = await rows(api_ctx)
    assert hook.verified and hook.webhook_id == row.id
    assert (row.state, row.lead_time_minutes, row.delivered_at) == ("delivered", 15, T0)
    assert clock.now() == T0
    assert notify_wakeups() > before
    assert worker.readiness()["listening"] is True


async def test_without_listen_the_worker_waits_for_its_idle_poll_postgres(
    pg_url: str, api_ctx: AppContext, api: httpx.AsyncClient, receiver: WebhookReceiver, probe: list[str],
    clock: WatchedClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPACEBELL_DISPATCHER_LISTEN", "false")
    idle = 60.0  # shorter than the 10 minutes to the Space's start, after which the reminder would expire
    worker = await start_worker(pg_url, clock, dispatcher_idle_seconds=idle)
    try:
        assert worker.ctx.settings.dispatcher_listen is False and worker.listener is None
        await add_space(api_ctx, T0 + timedelta(minutes=10), event=False)
        endpoint_id = await endpoint_for(api, receiver)
        await until(clock.asleep, "the worker to sleep")
        sent_before = len(probe)

        await subscribe_due_now(api, endpoint_id)

        await until(lambda: len(probe) > sent_before, "the API's notification")  # it was sent; nobody listens
        await asyncio.sleep(0.5)  # a window in which a listening worker would have delivered long since
        assert receiver.received == []
        assert [r.state for r in await rows(api_ctx)] == ["pending"]
        assert clock.asleep()

        clock.advance(timedelta(seconds=idle))
        [hook] = await receiver.wait_for(1)
        await worker.settle()
        assert hook.verified
        [row] = await delivered(api_ctx)
        assert row.delivered_at == T0 + timedelta(seconds=idle)
    finally:
        await stop_worker(worker)


async def test_a_rolled_back_transaction_sends_no_wake_postgres(
    api_ctx: AppContext, probe: list[str], receiver: WebhookReceiver
) -> None:
    account = await seed_account(api_ctx)
    endpoint = await add_endpoint(api_ctx, account, receiver.url)
    await add_space(api_ctx, T0 + timedelta(minutes=10), event=False)
    body = SubscriptionCreate(creator_id=CREATOR, webhook_endpoint_id=endpoint.id, lead_times=[15])

    with pytest.raises(RuntimeError):
        async with api_ctx.db.write() as session:
            await create_subscription(session, account, body, T0, 1000, ReminderOutbox())
            wake_dispatcher_after_commit(session, api_ctx)
            raise RuntimeError("the request failed after planning its rows")
    assert await rows(api_ctx) == []

    async with api_ctx.db.write() as session:
        await create_subscription(session, account, body, T0, 1000, ReminderOutbox())
        wake_dispatcher_after_commit(session, api_ctx)
        wake_dispatcher_after_commit(session, api_ctx)  # a second call adds nothing
    await until(lambda: probe, "the committed transaction's notification")
    # Notifications arrive in commit order: one from the rolled-back transaction would have come first.
    assert probe == [""]
    assert [r.state for r in await rows(api_ctx)] == ["pending"]


async def test_the_listener_reconnects_after_its_backend_is_terminated_postgres(
    pg_url: str, api_ctx: AppContext, api: httpx.AsyncClient, receiver: WebhookReceiver, worker: Dispatcher,
    clock: WatchedClock, caplog: pytest.LogCaptureFixture,
) -> None:
    listener = worker.listener
    assert listener is not None
    first_pid = listener.backend_pid
    assert first_pid is not None
    await _pg_admin_db(pg_url, f"SELECT pg_terminate_backend({first_pid})")

    await until(lambda: listener.connected.is_set() and listener.backend_pid not in (None, first_pid),
                "the listener to reconnect")
    assert "outbox listener lost its connection" in caplog.text
    await until(clock.asleep, "the worker to sleep again")  # after the one look a reconnection takes

    await add_space(api_ctx, T0 + timedelta(minutes=10), event=False)
    endpoint_id = await endpoint_for(api, receiver)
    await until(clock.asleep, "the worker to sleep")
    before = notify_wakeups()
    await subscribe_due_now(api, endpoint_id)

    [hook] = await receiver.wait_for(1)
    await worker.settle()
    assert hook.verified and notify_wakeups() > before
    [row] = await delivered(api_ctx)
    assert row.delivered_at == T0 and clock.now() == T0


async def test_the_listener_looks_once_after_reconnecting_and_closes_on_stop_postgres(pg_url: str) -> None:
    wakes: list[int] = []
    listener = OutboxListener(asyncpg_dsn(pg_url), lambda: wakes.append(1), min_backoff=0.05)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        first_pid = listener.backend_pid
        assert wakes == [] and first_pid is not None
        await _pg_admin_db(pg_url, f"SELECT pg_terminate_backend({first_pid})")
        await until(lambda: listener.connected.is_set() and listener.backend_pid not in (None, first_pid),
                    "the listener to reconnect")
        assert wakes == [1]  # notifications sent while it was away are lost: one look makes up for them
        await _pg_admin_db(pg_url, f"NOTIFY {CHANNEL}")
        await until(lambda: len(wakes) == 2, "the notification")
        pid = listener.backend_pid
    finally:
        await listener.stop()
    assert listener.backend_pid is None and not listener.connected.is_set()

    async def backend_gone() -> bool:
        conn = await asyncpg.connect(asyncpg_dsn(pg_url))
        try:
            return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        finally:
            await conn.close()

    await until(backend_gone, "the listening backend to end")


async def test_the_listener_retries_with_capped_backoff_while_the_server_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = OutboxListener(
        f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", lambda: None, min_backoff=0.01, max_backoff=0.04
    )
    listener.start()
    try:
        await until(lambda: caplog.text.count("outbox listener cannot connect") >= 5, "five attempts")
    finally:
        await listener.stop()
    delays = [r.args[-1] for r in caplog.records if "cannot connect" in r.getMessage()]  # type: ignore[index]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.04]
    assert not listener.connected.is_set()


async def test_discovery_fan_out_in_the_scheduler_wakes_the_worker_postgres(
    pg_url: str, receiver: WebhookReceiver, worker: Dispatcher, clock: WatchedClock
) -> None:
    scheduler = make_context(pg_url, clock)
    try:
        account = await seed_account(scheduler)
        endpoint = await add_endpoint(scheduler, account, receiver.url)
        receiver.secret = endpoint.secret
        await add_subscription(scheduler, account, webhook_endpoint_id=endpoint.id, lead_times=[15])
        await add_space(scheduler, T0 + timedelta(minutes=10))  # discovery stored it, with its event
        await until(clock.asleep, "the worker to sleep")

        await fan_out_hook(scheduler)(T0)

        [hook] = await receiver.wait_for(1)
        await worker.settle()
        assert hook.verified and hook.json["data"]["lead_time_minutes"] == 15
        [row] = await delivered(scheduler)
        assert row.delivered_at == T0 and clock.now() == T0
    finally:
        await scheduler.db.dispose()


async def test_rows_a_stopping_worker_hands_back_go_to_another_worker_at_once_postgres(
    pg_url: str, receiver: WebhookReceiver, clock: WatchedClock
) -> None:
    seeder = make_context(pg_url, clock)
    first = second = None
    try:
        account = await seed_account(seeder)
        endpoint = await add_endpoint(seeder, account, receiver.url)
        receiver.secret = endpoint.secret
        await add_subscription(seeder, account, webhook_endpoint_id=endpoint.id, lead_times=[15])
        start = T0 + timedelta(hours=1)
        await add_space(seeder, start)
        due = start - timedelta(minutes=15)
        clock.set(due - timedelta(seconds=1))  # inside the lookahead: claimed ahead, fired at `due`

        first = await start_worker(pg_url, clock)
        [row] = await rows(seeder)
        assert (row.state, row.lease_owner) == ("sending", first.owner)
        second = await start_worker(pg_url, clock)

        await first.stop()  # hands the row back, with a notification
        await until(lambda: _leased_by(seeder, second.owner), "the other worker to claim the row")
        assert receiver.received == []

        clock.set(due)
        [hook] = await receiver.wait_for(1)
        await second.settle()
        assert hook.verified and hook.webhook_id == row.id
        [done] = await delivered(seeder)
        assert done.delivered_at == due
    finally:
        for dispatcher in (first, second):
            if dispatcher is not None:
                await stop_worker(dispatcher)
        await seeder.db.dispose()


async def _leased_by(ctx: AppContext, owner: str) -> bool:
    async with ctx.db.session() as session:
        return (await session.scalars(select(Notification.lease_owner))).all() == [owner]


async def test_sqlite_neither_listens_nor_notifies(sqlite_template: Path, tmp_path: Path) -> None:
    path = tmp_path / "spacebell.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite+aiosqlite:///{path}"
    ctx = make_context(url, ManualClock(T0))
    dispatcher = Dispatcher(ctx, outbox=ReminderOutbox())
    await dispatcher.start()
    try:
        assert not notify_enabled(ctx) and dispatcher.listener is None
        assert "listening" not in dispatcher.readiness()
    finally:
        await dispatcher.stop()
        await ctx.db.dispose()
