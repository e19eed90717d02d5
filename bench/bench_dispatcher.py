"""Dispatcher benchmark: webhook throughput as a ratio to a bare aiohttp client, lateness, bursts.

    .venv/bin/python bench/bench_dispatcher.py                       # everything, SQLite and PostgreSQL
    .venv/bin/python bench/bench_dispatcher.py --quick
    .venv/bin/python bench/bench_dispatcher.py --db postgres --workers 1 2 4 --rows 20000

Every figure printed was measured in this run. Processes: a loopback receiver (aiohttp on uvloop, its
own process, pinned to the last CPU when there are two or more; it checks every signature), the
`spacebell worker` processes under test, and for the yardstick a bare aiohttp client on uvloop with 64
requests in flight (its own process) posting the same number of signed bodies of the same size to
the same receiver. Nothing else is pinned.

  (a) throughput: N rows due at the same instant T0 are inserted, workers are started before T0 and
      claim ahead; rate = N / (time the last row was recorded `delivered` - T0). The bare client runs
      right before and right after each measurement; ratio = rate / mean of those two bare rates.
      SQLite allows one writing process, so it is measured with one worker only.
  (b) lateness at a steady rate (200/s for 10 s): lateness = arrival at the receiver - due time;
      and a burst of 50,000 rows due at one instant: drain rate as in (a), and the lateness spread.
  CPU per webhook is printed for each process group (workers, receiver, the PostgreSQL backends of
  the benchmark database) and `others` = cores busy with unrelated work on the machine meanwhile:
  on a shared machine that is what moves the rates from one run to the next.
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
    CpuMeter,
    Receiver,
    Workers,
    bench_database,
    client_run,
    count_state,
    fmt_rate,
    insert_due,
    median,
    percentile,
    print_machine,
    seed_single_endpoint,
    wait_until_recorded,
)

LOOKAHEAD = 2.0  # the dispatcher_lookahead_seconds default: workers claim this early


async def dispatch(
    db: Any, receiver: Receiver, dues: list[datetime], workers: int, *, timeout: float, lateness: bool = False
) -> dict[str, Any]:
    """Insert rows due at `dues`, start `workers` worker processes, measure until all are recorded."""
    await db.clear_outbox()
    ids = await insert_due(db, dues)
    await db.analyze()
    await receiver.reset()
    t0 = dues[0].timestamp()
    pool = Workers(db, workers)
    try:
        ready_after = await pool.ready()
        late_start = time.time() > t0 - LOOKAHEAD
        await asyncio.sleep(max(0.0, t0 - time.time()))
        meter = CpuMeter(
            {"workers": pool.pids, "receiver": [receiver.pid], "bench": [os.getpid()], "database": await db.backend_pids()}
        )
        meter.begin()
        finished = await wait_until_recorded(db, t0, len(dues), timeout)
        used = meter.end({"database": await db.backend_pids()})
        rss = pool.peak_rss_mb()
        errors = pool.errors()
    finally:
        await pool.stop()
    last_due = dues[-1].timestamp()
    stats = await receiver.stats()
    result: dict[str, Any] = {
        "rows": len(dues),
        "seconds": finished - t0,
        "rate": len(dues) / max(1e-9, finished - t0),
        "delivered": await count_state(db, "delivered"),
        "received": stats["count"],
        "bad_signatures": stats["bad_signatures"],
        "duplicates": stats["duplicates"],
        "cpu_us": {k: v / len(dues) * 1e6 for k, v in used.items() if k not in ("wall", "others")},
        "others_cores": used["others"] / used["wall"],
        "ready_after": ready_after,
        "late_start": late_start,
        "rss_mb": rss,
        "errors": errors,
        "drain_after_last_due": finished - last_due,
    }
    if lateness:
        due_of = dict(zip(ids, (d.timestamp() for d in dues), strict=True))
        late_ms = sorted((t - due_of[i]) * 1000.0 for i, t in await receiver.arrivals() if i in due_of)
        result["late_ms"] = late_ms
    return result


def describe(label: str, r: dict[str, Any], bare: float | None) -> str:
    cpu = r["cpu_us"]
    parts = [f"workers {cpu['workers']:.0f}", f"receiver {cpu['receiver']:.0f}"]
    if cpu.get("database"):
        parts.append(f"PostgreSQL {cpu['database']:.0f}")
    ratio = f"ratio {r['rate'] / bare:.2f}" if bare else ""
    checks = (
        f"delivered {r['delivered']}/{r['rows']}, received {r['received']}, bad signatures {r['bad_signatures']}, "
        f"duplicates {r['duplicates']}"
    )
    warn = " [WARNING: workers were not ready before the rows fell due]" if r["late_start"] else ""
    if r["errors"]:
        warn += f" [worker errors: {r['errors'][:2]}]"
    return (
        f"  {label:<34} {fmt_rate(r['rate']):>9}  {ratio:<11} CPU/webhook µs: {', '.join(parts)}; "
        f"others busy {r['others_cores']:.2f} cores; peak RSS {max(r['rss_mb']):.0f} MB ({checks}){warn}"
    )


async def bare_rate(receiver: Receiver, rows: int, log: list[dict[str, Any]]) -> float:
    result = await client_run(receiver, rows, mode="bare")
    log.append(result)
    return result["rate"]


async def run(args: argparse.Namespace) -> None:
    print_machine()
    receiver = Receiver(pin=not args.no_pin)
    bare_log: list[dict[str, Any]] = []
    try:
        if "a" in args.parts:
            await throughput(args, receiver, bare_log)
        if "b" in args.parts:
            await lateness_and_burst(args, receiver, bare_log)
    finally:
        receiver.close()


async def throughput(args: argparse.Namespace, receiver: Receiver, bare_log: list[dict[str, Any]]) -> None:
    print(f"\n(a) throughput, {args.rows:,} rows due at one instant; bare aiohttp client: 64 in flight, "
          f"same receiver, run before and after each line", flush=True)
    sender = await client_run(receiver, args.rows, mode="sender")
    bare0 = await bare_rate(receiver, args.rows, bare_log)
    print(f"  {'WebhookSender alone (no database)':<34} {fmt_rate(sender['rate']):>9}  "
          f"ratio {sender['rate'] / bare0:.2f}  CPU/webhook µs: sender {sender['cpu_us']:.0f}, "
          f"receiver {sender['receiver_cpu_us']:.0f}; bare client {bare0:,.0f}/s, CPU/webhook µs: "
          f"client {bare_log[-1]['cpu_us']:.0f}, receiver {bare_log[-1]['receiver_cpu_us']:.0f}", flush=True)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for kind in args.db:
        async with bench_database(kind, args.pg) as db:
            await seed_single_endpoint(db, receiver.url)
            for workers in ([1] if kind == "sqlite" else args.workers):
                before = bare_log[-1]["rate"]
                t0 = datetime.now(UTC) + timedelta(seconds=args.start_allowance + 1.5 * workers)
                r = await dispatch(db, receiver, [t0] * args.rows, workers, timeout=args.timeout)
                after = await bare_rate(receiver, args.rows, bare_log)
                bare = (before + after) / 2
                r["bare"] = bare
                results[(kind, workers)] = r
                label = f"{kind}, {workers} worker process{'es' if workers > 1 else ''}"
                print(describe(label, r, bare) + f"; bare {before:,.0f}/s and {after:,.0f}/s", flush=True)
    bare_all = [b["rate"] for b in bare_log]
    print(f"  bare client over this run: median {median(bare_all):,.0f}/s, min {min(bare_all):,.0f}/s, "
          f"max {max(bare_all):,.0f}/s; CPU/webhook µs: client {median(b['cpu_us'] for b in bare_log):.0f}, "
          f"receiver {median(b['receiver_cpu_us'] for b in bare_log):.0f}")
    pg = {w: r for (k, w), r in results.items() if k == "postgres"}
    if 1 in pg and 2 in pg:
        verdict = "yes" if pg[2]["rate"] > pg[1]["rate"] else "no"
        print(f"  PostgreSQL, 2 workers > 1 worker? {verdict} "
              f"({pg[2]['rate']:,.0f}/s vs {pg[1]['rate']:,.0f}/s, ratios {pg[2]['rate'] / pg[2]['bare']:.2f} "
              f"vs {pg[1]['rate'] / pg[1]['bare']:.2f})")



async def lateness_and_burst(args: argparse.Namespace, receiver: Receiver, bare_log: list[dict[str, Any]]) -> None:
    if not bare_log:
        await bare_rate(receiver, min(args.burst, 50_000), bare_log)
    print(f"\n(b) lateness at {args.rate:g}/s for {args.seconds:g} s, and a burst of {args.burst:,} due at one "
          f"instant (1 worker process)", flush=True)
    for kind in args.db:
        async with bench_database(kind, args.pg) as db:
            await seed_single_endpoint(db, receiver.url)
            count = int(args.rate * args.seconds)
            start = datetime.now(UTC) + timedelta(seconds=args.start_allowance + 1.5)
            dues = [start + timedelta(seconds=i / args.rate) for i in range(count)]
            r = await dispatch(db, receiver, dues, 1, timeout=args.seconds + 60, lateness=True)
            late = r["late_ms"]
            early = sum(1 for v in late if v < 0)
            print(f"  {kind:<8} steady {args.rate:g}/s: lateness p50 {percentile(late, 0.5):.2f} ms, "
                  f"p99 {percentile(late, 0.99):.2f} ms, max {late[-1]:.2f} ms (received {len(late)}/{count}, "
                  f"early {early}, duplicates {r['duplicates']}, bad signatures {r['bad_signatures']}; "
                  f"others busy {r['others_cores']:.2f} cores)", flush=True)

            before = bare_log[-1]["rate"]
            t0 = datetime.now(UTC) + timedelta(seconds=args.start_allowance + 1.5)
            r = await dispatch(db, receiver, [t0] * args.burst, 1, timeout=args.timeout * 3, lateness=True)
            after = await bare_rate(receiver, min(args.burst, 50_000), bare_log)
            bare = (before + after) / 2
            late = r["late_ms"]
            print(f"  {kind:<8} burst {args.burst:,}: drained in {r['seconds']:.2f} s = {fmt_rate(r['rate'])}, "
                  f"ratio {r['rate'] / bare:.2f} to the bare client ({before:,.0f}/s and {after:,.0f}/s); "
                  f"lateness p50 {percentile(late, 0.5):.0f} ms, p99 {percentile(late, 0.99):.0f} ms, "
                  f"max {late[-1]:.0f} ms; CPU/webhook µs: workers {r['cpu_us']['workers']:.0f}"
                  + (f", PostgreSQL {r['cpu_us']['database']:.0f}" if r["cpu_us"].get("database") else "")
                  + f"; others busy {r['others_cores']:.2f} cores; peak RSS {max(r['rss_mb']):.0f} MB "
                  f"(delivered {r['delivered']}/{args.burst}, duplicates {r['duplicates']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--pg", default=os.environ.get("SPACEBELL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="an admin connection; a scratch database is created beside it and dropped")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker processes (PostgreSQL)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows per throughput measurement")
    parser.add_argument("--rate", type=float, default=200.0, help="rows per second in the lateness run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the lateness run")
    parser.add_argument("--burst", type=int, default=50_000, help="rows due at one instant in the burst run")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--start-allowance", type=float, default=4.0, help="seconds given to workers to start")
    parser.add_argument("--parts", nargs="+", choices=["a", "b"], default=["a", "b"], help="(a) throughput, (b) lateness and burst")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the receiver to the last CPU")
    parser.add_argument("--quick", action="store_true", help="smaller runs: 5,000 rows, 1 and 2 workers, 5 s, 10,000 burst")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds, args.burst = 5_000, 5.0, 10_000
        args.workers = [w for w in args.workers if w <= 2] or [1]
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
