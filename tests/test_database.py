"""The Database's connection handling against a real PostgreSQL."""

from __future__ import annotations

from sqlalchemy import text

from app.core.db import Database
from tests.conftest import _pg_admin_db


async def test_pooled_connections_killed_by_the_server_are_replaced_on_checkout_postgres(pg_database: str) -> None:
    db = Database(pg_database, pool_size=2)
    try:
        pids = set()
        for _ in range(3):
            async with db.read() as session:
                pids.add(await session.scalar(text("SELECT pg_backend_pid()")))
            async with db.write() as session:
                await session.execute(text("SELECT 1"))
        assert db.engine.pool.checkedin() >= 1
        # As after a PostgreSQL restart or failover: every pooled connection is gone.
        await _pg_admin_db(pg_database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        async with db.read() as session:
            fresh = await session.scalar(text("SELECT pg_backend_pid()"))
        async with db.write() as session:
            assert await session.scalar(text("SELECT 41 + 1")) == 42
        assert fresh not in pids
    finally:
        await db.dispose()
