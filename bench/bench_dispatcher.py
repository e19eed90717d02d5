"""Dispatcher benchmark: webhook throughput against a bare aiohttp client, and lateness at a steady rate.

Run:  .venv/bin/python bench/bench_dispatcher.py --db sqlite
      .venv/bin/python bench/bench_dispatcher.py --db postgres \
          --pg-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres

A loopback aiohttp receiver runs in a separate process and checks every Standard Webhooks signature
with a precomputed HMAC key. With two or more cores the receiver is pinned to the last core and the
event-loop thread of this process (dispatcher or bare client) to the first; the database (SQLite's
worker threads, PostgreSQL's backends) is left to the scheduler. Figures printed:

  (a) dispatcher throughput: rows inserted already due, then claimed, sent and recorded (state
      `delivered` in the database), rows per second from the dispatcher's start to the last record;
  (b) a bare aiohttp client on uvloop, 64 requests in flight, posting the same signed bodies;
  (b') for reference, app.delivery.webhooks.WebhookSender alone (64 in flight), no database: the
      ceiling the sender itself puts on (a);
  (c) the ratio a/b (and a/b');
  (d) lateness at a steady rate (200/s for 10 s by default): rows are inserted ahead with due times
      spread at that rate; lateness = receiver arrival time - due time, both on the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-bench!").decode()
SPACE_ID = "1BenchSpace000"
CREATOR_ID = "2244994945"


# ---------------------------------------------------------------------------------------------
# The receiver (separate process)


def serve_receiver(port: int, cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import uvloop
    from aiohttp import web

    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    arrivals: list[tuple[str, float]] = []
    bad = 0

    async def handle(request: web.BaseRequest) -> web.Response:
        nonlocal bad
        if request.path == "/__stats":
            return web.json_response({"count": len(arrivals), "bad_signatures": bad, "arrivals": arrivals})
        if request.path == "/__reset":
            arrivals.clear()
            bad = 0
            return web.Response(text="reset")
        body = await request.read()
        arrived = time.time()
        headers = request.headers
        msg_id = headers.get("webhook-id", "")
        signed = f"{msg_id}.{headers.get('webhook-timestamp', '')}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        if not any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split(" ")):
            bad += 1
        arrivals.append((msg_id, arrived))
        return web.Response(text="ok")

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        loop = asyncio.get_running_loop()
        await loop.create_server(server, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


class Receiver:
    def __init__(self, cpu: int | None) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        args = [sys.executable, __file__, "--serve-receiver", str(self.port)]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("receiver did not start")

    async def stats(self) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/__stats") as r:
            return await r.json()

    async def reset(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/__reset") as r:
            await r.read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


# ---------------------------------------------------------------------------------------------
# Database set-up


async def prepare_database(kind: str, pg_url: str, tmp: Path) -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core import migrate

    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    else:
        import asyncpg

        base, _, _db = pg_url.rpartition("/")
        name = "spacebell_bench"
        admin = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url = f"{base}/{name}"
    engine = create_async_engine(url)
    await migrate.upgrade(engine)
    await engine.dispose()
    return url


async def seed(ctx: Any, receiver_url: str) -> dict[str, str]:
    from sqlalchemy import insert

    from app.accounts.models import Account
    from app.delivery.models import WebhookEndpoint
    from app.spaces.models import Creator, Space
    from app.subscriptions.models import Subscription

    now = datetime.now(UTC)
    ids = {"account": "acc_bench", "endpoint": "we_bench", "subscription": "sub_bench"}
    async with ctx.db.write() as s:
        await s.execute(insert(Account.__table__).values(id=ids["account"], name="bench", created_at=now))
        await s.execute(
            insert(WebhookEndpoint.__table__).values(
                id=ids["endpoint"], account_id=ids["account"], url=receiver_url, secret=SECRET,
                event_types=["space.reminder"], enabled=True, created_at=now, updated_at=now,
            )
        )
        await s.execute(
            insert(Creator.__table__).values(
                id=CREATOR_ID, username="XDevelopers", username_lower="xdevelopers", resolved_at=now
            )
        )
        await s.execute(
            insert(Space.__table__).values(
                id=SPACE_ID, creator_id=CREATOR_ID, title="Benchmark Space", state="scheduled",
                scheduled_start=now + timedelta(days=1), host_ids=[CREATOR_ID], first_seen_at=now,
                last_seen_at=now, revision=1, is_ticketed=False,
            )
        )
        await s.execute(
            insert(Subscription.__table__).values(
                id=ids["subscription"], account_id=ids["account"], target_kind="creator", creator_id=CREATOR_ID,
                include_hosts=False, target_status="active", webhook_endpoint_id=ids["endpoint"],
                lead_times=[15], event_types=["space.reminder"], paused=False, created_at=now, updated_at=now,
            )
        )
    return ids


async def insert_rows(ctx: Any, ids: dict[str, str], dues: list[datetime], start_index: int) -> list[str]:
    from sqlalchemy import insert

    from app.core.ids import new_id
    from app.delivery.models import Notification

    now = datetime.now(UTC)
    rows = []
    for i, due in enumerate(dues, start_index):
        rows.append(
            {
                "id": new_id("ntf"), "account_id": ids["account"], "subscription_id": ids["subscription"],
                "space_id": SPACE_ID, "kind": "space.reminder", "lead_time_minutes": i, "space_revision": 1,
                "channel": "webhook", "webhook_endpoint_id": ids["endpoint"], "email_recipient_id": None,
                "payload": None, "state": "pending", "state_reason": None, "due_at": due, "next_attempt_at": due,
                "expires_at": now + timedelta(days=1), "attempts": 0, "late": False, "created_at": now,
                "updated_at": now,
            }
        )
    async with ctx.db.write() as s:
        for start in range(0, len(rows), 2000):
            await s.execute(insert(Notification.__table__), rows[start : start + 2000])
    return [r["id"] for r in rows]


async def delivered_count(ctx: Any) -> int:
    from sqlalchemy import func, select

    from app.delivery.models import Notification

    async with ctx.db.session() as s:
        return int(await s.scalar(select(func.count()).where(Notification.state == "delivered")) or 0)


# ---------------------------------------------------------------------------------------------
# Measurements


CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN = len(CPUS) >= 2


def pin_loop_thread(on: bool) -> None:
    """Pin (or unpin) only the calling thread; threads started while pinned would inherit the pin."""
    if PIN:
        os.sched_setaffinity(threading.get_native_id(), {CPUS[0]} if on else set(CPUS))


async def warm_pool(ctx: Any, connections: int = 4) -> None:
    """Open the pool's connections (and SQLite's worker threads) before the loop thread is pinned."""
    from sqlalchemy import text

    async def touch() -> None:
        async with ctx.db.session() as s:
            await s.execute(text("SELECT 1"))
            await asyncio.sleep(0.05)

    await asyncio.gather(*(touch() for _ in range(connections)))


def make_context(url: str) -> Any:
    from app.core.context import AppContext
    from app.core.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        migrate_on_start=False,
        secret_key="bench-secret-key-bench-secret-key-0123456789",
        webhook_allow_http=True,
        webhook_allowed_networks=["127.0.0.0/8"],
    )
    return AppContext.from_settings(settings)


async def dispatcher_throughput(url: str, receiver: Receiver, rows: int) -> tuple[float, int]:
    from app.delivery.dispatcher import Dispatcher

    pin_loop_thread(False)
    ctx = make_context(url)
    ids = await seed(ctx, receiver.url)
    await insert_rows(ctx, ids, [datetime.now(UTC) - timedelta(seconds=1)] * rows, 0)
    await receiver.reset()
    await warm_pool(ctx)
    pin_loop_thread(True)
    dispatcher = Dispatcher(ctx)
    started = time.perf_counter()
    await dispatcher.start()
    while dispatcher.totals["delivered"] < rows:
        await asyncio.sleep(0.005)
    await dispatcher.settle()
    elapsed = time.perf_counter() - started
    await dispatcher.stop()
    pin_loop_thread(False)
    recorded = await delivered_count(ctx)
    await ctx.db.dispose()
    return rows / elapsed, recorded


async def bare_client_throughput(receiver: Receiver, rows: int, in_flight: int = 64) -> float:
    import aiohttp

    from app.delivery.webhooks import build_webhook_body, sign_webhook

    await receiver.reset()
    due = datetime.now(UTC)
    space = {
        "id": SPACE_ID, "title": "Benchmark Space", "state": "scheduled", "scheduled_start": due,
        "creator_id": CREATOR_ID, "creator_username": "XDevelopers", "url": f"https://x.com/i/spaces/{SPACE_ID}",
    }
    from app.core.ids import new_id

    jobs = [
        (new_id("ntf"), build_webhook_body(
            "space.reminder", due, {"space": space, "subscription_id": "sub_bench", "lead_time_minutes": i}
        ))
        for i in range(rows)
    ]
    queue = iter(jobs)
    pin_loop_thread(True)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for msg_id, body in queue:
                now = datetime.now(UTC)
                headers = {
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": sign_webhook(SECRET, msg_id, now, body),
                }
                async with http.post(receiver.url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    pin_loop_thread(False)
    return rows / elapsed


async def sender_alone_throughput(receiver: Receiver, rows: int, in_flight: int = 64) -> float:
    from app.delivery.webhooks import WebhookSender, build_webhook_body

    await receiver.reset()
    body = build_webhook_body("space.reminder", datetime.now(UTC), {"space": {"id": SPACE_ID}})
    pin_loop_thread(True)
    async with WebhookSender(max_in_flight=in_flight, allow_http=True, allowed_networks=["127.0.0.0/8"]) as sender:
        numbers = iter(range(rows))

        async def worker() -> None:
            for i in numbers:
                result = await sender.send(
                    receiver.url, SECRET, msg_id=f"ntf_alone{i}", body=body, timestamp=datetime.now(UTC)
                )
                assert result.delivered, result

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    pin_loop_thread(False)
    return rows / elapsed


async def lateness(url: str, receiver: Receiver, rate: float, seconds: float) -> dict[str, Any]:
    from sqlalchemy import delete

    from app.delivery.dispatcher import Dispatcher
    from app.delivery.models import DeliveryAttempt, Notification

    pin_loop_thread(False)
    ctx = make_context(url)
    async with ctx.db.write() as s:
        await s.execute(delete(DeliveryAttempt.__table__))
        await s.execute(delete(Notification.__table__))
    ids = {"account": "acc_bench", "endpoint": "we_bench", "subscription": "sub_bench"}
    count = int(rate * seconds)
    first_due = datetime.now(UTC) + timedelta(seconds=4)
    dues = [first_due + timedelta(seconds=i / rate) for i in range(count)]
    notification_ids = await insert_rows(ctx, ids, dues, 10_000_000)
    due_of = dict(zip(notification_ids, dues, strict=True))
    await receiver.reset()
    await warm_pool(ctx)
    pin_loop_thread(True)
    dispatcher = Dispatcher(ctx)
    await dispatcher.start()
    deadline = time.monotonic() + 4 + seconds + 10
    while dispatcher.totals["delivered"] < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await dispatcher.settle()
    await dispatcher.stop()
    pin_loop_thread(False)
    await ctx.db.dispose()
    stats = await receiver.stats()
    late_ms = sorted(
        (arrived - due_of[msg_id].timestamp()) * 1000.0 for msg_id, arrived in stats["arrivals"] if msg_id in due_of
    )
    early = sum(1 for v in late_ms if v < 0)
    return {
        "sent": len(late_ms),
        "expected": count,
        "bad_signatures": stats["bad_signatures"],
        "duplicates": len(stats["arrivals"]) - len({a[0] for a in stats["arrivals"]}),
        "early": early,
        "p50_ms": statistics.median(late_ms),
        "p99_ms": late_ms[min(len(late_ms) - 1, int(len(late_ms) * 0.99))],
        "max_ms": late_ms[-1],
        "min_ms": late_ms[0],
    }


async def run(args: argparse.Namespace) -> None:
    global PIN
    logging.basicConfig(level=logging.WARNING)
    PIN = PIN and not args.no_pin
    receiver = Receiver(CPUS[-1] if PIN else None)
    try:
        await asyncio.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.db:
                url = await prepare_database(kind, args.pg_url, Path(tmp))
                rate_a, recorded = await dispatcher_throughput(url, receiver, args.rows)
                stats = await receiver.stats()
                rate_b = await bare_client_throughput(receiver, args.rows)
                rate_s = await sender_alone_throughput(receiver, args.rows)
                late = await lateness(url, receiver, args.rate, args.seconds)
                where = f"loop thread on cpu {CPUS[0]}, receiver on cpu {CPUS[-1]}" if PIN else "not pinned"
                print(f"\n=== {kind} ({where}, uvloop, {args.rows} rows) ===")
                print(f"(a) dispatcher throughput : {rate_a:8.0f} webhooks/s  "
                      f"(recorded delivered: {recorded}/{args.rows}, received {stats['count']}, "
                      f"bad signatures {stats['bad_signatures']})")
                print(f"(b) bare aiohttp, 64 in flight: {rate_b:8.0f} webhooks/s")
                print(f"(b') WebhookSender alone   : {rate_s:8.0f} webhooks/s  "
                      f"(its own ratio to b: {rate_s / rate_b:.2f})")
                print(f"(c) ratio a/b             : {rate_a / rate_b:8.2f}   (a/b' {rate_a / rate_s:.2f})")
                print(f"(d) lateness at {args.rate:g}/s for {args.seconds:g} s: p50 {late['p50_ms']:.2f} ms, "
                      f"p99 {late['p99_ms']:.2f} ms, max {late['max_ms']:.2f} ms, min {late['min_ms']:.2f} ms "
                      f"(sent {late['sent']}/{late['expected']}, early {late['early']}, "
                      f"duplicates {late['duplicates']}, bad signatures {late['bad_signatures']})")
    finally:
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], action="append", help="database(s) to run against")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=20000, help="rows for the throughput runs")
    parser.add_argument("--rate", type=float, default=200.0, help="reminders per second for the lateness run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the lateness run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the two processes to separate cores")
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver, args.cpu)
        return
    args.db = args.db or ["sqlite", "postgres"]
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
