"""Worker memory: peak RSS of a `spacebell worker` with 1,000,000 pending reminders in the database.

    .venv/bin/python bench/bench_rss.py                        # PostgreSQL, 1,000,000 rows, 30 s per scenario
    .venv/bin/python bench/bench_rss.py --quick                # 200,000 rows, 10 s
    .venv/bin/python bench/bench_rss.py --db sqlite --rows 1000000

Two scenarios against the same database (the rows go in with COPY on PostgreSQL):
  spread:  1,000,000 pending webhook reminders due over the next 24 hours; the worker runs for
           --seconds, claiming and sending what falls due (and counting the outbox every few seconds);
  backlog: the same rows all overdue (due over the past hour); the worker drains for --seconds.
The worker's peak resident set (VmHWM from /proc/<pid>/status, read just before it is stopped) and
its RSS sampled once a second are printed. Target: < 300 MB.
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
    Receiver,
    Workers,
    bench_database,
    count_state,
    insert_due,
    print_machine,
    seed_single_endpoint,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scenario(db: Any, receiver: Receiver, label: str, dues: list[datetime], seconds: float) -> None:
    started = time.perf_counter()
    await db.clear_outbox()
    await insert_due(db, dues)
    await db.analyze()
    loaded = time.perf_counter() - started
    pending = await count_state(db, "pending")
    await receiver.reset()
    pool = Workers(db, 1)
    try:
        await pool.ready()
        pid = pool.pids[0]
        samples = [rss_mb(pid)]
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            samples.append(rss_mb(pid))
        peak = pool.peak_rss_mb()[0]
        errors = pool.errors()
    finally:
        await pool.stop()
    delivered = await count_state(db, "delivered")
    verdict = "met" if peak < 300 else "NOT met"
    print(f"  {label:<8} {pending:,} pending (loaded in {loaded:.0f} s): peak RSS {peak:.0f} MB (target < 300 MB: {verdict}); "
          f"RSS after start {samples[0]:.0f} MB, then {min(samples):.0f}–{max(samples):.0f} MB over {seconds:g} s; "
          f"{delivered:,} delivered meanwhile" + (f" [worker errors: {errors[:2]}]" if errors else ""), flush=True)


async def run(args: argparse.Namespace) -> None:
    print_machine()
    receiver = Receiver(pin=not args.no_pin)
    try:
        async with bench_database(args.db, args.pg) as db:
            await seed_single_endpoint(db, receiver.url)
            print(f"\n{args.db}: one worker process, {args.rows:,} rows, {args.seconds:g} s per scenario", flush=True)
            now = datetime.now(UTC)
            step = 86_400 / args.rows
            spread = [now + timedelta(seconds=i * step) for i in range(args.rows)]
            await scenario(db, receiver, "spread", spread, args.seconds)
            now = datetime.now(UTC)
            step = 3_600 / args.rows
            backlog = [now - timedelta(seconds=3_600 - i * step) for i in range(args.rows)]
            await scenario(db, receiver, "backlog", backlog, args.seconds)
    finally:
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--pg", default=os.environ.get("SPACEBELL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200,000 rows, 10 s per scenario")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds = 200_000, 10.0
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
