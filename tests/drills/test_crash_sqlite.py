"""Crash drill on SQLite: the whole service (`spacebell serve`: API, discovery, dispatcher) SIGKILLed and
restarted on one database file; and a second process on that file is refused by the writer lock.

Discovery polls a simulated X that knows the same creator and Spaces as the database, so the service
runs exactly as deployed (it must not mistake a Space for canceled while it is being killed either).
"""

from __future__ import annotations

import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.core.db import Database
from app.x.sim import SimState, create_sim_app, running_sim
from tests.conftest import free_port
from tests.drills.support import (
    CREATOR,
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

SPACES = 30
SUBSCRIPTIONS = 50  # x 30 Spaces = 1500 reminders
KILLS = 3
LEASE_SECONDS = 3
REFUSED = "another Spacebell process already writes to"


@pytest.mark.slow
async def test_sigkill_the_whole_service_on_sqlite_loses_nothing(sqlite_template: Path, tmp_path: Path) -> None:
    began = time.monotonic()
    path = tmp_path / "spacebell.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite+aiosqlite:///{path}"
    db = Database(url)
    sim_state = SimState(seed=3)  # follows real time, like the service's own clock
    sim_state.add_user("DrillHost", id=CREATOR)
    service: SpacebellProcess | None = None
    others: list[SpacebellProcess] = []
    async with WebhookReceiver() as receiver, running_sim(create_sim_app(sim_state, bearer_token="sim-token")) as sim:
        receiver.default_reply = Reply(200, b"ok", delay=0.03)
        try:
            world = await seed_world(db, datetime.now(UTC), spaces=SPACES, subscriptions=SUBSCRIPTIONS,
                                     receiver=receiver)
            for i, space_id in enumerate(world.space_ids):
                sim_state.add_space(CREATOR, f"Drill {i}", scheduled_start=world.start, id=space_id)
            total = len(world.notification_ids)
            port = free_port()
            env = process_env(
                database_url=url, migrate_on_start=False, webhook_allow_http=True,
                webhook_allowed_networks="127.0.0.0/8", dispatcher_lease_seconds=LEASE_SECONDS,
                dispatcher_batch_size=50, dispatcher_concurrency=8, dispatcher_idle_seconds=1,
                x_api_base_url=sim.base_url, x_bearer_token="sim-token", smtp_port=9, log_level="INFO",
            )
            base = f"http://127.0.0.1:{port}"
            service = SpacebellProcess("serve", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)
            await service.start()
            await service.wait_healthy(base)

            # A second process on the same file is refused, whichever role it runs.
            second_worker = SpacebellProcess("second-worker", ["worker"], env, tmp_path)
            second_serve = SpacebellProcess(
                "second-serve", ["serve", "--host", "127.0.0.1", "--port", str(free_port())], env, tmp_path
            )
            others = [second_worker, second_serve]
            await second_worker.start()
            status, output = await second_worker.run_to_exit()
            assert status == 1, output
            assert output.strip().splitlines()[-1] == (
                f"spacebell: {REFUSED} {path}; SQLite allows one process (use PostgreSQL to run several)"
            ), output
            await second_serve.start()
            status, output = await second_serve.run_to_exit()
            assert status != 0 and REFUSED in output, (status, output)
            assert service.running

            async def delivered() -> int:
                return (await state_counts(db))["delivered"]

            orphaned: list[set[str]] = []
            for k in range(KILLS):
                threshold = total * (k + 1) // (KILLS + 3)
                await wait_until(lambda t=threshold: _at_least(delivered, t), timeout=30, what=f"{threshold} delivered")
                await wait_until(lambda: rows_leased_by(db, service.pid), timeout=10, interval=0.01,
                                 what="the service to hold claimed rows")
                pid = service.pid
                await service.kill()
                left = await rows_leased_by(db, pid)
                assert left, "the service was killed with no claimed rows"
                orphaned.append(left)
                await service.start()  # the kernel dropped the dead process's lock: the restart is allowed
                await service.wait_healthy(base)

            # A clean stop mid-batch (SIGTERM) hands back or finishes everything it claimed: no lease left.
            await wait_until(lambda: rows_leased_by(db, service.pid), timeout=10, interval=0.01,
                             what="the service to hold claimed rows")
            pid = service.pid
            assert await service.terminate() in (0, -signal.SIGTERM), service.log()[-2000:]
            assert await rows_leased_by(db, pid) == set(), "a cleanly stopped service left rows leased"
            await service.start()
            await service.wait_healthy(base)

            async def all_delivered() -> bool:
                assert service is not None and service.running, f"service exited:\n{service and service.log()[-2000:]}"
                return (await state_counts(db))["delivered"] == total

            await wait_until(all_delivered, timeout=40, interval=0.1, what=f"all {total} notifications delivered")
            # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly (exit status -15).
            assert await service.terminate() in (0, -signal.SIGTERM), service.log()[-2000:]
            assert "Application shutdown complete" in service.log(), service.log()[-2000:]
            received = list(receiver.received)
        finally:
            for process in [*others, *([service] if service else [])]:
                await process.ensure_dead()

    try:
        counts = await state_counts(db)
        rows = await notification_rows(db)
        log = await attempt_log(db)
    finally:
        await db.dispose()
    assert counts == {"delivered": total}, counts
    tally = check_after_crashes(world, received, rows, log, orphaned)
    print(
        f"\n[crash drill sqlite] {total} notifications, `spacebell serve` SIGKILLed {KILLS} times + 1 SIGTERM "
        f"(orphaned rows per kill: {[len(o) for o in orphaned]}), {tally.requests} webhook requests, "
        f"{tally.duplicates} duplicates (same webhook-id), {time.monotonic() - began:.1f}s"
    )


async def _at_least(count, threshold: int) -> bool:  # type: ignore[no-untyped-def]
    return await count() >= threshold
