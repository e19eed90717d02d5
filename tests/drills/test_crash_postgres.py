"""Crash drill on PostgreSQL: three `spacebell worker` processes, one SIGKILLed mid-batch again and again.

Real processes, real leases, real wall-clock time: a killed worker's claimed rows stay `sending` until
their lease (3 s here) runs out, then the survivors reclaim and send them. What a dead worker had already
sent but not yet recorded goes out a second time; the receiver must be able to tell (same webhook-id).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.core.db import Database
from tests.conftest import TABLES, _pg_admin_db
from tests.drills.support import (
    SpacebellProcess,
    attempt_log,
    check_after_crashes,
    notification_rows,
    process_env,
    rows_leased_by,
    seed_world,
    state_counts,
    wait_until,
)
from tests.support.receivers import Reply, WebhookReceiver

SPACES = 40
SUBSCRIPTIONS = 75  # x 40 Spaces = 3000 reminders
WORKERS = 3
KILLS = 4
LEASE_SECONDS = 3


@pytest.mark.slow
async def test_sigkill_workers_mid_batch_loses_nothing(pg_database: str, tmp_path: Path) -> None:
    began = time.monotonic()
    await _pg_admin_db(pg_database, f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    db = Database(pg_database, pool_size=4)
    workers: list[SpacebellProcess] = []
    async with WebhookReceiver() as receiver:  # timestamps checked too: the workers use the real clock
        receiver.default_reply = Reply(200, b"ok", delay=0.03)  # keep batches in flight for a moment
        try:
            world = await seed_world(db, datetime.now(UTC), spaces=SPACES, subscriptions=SUBSCRIPTIONS,
                                     receiver=receiver)
            total = len(world.notification_ids)
            env = process_env(
                database_url=pg_database, migrate_on_start=False, webhook_allow_http=True,
                webhook_allowed_networks="127.0.0.0/8", dispatcher_lease_seconds=LEASE_SECONDS,
                dispatcher_batch_size=50, dispatcher_concurrency=8, dispatcher_idle_seconds=1,
                database_pool_size=4, smtp_port=9, log_level="INFO",
            )
            workers = [SpacebellProcess(f"worker{i}", ["worker"], env, tmp_path) for i in range(WORKERS)]
            for worker in workers:
                await worker.start()
            for worker in workers:
                await worker.wait_for_log("running dispatcher")

            async def delivered() -> int:
                return (await state_counts(db))["delivered"]

            orphaned: list[set[str]] = []
            for k in range(KILLS):
                victim = workers[k % WORKERS]
                # Pace the kills by progress, then catch the victim holding claimed rows (mid-batch).
                threshold = total * (k + 1) // (KILLS + 3)
                await wait_until(lambda t=threshold: _at_least(delivered, t), timeout=30, what=f"{threshold} delivered")
                await wait_until(lambda v=victim: rows_leased_by(db, v.pid), timeout=10, interval=0.01,
                                 what=f"{victim.name} to hold claimed rows")
                pid = victim.pid
                await victim.kill()
                left = await rows_leased_by(db, pid)  # what the dead worker claimed and never finished
                assert left, "the worker was killed with no claimed rows"
                orphaned.append(left)
                await victim.start()

            # A clean stop mid-batch (SIGTERM) hands back or finishes everything it claimed: no lease left.
            graceful = workers[1]
            await wait_until(lambda: rows_leased_by(db, graceful.pid), timeout=10, interval=0.01,
                             what=f"{graceful.name} to hold claimed rows")
            pid = graceful.pid
            assert await graceful.terminate() == 0, graceful.log()[-2000:]
            assert await rows_leased_by(db, pid) == set(), "a cleanly stopped worker left rows leased"
            await graceful.start()

            async def all_delivered() -> bool:
                counts = await state_counts(db)
                crashed = [w.name for w in workers if not w.running]
                assert not crashed, f"workers exited by themselves: {crashed}\n{workers[0].log()[-2000:]}"
                return counts["delivered"] == total

            await wait_until(all_delivered, timeout=40, interval=0.1, what=f"all {total} notifications delivered")
            for worker in workers:
                assert await worker.terminate() == 0, worker.log()[-2000:]
            received = list(receiver.received)
        finally:
            for worker in workers:
                await worker.ensure_dead()

    try:
        counts = await state_counts(db)
        assert counts == {"delivered": total}, counts
        rows = await notification_rows(db)
        log = await attempt_log(db)
    finally:
        await db.dispose()
    assert all(r["lease_token"] is None for r in rows.values())
    tally = check_after_crashes(world, received, rows, log, orphaned)
    print(
        f"\n[crash drill postgres] {total} notifications, {WORKERS} workers, {KILLS} SIGKILLs + 1 SIGTERM "
        f"(orphaned rows per kill: {[len(o) for o in orphaned]}), {tally.requests} webhook requests, "
        f"{tally.duplicates} duplicates (same webhook-id), {time.monotonic() - began:.1f}s"
    )


async def _at_least(count, threshold: int) -> bool:  # type: ignore[no-untyped-def]
    return await count() >= threshold
