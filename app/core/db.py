"""Async engine and sessions for SQLite (embedded, one process) and PostgreSQL (many processes)."""

from __future__ import annotations

import contextvars
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

_sqlite_begin = contextvars.ContextVar("sqlite_begin", default="BEGIN")


class WriterLockError(RuntimeError):
    pass


class Database:
    """Owns the engine. `session()` for reads, `write()` for a transaction that writes.

    On SQLite a write transaction starts with BEGIN IMMEDIATE: a deferred transaction that reads
    and then writes can fail with SQLITE_BUSY at once, ignoring busy_timeout.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._writer_lock_fd: int | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction only reads (or writes little, deferred); commits on success."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction (BEGIN IMMEDIATE on SQLite); commits on success."""
        token = _sqlite_begin.set("BEGIN IMMEDIATE")
        try:
            async with self._sessions() as session, session.begin():
                yield session
        finally:
            _sqlite_begin.reset(token)

    def acquire_writer_lock(self) -> None:
        """SQLite supports one writing process: refuse to start a second against the same file."""
        if not self.is_sqlite or self._writer_lock_fd is not None:
            return
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return
        path = os.path.abspath(database) + ".writer.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterLockError(
                f"another Spacebell process already writes to {database}; SQLite allows one process "
                "(use PostgreSQL to run several)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._writer_lock_fd = fd

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._writer_lock_fd is not None:
            os.close(self._writer_lock_fd)
            self._writer_lock_fd = None


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours (see SQLAlchemy's pysqlite notes).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA busy_timeout=30000",
            "PRAGMA foreign_keys=ON",
            "PRAGMA synchronous=NORMAL",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(_sqlite_begin.get())
