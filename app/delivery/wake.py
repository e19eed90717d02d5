"""Waking dispatchers in other processes on PostgreSQL: NOTIFY where outbox rows become due, LISTEN in workers.

A worker sleeps until its next due row, at most `dispatcher_idle_seconds`. Rows that another process
makes due now (a new subscription matched against stored Spaces, a replay, a confirmed address, a
discovery fan-out) would otherwise wait for that poll. The notification is sent in the transaction
that wrote the rows: PostgreSQL delivers it only if and when that transaction commits, so a woken
worker always finds them. SQLite needs none of this (one process).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.delivery import dispatch_metrics as m

log = logging.getLogger(__name__)

CHANNEL = "spacebell_outbox"
_NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', '')")
_PENDING = "spacebell_outbox_notify"  # session.info key: a NOTIFY is registered for the next commit
CONNECT_TIMEOUT_SECONDS = 10.0
PING_SECONDS = 30.0  # a connection that died without a word (no FIN/RST) is found this late
PING_TIMEOUT_SECONDS = 10.0
# SQLAlchemy's asyncpg dialect takes these from the URL's query; asyncpg's DSN parser would pass them
# to the server as settings.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


def notify_enabled(ctx: Any) -> bool:
    return not ctx.db.is_sqlite and ctx.settings.dispatcher_listen


def notify_on_commit(session: AsyncSession, ctx: Any) -> None:
    """Send one outbox notification when the session's transaction commits (none if it rolls back)."""
    if not notify_enabled(ctx) or session.info.get(_PENDING):
        return
    session.info[_PENDING] = True
    event.listen(session.sync_session, "before_commit", _notify_in_transaction, once=True)


def _notify_in_transaction(session: Session) -> None:
    # Runs inside AsyncSession.commit()'s greenlet, so the sync execute may await the driver.
    session.info.pop(_PENDING, None)
    session.execute(_NOTIFY)


async def notify(session: AsyncSession, ctx: Any) -> None:
    """Queue an outbox notification in the session's open transaction (sent at its commit)."""
    if notify_enabled(ctx):
        await session.execute(_NOTIFY)


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy `postgresql+asyncpg://` URL as the plain DSN `asyncpg.connect` takes."""
    parsed = make_url(url)
    query = {k: v for k, v in parsed.query.items() if k not in _DIALECT_ONLY}
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")  # asyncpg's `ssl=` argument, spelled as a DSN option
    return parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


class OutboxListener:
    """One dedicated connection that LISTENs on the outbox channel and calls `wake` on each notification.

    A lost connection (or one that cannot be opened) is logged and retried after a backoff that doubles
    up to `max_backoff`; once listening again it calls `wake`, since notifications sent in between are gone.
    """

    def __init__(
        self,
        dsn: str,
        wake: Callable[[], None],
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        ping_seconds: float = PING_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.ping_seconds = ping_seconds
        self.connected = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the listening connection, while connected."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dispatcher-listen")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connected.clear()
        await self._close()

    def _notified(self, *_args: object) -> None:
        m.notify_wakeups.inc()
        self._wake()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.min_backoff
        missed = False  # notifications may have been sent while not listening
        while True:
            lost = asyncio.Event()
            try:
                conn = self._conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_SECONDS)
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._close()
                log.warning(
                    "outbox listener cannot connect (%s: %s); workers poll meanwhile; retrying in %.1fs",
                    type(exc).__name__, exc, delay,
                )
                missed = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.max_backoff)
                continue
            self.connected.set()
            if missed:
                log.info("outbox listener connected again")
                self._wake()
            else:
                log.info("listening for outbox notifications on %s", CHANNEL)
            up_since = loop.time()
            reason = await self._watch(conn, lost)
            self.connected.clear()
            missed = True
            await self._close()
            if loop.time() - up_since >= self.max_backoff:
                delay = self.min_backoff  # a connection that lasted: not a flapping server
            log.warning("outbox listener lost its connection (%s); reconnecting in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.max_backoff)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> str:
        """Return (why) once the connection is gone."""
        while True:
            try:
                await asyncio.wait_for(lost.wait(), self.ping_seconds)
                return "connection closed"
            except TimeoutError:
                pass
            try:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=2.0)
        except Exception:
            conn.terminate()


__all__ = ["CHANNEL", "OutboxListener", "asyncpg_dsn", "notify", "notify_enabled", "notify_on_commit"]
