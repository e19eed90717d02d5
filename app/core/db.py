"""Async engine and sessions for SQLite (embedded, one process) and PostgreSQL (many processes)."""

from __future__ import annotations

import contextvars
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pydantic_core
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

_sqlite_begin = contextvars.ContextVar("sqlite_begin", default="BEGIN")


class WriterLockError(RuntimeError):
    pass


class Database:
    """Owns the engine. `read()` for reads outside a transaction, `session()` for a transaction that
    reads (or writes little), `write()` for a transaction that writes.

    On SQLite a write transaction starts with BEGIN IMMEDIATE: a deferred transaction that reads
    and then writes can fail with SQLITE_BUSY at once, ignoring busy_timeout.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # JSON columns (lead times, event types, ...) decoded by pydantic-core: a list page decodes
        # two per row, and the standard library's json.loads was a tenth of a list request.
        kwargs: dict[str, Any] = {"echo": echo, "json_deserializer": pydantic_core.from_json}
        if self.is_sqlite:
            # Reset on return is ours (_configure_sqlite): a rollback only when a transaction is open.
            # Sized like PostgreSQL's pool: the default (5) made busy APIs open and close connections
            # (a thread and four PRAGMAs each) all the time.
            kwargs.update(
                connect_args={"timeout": 30}, pool_reset_on_return=None, pool_size=pool_size, max_overflow=pool_size
            )
        else:
            # skip_autocommit_rollback: a read() connection has no transaction to roll back on return.
            kwargs.update(
                pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, skip_autocommit_rollback=True
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # Reads outside a transaction: each statement sees its own snapshot, and no BEGIN/COMMIT round trips.
        self._reads = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False, autoflush=False
        )
        self._writer_lock_fd: int | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction only reads (or writes little, deferred); commits on success."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only, in autocommit: cheapest, but two queries may see different states."""
        # SQLite: no BEGIN is enough (the driver runs each statement on its own); its AUTOCOMMIT option
        # would cost a thread hop per checkout to flip the connection's isolation level.
        token = _sqlite_begin.set("")
        try:
            async with (self._sessions if self.is_sqlite else self._reads)() as session:
                yield session
        finally:
            _sqlite_begin.reset(token)

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

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, _record: Any, reset_state: Any) -> None:
        # The pool's own reset rolls back every connection it gets back, a hop to aiosqlite's thread
        # even after a read that never began a transaction (~12% of a list request). Asking the
        # driver whether a transaction is open costs nothing.
        if dbapi_connection.driver_connection.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if begin := _sqlite_begin.get():
            conn.exec_driver_sql(begin)
