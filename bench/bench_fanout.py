"""Fan-out benchmark: one creator with 100,000 webhook subscribers schedules a Space.

    .venv/bin/python bench/bench_fanout.py                    # SQLite and PostgreSQL, 100,000 subscribers
    .venv/bin/python bench/bench_fanout.py --quick            # 20,000 subscribers
    .venv/bin/python bench/bench_fanout.py --db postgres --subscribers 100000 --workers 2

Per database, in one run:
  1. set-up (not timed): 1,000 webhook endpoints (each with its own URL path and secret on the loopback
     receiver), N creator subscriptions spread over them (lead time 15 min, reminders only), the
     creator's Space starting in 15 min + a margin, and its `space.scheduled` SpaceEvent;
  2. fan-out (target <= 5 s): one `ReminderOutbox.fan_out_events` call in one write transaction, timed
     from the start of the transaction to its commit; it matches the subscriptions and inserts N
     reminder rows;
  3. delivery: `spacebell worker` processes (started while the rows are not yet due) send the N
     reminders, all due at the same instant; rate = N / (last row recorded - due time), and the bare
     aiohttp client posts N signed bodies to the same receiver right after -> ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    ACCOUNT_ID,
    CREATOR_ID,
    SPACE_ID,
    CpuMeter,
    Receiver,
    Workers,
    bench_database,
    client_run,
    count_state,
    endpoint_secret,
    fmt_rate,
    make_context,
    print_machine,
    wait_until_recorded,
)

LEAD_MINUTES = 15


async def seed(db: Any, receiver: Receiver, subscribers: int, endpoints: int, start: datetime) -> None:
    from sqlalchemy import insert

    from app.accounts.models import Account
    from app.delivery.models import WebhookEndpoint
    from app.spaces.models import Creator, Space, SpaceEvent
    from app.subscriptions.models import Subscription

    now = datetime.now(UTC)
    ctx = make_context(db)
    try:
        async with ctx.db.write() as s:
            await s.execute(insert(Account.__table__).values(id=ACCOUNT_ID, name="bench", created_at=now))
            await s.execute(
                insert(WebhookEndpoint.__table__),
                [
                    {
                        "id": f"we_bench{i}", "account_id": ACCOUNT_ID, "url": f"{receiver.base}/hook/{i}",
                        "secret": endpoint_secret(i), "event_types": ["space.reminder"], "enabled": True,
                        "created_at": now, "updated_at": now,
                    }
                    for i in range(endpoints)
                ],
            )
            await s.execute(
                insert(Creator.__table__).values(
                    id=CREATOR_ID, username="XDevelopers", username_lower="xdevelopers", resolved_at=now
                )
            )
            await s.execute(
                insert(Space.__table__).values(
                    id=SPACE_ID, creator_id=CREATOR_ID, title="Benchmark Space", state="scheduled",
                    scheduled_start=start, host_ids=[CREATOR_ID], first_seen_at=now, last_seen_at=now, revision=1,
                    is_ticketed=False,
                )
            )
            for first in range(0, subscribers, 10_000):
                await s.execute(
                    insert(Subscription.__table__),
                    [
                        {
                            "id": f"sub_bench{i:07d}", "account_id": ACCOUNT_ID, "target_kind": "creator",
                            "creator_id": CREATOR_ID, "include_hosts": False, "target_status": "active",
                            "webhook_endpoint_id": f"we_bench{i % endpoints}", "lead_times": [LEAD_MINUTES],
                            "event_types": ["space.reminder"], "paused": False, "created_at": now, "updated_at": now,
                        }
                        for i in range(first, min(subscribers, first + 10_000))
                    ],
                )
            await s.execute(
                insert(SpaceEvent.__table__).values(
                    space_id=SPACE_ID, kind="space.scheduled", revision=1, occurred_at=now, scheduled_start=start
                )
            )
    finally:
        await ctx.db.dispose()


async def fan_out(db: Any) -> tuple[float, dict[str, float]]:
    """Seconds from the start of the fan-out's transaction to its commit, and the CPU it used."""
    from sqlalchemy import text

    from app.delivery.outbox import ReminderOutbox

    ctx = make_context(db)
    outbox = ReminderOutbox.from_settings(ctx.settings)
    try:
        async with ctx.db.session() as session:  # open the pool's connection before the clock starts
            backend = [await session.scalar(text("SELECT pg_backend_pid()"))] if db.kind == "postgres" else []
        meter = CpuMeter({"bench": [os.getpid()], "database": backend})
        meter.begin()
        started = time.perf_counter()
        async with ctx.db.write() as session:
            await outbox.fan_out_events(session, datetime.now(UTC))
        elapsed = time.perf_counter() - started
        used = meter.end()
    finally:
        await ctx.db.dispose()
    return elapsed, used


async def run(args: argparse.Namespace) -> None:
    print_machine()
    receiver = Receiver(pin=not args.no_pin)
    try:
        for kind in args.db:
            async with bench_database(kind, args.pg) as db:
                start = datetime.now(UTC) + timedelta(minutes=LEAD_MINUTES, seconds=args.margin)
                due = start - timedelta(minutes=LEAD_MINUTES)
                await seed(db, receiver, args.subscribers, args.endpoints, start)
                await db.analyze()
                elapsed, used = await fan_out(db)
                rows = await count_state(db, "pending")
                verdict = "met" if elapsed <= 5.0 else "NOT met"
                print(f"\n{kind}: fan-out of 1 event to {args.subscribers:,} subscribers ({args.endpoints:,} endpoints): "
                      f"{rows:,} reminder rows in {elapsed:.2f} s ({rows / elapsed:,.0f} rows/s; target <= 5 s: "
                      f"{verdict})", flush=True)
                print(f"  fan-out CPU: bench {used['bench']:.2f} s"
                      + (f", PostgreSQL {used['database']:.2f} s" if kind == "postgres" else "")
                      + f"; others busy {used['others'] / used['wall']:.2f} cores", flush=True)
                if rows != args.subscribers:
                    print(f"  WARNING: expected {args.subscribers:,} rows, found {rows:,}")
                if args.no_delivery:
                    continue
                await receiver.reset()
                workers = 1 if kind == "sqlite" else args.workers
                pool = Workers(db, workers)
                try:
                    await pool.ready()
                    if time.time() > due.timestamp() - 2:
                        print("  WARNING: the reminders fell due before the workers were ready (raise --margin)")
                    await asyncio.sleep(max(0.0, due.timestamp() - time.time()))
                    meter = CpuMeter({"workers": pool.pids, "receiver": [receiver.pid], "bench": [os.getpid()],
                                      "database": await db.backend_pids()})
                    meter.begin()
                    finished = await wait_until_recorded(db, due.timestamp(), rows, args.timeout)
                    used = meter.end({"database": await db.backend_pids()})
                    rss = max(pool.peak_rss_mb())
                finally:
                    await pool.stop()
                seconds = finished - due.timestamp()
                delivered = await count_state(db, "delivered")
                stats = await receiver.stats()
                bare = await client_run(receiver, rows, mode="bare")
                cpu = {k: v / rows * 1e6 for k, v in used.items() if k not in ("wall", "others")}
                print(f"  delivery with {workers} worker process{'es' if workers > 1 else ''}: {rows:,} in "
                      f"{seconds:.2f} s = {fmt_rate(rows / seconds)}; bare aiohttp client right after: "
                      f"{fmt_rate(bare['rate'])} -> ratio {rows / seconds / bare['rate']:.2f}", flush=True)
                print(f"  CPU/webhook µs: workers {cpu['workers']:.0f}, receiver {cpu['receiver']:.0f}"
                      + (f", PostgreSQL {cpu['database']:.0f}" if cpu.get("database") else "")
                      + f"; others busy {used['others'] / used['wall']:.2f} cores; peak worker RSS {rss:.0f} MB; "
                      f"delivered {delivered:,}/{rows:,}, received {stats['count']:,}, bad signatures "
                      f"{stats['bad_signatures']}, duplicates {stats['duplicates']}", flush=True)
    finally:
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--pg", default=os.environ.get("SPACEBELL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--endpoints", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for the delivery (1 on SQLite)")
    parser.add_argument("--margin", type=float, default=25.0,
                        help="seconds between the fan-out and the reminders' due time (covers fan-out and start-up)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-delivery", action="store_true", help="time the fan-out only")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20,000 subscribers, 12 s margin")
    args = parser.parse_args()
    if args.quick:
        args.subscribers, args.margin = 20_000, 12.0
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
