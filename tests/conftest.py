"""Shared fixtures: every database test runs on SQLite and on PostgreSQL, against the real app over HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from sqlalchemy.ext.asyncio import create_async_engine

from app.core import migrate
from app.core.clock import ManualClock
from app.core.context import AppContext
from app.core.db import Database
from app.core.registry import metadata
from app.core.settings import Settings

PG_HOST = os.environ.get("SPACEBELL_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SPACEBELL_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("SPACEBELL_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("SPACEBELL_TEST_PG_DB", "test")

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def run_in_thread(coro: Any) -> Any:
    """Run a coroutine to completion on its own loop; session fixtures may be set up inside a running loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, migrated to head, dropped at the end."""
    name = f"spacebell_t_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        run_in_thread(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL at {PG_HOST}:{PG_PORT} is required for the test suite ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    url = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    run_in_thread(_migrate(url))
    yield url
    run_in_thread(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    run_in_thread(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


TABLES = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database: a copy of the SQLite template, or the session's PostgreSQL truncated."""
    if request.param == "sqlite":
        path = tmp_path / "spacebell.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_database")
        await _pg_admin_db(url, f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        yield url


async def _pg_admin_db(url: str, sql: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def make_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        database_url=db_url,
        migrate_on_start=False,
        secret_key="test-secret-key-test-secret-key-0123456789",
        webhook_allow_http=True,
        webhook_allowed_networks=["127.0.0.0/8"],
        x_api_base_url="http://127.0.0.1:9",
        x_bearer_token="sim-token",
        public_base_url="https://spacebell.test",
        api_rate_limit_per_minute=100000,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def ctx(db_url: str, clock: ManualClock) -> AsyncIterator[AppContext]:
    settings = make_settings(db_url)
    context = AppContext(settings=settings, db=Database(db_url), clock=clock)
    yield context
    await context.db.dispose()


class RunningServer:
    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningServer:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


async def serve(app: Any) -> RunningServer:
    return await RunningServer(app, free_port()).__aenter__()


@pytest.fixture
async def api(ctx: AppContext) -> AsyncIterator[RunningServer]:
    """The real app under uvicorn on loopback; tests talk to it over HTTP."""
    from app.main import create_app

    async with RunningServer(create_app(ctx), free_port()) as server:
        yield server


async def create_account(ctx: AppContext, name: str = "tenant") -> str:
    from app.accounts.service import create_account as _create

    async with ctx.db.write() as session:
        issued = await _create(session, name, ctx.clock.now())
    return issued.api_key


@pytest.fixture
async def client(api: RunningServer, ctx: AppContext) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client authenticated as a fresh account."""
    key = await create_account(ctx, "tenant-a")
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        yield http


@pytest.fixture
async def other_client(api: RunningServer, ctx: AppContext) -> AsyncIterator[httpx.AsyncClient]:
    key = await create_account(ctx, "tenant-b")
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        yield http
