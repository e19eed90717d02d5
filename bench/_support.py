"""Shared pieces of the benchmarks (not a benchmark itself, and not a test).

Processes the benchmarks start from here:

    python bench/_support.py receiver --port P [--cpu N]
        the loopback webhook receiver: aiohttp's low-level server on uvloop, checking every
        Standard Webhooks signature (HMAC keyed once per secret), recording arrival times;
    python bench/_support.py client --url U --count N [--in-flight 64] [--mode M] [--loop uvloop|asyncio]
        `bare`: a bare aiohttp client on uvloop, N signed POSTs with 64 in flight (the yardstick);
        `sender`: the same through app.delivery.webhooks.WebhookSender (no database);
        `httpx`, `httpx-aiohttp`: the same through httpx.AsyncClient, or httpx with the httpx-aiohttp
        transport (for bench_http_clients.py); prints one JSON line with its rate and CPU per request.

Workers are real `spacebell worker` processes (`python -m app.cli worker`), configured through
SPACEBELL_* variables and started in an empty directory (no .env file is read).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: `PYTHONPATH=<other tree>` benchmarks that tree's `app`

PYTHON = sys.executable
SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-bench!").decode()
CREATOR_ID = "2244994945"
SPACE_ID = "1BenchSpace000"
ACCOUNT_ID = "acc_bench"
ENDPOINT_ID = "we_bench"
SUBSCRIPTION_ID = "sub_bench"
SECRET_KEY = "bench-secret-key-bench-secret-key-0123456789"
DEFAULT_PG = os.environ.get("SPACEBELL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def endpoint_secret(index: int) -> str:
    """The secret of bench endpoint `index` (the receiver derives the same one from the URL path)."""
    return "whsec_" + base64.b64encode(hashlib.sha256(f"bench-endpoint-{index}".encode()).digest()).decode()


# ---------------------------------------------------------------------------------------------
# Machine and process facts


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    import uvloop

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "loadavg": os.getloadavg(),
    }


def print_machine() -> None:
    m = machine()
    print(
        f"# {m['date']} · {m['nproc']} CPUs ({m['cpu']}) · Python {m['python']} · aiohttp {m['aiohttp']} · "
        f"uvloop {m['uvloop']} · load average {m['loadavg'][0]:.2f} {m['loadavg'][1]:.2f} {m['loadavg'][2]:.2f}",
        flush=True,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set size of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all CPUs) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


@dataclass
class CpuMeter:
    """CPU used by named processes (and by everything else on the machine) over one measurement."""

    pids: dict[str, list[int]]
    start: dict[int, float] = field(default_factory=dict)
    busy_start: float = 0.0
    wall_start: float = 0.0

    def begin(self) -> None:
        self.start = {pid: cpu_seconds(pid) for pids in self.pids.values() for pid in pids}
        self.busy_start = machine_busy_seconds()
        self.wall_start = time.perf_counter()

    def end(self, extra: dict[str, list[int]] | None = None) -> dict[str, float]:
        """CPU seconds per name; `others` = busy time of processes not named (other users' work)."""
        wall = time.perf_counter() - self.wall_start
        used: dict[str, float] = {}
        for name, pids in {**self.pids, **(extra or {})}.items():
            used[name] = sum(max(0.0, cpu_seconds(pid) - self.start.get(pid, 0.0)) for pid in pids)
        ours = sum(used.values())
        used["others"] = max(0.0, machine_busy_seconds() - self.busy_start - ours)
        used["wall"] = wall
        return used


# ---------------------------------------------------------------------------------------------
# The receiver (its own process)


def serve_receiver(port: int, cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import uvloop
    from aiohttp import web

    keyed: dict[str, Any] = {}

    def key_for(path: str) -> Any:
        mac = keyed.get(path)
        if mac is None:
            tail = path.rsplit("/", 1)[-1]
            secret = endpoint_secret(int(tail)) if tail.isdigit() else SECRET
            raw = base64.b64decode(secret.removeprefix("whsec_"))
            mac = keyed[path] = hmac.new(raw, digestmod=hashlib.sha256)
        return mac

    arrivals: list[tuple[str, float]] = []
    seen: set[str] = set()
    counters = {"bad": 0, "duplicates": 0}

    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path.startswith("/__"):
            if path == "/__stats":
                return web.json_response(
                    {
                        "count": len(arrivals), "bad_signatures": counters["bad"], "duplicates": counters["duplicates"],
                        "first": arrivals[0][1] if arrivals else None, "last": arrivals[-1][1] if arrivals else None,
                    }
                )
            if path == "/__arrivals":
                return web.json_response(arrivals)
            if path == "/__reset":
                arrivals.clear()
                seen.clear()
                counters.update(bad=0, duplicates=0)
                return web.Response(text="reset")
        body = await request.read()
        arrived = time.time()
        headers = request.headers
        msg_id = headers.get("webhook-id", "")
        mac = key_for(path).copy()
        mac.update(f"{msg_id}.{headers.get('webhook-timestamp', '')}.".encode())
        mac.update(body)
        expected = "v1," + base64.b64encode(mac.digest()).decode()
        if not any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split(" ")):
            counters["bad"] += 1
        if msg_id in seen:
            counters["duplicates"] += 1
        seen.add(msg_id)
        arrivals.append((msg_id, arrived))
        return web.Response(text="ok")

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        loop = asyncio.get_running_loop()
        await loop.create_server(server, "127.0.0.1", port, backlog=2048)
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


class Receiver:
    """The receiver process, pinned to the last CPU when there are two or more (and `pin`)."""

    def __init__(self, pin: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/hook"
        self.cpu = CPUS[-1] if pin and len(CPUS) >= 2 else None
        args = [PYTHON, __file__, "receiver", "--port", str(self.port)]
        if self.cpu is not None:
            args += ["--cpu", str(self.cpu)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("receiver did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _get(self, path: str) -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            return await response.json(content_type=None) if path != "/__reset" else await response.text()

    async def stats(self) -> dict[str, Any]:
        return await self._get("/__stats")

    async def arrivals(self) -> list[tuple[str, float]]:
        return [(a[0], a[1]) for a in await self._get("/__arrivals")]

    async def reset(self) -> None:
        await self._get("/__reset")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------
# The bare client and the sender alone (their own process)


def sample_body(index: int, due: datetime) -> bytes:
    """A body of the same shape and size as the dispatcher's reminder bodies."""
    stamp = due.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f'{{"type":"space.reminder","timestamp":"{stamp}","data":{{"space":{{"id":"{SPACE_ID}",'
        f'"title":"Benchmark Space","state":"scheduled","scheduled_start":"{stamp}","creator_id":"{CREATOR_ID}",'
        f'"creator_username":"XDevelopers","url":"https://x.com/i/spaces/{SPACE_ID}"}},'
        f'"subscription_id":"{SUBSCRIPTION_ID}","lead_time_minutes":{index}}}}}'
    ).encode()


def run_client(url: str, count: int, in_flight: int, mode: str, cpu: int | None, loop: str = "uvloop") -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import uvloop

    due = datetime.now(UTC)
    jobs = [(f"ntf_{mode.replace('-', '')}{os.getpid()}x{i}", sample_body(i, due)) for i in range(count)]
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    keyed = hmac.new(raw, digestmod=hashlib.sha256)

    def signed_headers(msg_id: str, body: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        mac = keyed.copy()
        mac.update(f"{msg_id}.{stamp}.".encode())
        mac.update(body)
        return {
            "content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": stamp,
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        }

    async def httpx_client() -> float:
        """The same requests through httpx.AsyncClient (mode httpx), or through httpx with the
        httpx-aiohttp transport (mode httpx-aiohttp; `pip install httpx-aiohttp`)."""
        import httpx

        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        if mode == "httpx-aiohttp":
            from httpx_aiohttp import HttpxAiohttpClient

            client: Any = HttpxAiohttpClient(limits=limits)
        else:
            client = httpx.AsyncClient(limits=limits)
        queue = iter(jobs)
        async with client:

            async def worker() -> None:
                for msg_id, body in queue:
                    response = await client.post(url, content=body, headers=signed_headers(msg_id, body))
                    if response.status_code != 200:
                        raise RuntimeError(f"receiver answered {response.status_code}")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return time.perf_counter() - started

    async def bare() -> float:
        import aiohttp

        queue = iter(jobs)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as http:

            async def worker() -> None:
                for msg_id, body in queue:
                    async with http.post(url, data=body, headers=signed_headers(msg_id, body)) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"receiver answered {response.status}")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return time.perf_counter() - started

    async def sender() -> float:
        from app.delivery.webhooks import WebhookSender

        queue = iter(jobs)
        async with WebhookSender(max_in_flight=in_flight, allow_http=True, allowed_networks=["127.0.0.0/8"]) as s:

            async def worker() -> None:
                for msg_id, body in queue:
                    result = await s.send(url, SECRET, msg_id=msg_id, body=body, timestamp=datetime.now(UTC))
                    if not result.delivered:
                        raise RuntimeError(str(result))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return time.perf_counter() - started

    main = {"bare": bare, "sender": sender, "httpx": httpx_client, "httpx-aiohttp": httpx_client}[mode]
    cpu_before = time.process_time()
    seconds = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    used = time.process_time() - cpu_before
    print(json.dumps({"count": count, "seconds": seconds, "rate": count / seconds, "cpu_us": used / count * 1e6}))


async def client_run(
    receiver: Receiver, count: int, *, mode: str = "bare", in_flight: int = 64, cpu: int | None = None,
    loop: str = "uvloop",
) -> dict[str, Any]:
    """Run the bare client (or the sender alone) in a fresh process; its rate, CPU and the receiver's."""
    await receiver.reset()
    args = [PYTHON, __file__, "client", "--url", receiver.url, "--count", str(count), "--in-flight", str(in_flight),
            "--mode", mode, "--loop", loop]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE)
    meter = CpuMeter({"receiver": [receiver.pid], "bench": [os.getpid()]})
    meter.begin()
    out, _ = await proc.communicate()
    used = meter.end()
    if proc.returncode:
        raise RuntimeError(f"{mode} client failed")
    result = json.loads(out.decode().strip().splitlines()[-1])
    stats = await receiver.stats()
    client_cpu = result["cpu_us"] * count / 1e6  # it measured itself: it has exited by now
    result["receiver_cpu_us"] = used["receiver"] / count * 1e6
    result["others_cores"] = max(0.0, used["others"] - client_cpu) / used["wall"]
    result["bad_signatures"] = stats["bad_signatures"]
    return result


# ---------------------------------------------------------------------------------------------
# Databases


@dataclass
class BenchDatabase:
    kind: str  # "sqlite" or "postgres"
    url: str  # SQLAlchemy async URL
    name: str  # PostgreSQL database name, or the SQLite file
    admin_url: str | None = None

    @property
    def asyncpg_dsn(self) -> str:
        return self.url.replace("postgresql+asyncpg://", "postgresql://")

    async def execute(self, *statements: str) -> None:
        if self.kind == "postgres":
            import asyncpg

            conn = await asyncpg.connect(self.asyncpg_dsn)
            try:
                for statement in statements:
                    await conn.execute(statement)
            finally:
                await conn.close()
        else:
            import sqlite3

            conn = sqlite3.connect(self.name, timeout=30)
            try:
                for statement in statements:
                    conn.execute(statement)
                conn.commit()
            finally:
                conn.close()

    async def scalar(self, query: str) -> Any:
        if self.kind == "postgres":
            import asyncpg

            conn = await asyncpg.connect(self.asyncpg_dsn)
            try:
                return await conn.fetchval(query)
            finally:
                await conn.close()
        import sqlite3

        conn = sqlite3.connect(self.name, timeout=30)
        try:
            return conn.execute(query).fetchone()[0]
        finally:
            conn.close()

    async def clear_outbox(self) -> None:
        if self.kind == "postgres":
            await self.execute("TRUNCATE delivery_attempt, notification", "VACUUM ANALYZE notification")
        else:
            await self.execute("DELETE FROM delivery_attempt", "DELETE FROM notification")

    async def analyze(self) -> None:
        """Fresh planner statistics, as autovacuum keeps them in a running service (a table filled
        a second ago and never analyzed gets plans made for an empty table)."""
        if self.kind == "postgres":
            await self.execute("ANALYZE")
        else:
            await self.execute("ANALYZE")

    async def backend_pids(self) -> list[int]:
        """PostgreSQL server processes connected to this database (their CPU is the database's share)."""
        if self.kind != "postgres":
            return []
        import asyncpg

        conn = await asyncpg.connect(self.admin_url or DEFAULT_PG)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", self.name
            )
        finally:
            await conn.close()
        return [r[0] for r in rows]


@asynccontextmanager
async def bench_database(kind: str, pg_admin: str = DEFAULT_PG):  # type: ignore[no-untyped-def]
    """A new, migrated database (a temporary SQLite file, or a PostgreSQL database), dropped afterwards."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core import migrate

    tmp = tempfile.TemporaryDirectory(prefix="spacebell-bench-")
    db: BenchDatabase
    if kind == "sqlite":
        path = Path(tmp.name) / "bench.db"
        db = BenchDatabase("sqlite", f"sqlite+aiosqlite:///{path}", str(path))
    else:
        import asyncpg

        name = f"spacebell_bench_{os.getpid()}_{int(time.time() * 1000) % 100000}"
        admin = await asyncpg.connect(pg_admin)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        base = pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        db = BenchDatabase("postgres", f"{base}/{name}", name, pg_admin)
    try:
        engine = create_async_engine(db.url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        yield db
    finally:
        if kind == "postgres":
            import asyncpg

            admin = await asyncpg.connect(pg_admin)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
            finally:
                await admin.close()
        tmp.cleanup()


def settings_env(db: BenchDatabase, **extra: Any) -> dict[str, str]:
    """SPACEBELL_* variables for processes of the benchmark."""
    env = {
        "SPACEBELL_DATABASE_URL": db.url,
        "SPACEBELL_MIGRATE_ON_START": "false",
        "SPACEBELL_SECRET_KEY": SECRET_KEY,
        "SPACEBELL_WEBHOOK_ALLOW_HTTP": "true",
        "SPACEBELL_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "SPACEBELL_LOG_LEVEL": "INFO",
    }
    env.update({f"SPACEBELL_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def make_context(db: BenchDatabase, **extra: Any) -> Any:
    from app.core.context import AppContext
    from app.core.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=db.url,
        migrate_on_start=False,
        secret_key=SECRET_KEY,
        webhook_allow_http=True,
        webhook_allowed_networks=["127.0.0.0/8"],
        **extra,
    )
    return AppContext.from_settings(settings)


async def seed_single_endpoint(db: BenchDatabase, receiver_url: str) -> None:
    """One account, endpoint, creator, scheduled Space (a day ahead) and subscription."""
    from sqlalchemy import insert

    from app.accounts.models import Account
    from app.delivery.models import WebhookEndpoint
    from app.spaces.models import Creator, Space
    from app.subscriptions.models import Subscription

    now = datetime.now(UTC)
    ctx = make_context(db)
    try:
        async with ctx.db.write() as s:
            await s.execute(insert(Account.__table__).values(id=ACCOUNT_ID, name="bench", created_at=now))
            await s.execute(
                insert(WebhookEndpoint.__table__).values(
                    id=ENDPOINT_ID, account_id=ACCOUNT_ID, url=receiver_url, secret=SECRET,
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
                    scheduled_start=now + timedelta(days=30), host_ids=[CREATOR_ID], first_seen_at=now,
                    last_seen_at=now, revision=1, is_ticketed=False,
                )
            )
            await s.execute(
                insert(Subscription.__table__).values(
                    id=SUBSCRIPTION_ID, account_id=ACCOUNT_ID, target_kind="creator", creator_id=CREATOR_ID,
                    include_hosts=False, target_status="active", webhook_endpoint_id=ENDPOINT_ID,
                    lead_times=[15], event_types=["space.reminder"], paused=False, created_at=now, updated_at=now,
                )
            )
    finally:
        await ctx.db.dispose()


NOTIFICATION_COLUMNS = (
    "id", "account_id", "subscription_id", "space_id", "kind", "lead_time_minutes", "space_revision", "channel",
    "webhook_endpoint_id", "email_recipient_id", "payload", "state", "state_reason", "due_at", "next_attempt_at",
    "expires_at", "attempts", "late", "created_at", "updated_at",
)


async def insert_due(db: BenchDatabase, dues: Sequence[datetime], first_lead: int = 0) -> list[str]:
    """Pending webhook reminders for the seeded subscription, one per due time (COPY on PostgreSQL)."""
    from app.core.ids import new_id

    now = datetime.now(UTC)
    expires = now + timedelta(days=29)
    ids = [new_id("ntf") for _ in dues]

    def record(i: int, due: datetime) -> tuple[Any, ...]:
        return (
            ids[i], ACCOUNT_ID, SUBSCRIPTION_ID, SPACE_ID, "space.reminder", first_lead + i, 1, "webhook",
            ENDPOINT_ID, None, None, "pending", None, due, due, expires, 0, False, now, now,
        )

    if db.kind == "postgres":
        import asyncpg

        conn = await asyncpg.connect(db.asyncpg_dsn)
        try:
            chunk = 100_000
            for start in range(0, len(dues), chunk):
                records = [record(i, dues[i]) for i in range(start, min(len(dues), start + chunk))]
                await conn.copy_records_to_table("notification", records=records, columns=NOTIFICATION_COLUMNS)
        finally:
            await conn.close()
    else:
        import sqlite3

        def naive(moment: datetime) -> str:
            return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

        def write() -> None:
            conn = sqlite3.connect(db.name, timeout=30)
            try:
                placeholders = ",".join("?" * len(NOTIFICATION_COLUMNS))
                sql = f"INSERT INTO notification ({','.join(NOTIFICATION_COLUMNS)}) VALUES ({placeholders})"
                chunk = 50_000
                for start in range(0, len(dues), chunk):
                    rows = []
                    for i in range(start, min(len(dues), start + chunk)):
                        r = list(record(i, dues[i]))
                        r[13], r[14], r[15], r[18], r[19] = (naive(r[13]), naive(r[14]), naive(r[15]), naive(r[18]),
                                                             naive(r[19]))
                        r[17] = 0
                        rows.append(r)
                    conn.executemany(sql, rows)
                    conn.commit()
            finally:
                conn.close()

        await asyncio.to_thread(write)
    return ids


async def unfinished(db: BenchDatabase) -> int:
    """Rows still pending or being sent (counted over the two partial queue indexes)."""
    return int(
        await db.scalar(
            "SELECT (SELECT count(*) FROM notification WHERE state = 'pending')"
            " + (SELECT count(*) FROM notification WHERE state = 'sending')"
        )
    )


async def count_state(db: BenchDatabase, state: str) -> int:
    return int(await db.scalar(f"SELECT count(*) FROM notification WHERE state = '{state}'"))


async def wait_until_recorded(db: BenchDatabase, started_at: float, total: int, timeout: float) -> float:
    """Poll until no row is pending or sending; the wall-clock time (time.time()) that happened.

    Polls often near the end (every 20 ms) and rarely before (the polls cost the database a little)."""
    deadline = time.time() + timeout
    rate_guess = None
    while True:
        left = await unfinished(db)
        now = time.time()
        if left == 0:
            return now
        if now > deadline:
            raise TimeoutError(f"{left} of {total} rows not finished after {timeout:.0f}s")
        done = total - left
        if done > 0 and now > started_at:
            rate_guess = done / (now - started_at)
        eta = left / rate_guess if rate_guess else 1.0
        await asyncio.sleep(min(0.5, max(0.02, eta / 4)))


# ---------------------------------------------------------------------------------------------
# Worker processes (`spacebell worker`)


class Workers:
    """`count` real `spacebell worker` processes against the bench database."""

    def __init__(self, db: BenchDatabase, count: int, **settings: Any) -> None:
        self.db = db
        self.dir = tempfile.TemporaryDirectory(prefix="spacebell-worker-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACEBELL_")}
        env.update(settings_env(db, **settings))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
        self.logs = [Path(self.dir.name) / f"worker-{i}.log" for i in range(count)]
        self.procs = [
            subprocess.Popen(
                [PYTHON, "-m", "app.cli", "worker"], cwd=self.dir.name, env=env,
                stdout=subprocess.DEVNULL, stderr=log.open("w"),
            )
            for log in self.logs
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def ready(self, timeout: float = 30.0) -> float:
        """Wait until every worker logged that its dispatcher runs; the seconds that took."""
        started = time.perf_counter()
        deadline = started + timeout
        while True:
            texts = [log.read_text() for log in self.logs]
            if all("running dispatcher" in t for t in texts):
                return time.perf_counter() - started
            for proc, text in zip(self.procs, texts, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}:\n{text[-3000:]}")
            if time.perf_counter() > deadline:
                raise TimeoutError("workers did not start")
            await asyncio.sleep(0.05)

    def peak_rss_mb(self) -> list[float]:
        return [peak_rss_mb(pid) for pid in self.pids]

    def errors(self) -> list[str]:
        lines = []
        for log in self.logs:
            lines += [line for line in log.read_text().splitlines() if " ERROR " in line or "Traceback" in line]
        return lines

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.dir.cleanup()


# ---------------------------------------------------------------------------------------------
# HTTP API: a bare FastAPI server, and a load generator (each its own process)


def serve_bare_api(port: int, database_url: str | None = None) -> None:
    """The yardstick for the API: FastAPI with one GET and one POST endpoint that touch no database and
    answer what the real ones answer (a page of 50 subscriptions; the created subscription, from a
    pydantic-validated body), served like `spacebell api` serves the real app (uvicorn's Server
    under asyncio.run, on uvloop).

    With `database_url`, also `GET /bare-db`: the same page after one `SELECT 1` on a pooled
    connection of Spacebell's own engine (`app.core.db.Database`: the same pool sizes, pre-ping and
    SQLite set-up as the API's) — what one database round trip costs a FastAPI route, measured
    beside the real API."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        creator_id: str | None = None
        webhook_endpoint_id: str | None = None
        lead_times: list[int] = [15]

    app = FastAPI()
    now = datetime.now(UTC).isoformat()

    def item(i: int, body: Body | None = None) -> dict[str, Any]:
        """A subscription as the API shows one (the same keys and about the same bytes)."""
        return {
            "id": f"sub_bare{i:021d}", "target_kind": "creator", "creator_id": body.creator_id if body else CREATOR_ID,
            "creator_username": None, "keyword": None, "include_hosts": False, "target_status": "active",
            "target_status_detail": None, "webhook_endpoint_id": body.webhook_endpoint_id if body else "we_api",
            "email": None, "email_timezone": None, "lead_times": body.lead_times if body else [15],
            "event_types": ["space.reminder"], "paused": False, "created_at": now, "updated_at": now,
        }

    page = {"items": [item(i) for i in range(50)], "next_cursor": "c3ViX2JhcmUwMDA1MA"}

    @app.get("/bare")
    async def bare_list() -> dict[str, Any]:
        return page

    @app.post("/bare", status_code=201)
    async def bare_create(body: Body) -> dict[str, Any]:
        return item(0, body)

    if database_url is not None:
        from sqlalchemy import text

        from app.core.db import Database

        engine = Database(database_url).engine

        @app.get("/bare-db")
        async def bare_db() -> dict[str, Any]:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            return page

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    from app.roles import use_uvloop

    use_uvloop()
    asyncio.run(uvicorn.Server(config).serve())


def run_load(url: str, method: str, body: str | None, headers: list[str], concurrency: int, duration: float,
             warmup: float) -> None:
    import aiohttp
    import uvloop

    header_map = dict(h.split(":", 1) for h in headers)
    if body is not None:
        header_map["content-type"] = "application/json"
    data = body.encode() if body is not None else None

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        cpu_marks: list[float] = []
        asyncio.get_running_loop().call_later(warmup, lambda: cpu_marks.append(time.process_time()))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
            begin = time.perf_counter()
            measure_from = begin + warmup
            stop_at = measure_from + duration

            async def worker() -> None:
                while True:
                    started = time.perf_counter()
                    if started >= stop_at:
                        return
                    async with http.request(method, url, data=data, headers=header_map) as response:
                        await response.read()
                        status = response.status
                    ended = time.perf_counter()
                    if started >= measure_from:
                        latencies.append(ended - started)
                        statuses[status] = statuses.get(status, 0) + 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.process_time() - (cpu_marks[0] if cpu_marks else 0.0)
        latencies.sort()
        return {
            "cpu_seconds": cpu,
            "count": len(latencies), "rate": len(latencies) / duration,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": latencies[-1] * 1000 if latencies else float("nan"), "statuses": statuses,
        }

    print(json.dumps(uvloop.run(main())))


async def load_run(url: str, *, method: str = "GET", body: str | None = None, headers: Sequence[str] = (),
                   concurrency: int = 16, duration: float = 5.0, warmup: float = 1.0,
                   watch: dict[str, list[int]] | Callable[[], Awaitable[dict[str, list[int]]]] | None = None,
                   ) -> dict[str, Any]:
    """Run the load generator in its own process; its figures plus the CPU of the watched processes
    (`watch` may be a coroutine function, asked after the warm-up: database backends opened during
    the warm-up count then)."""
    args = [PYTHON, __file__, "load", "--url", url, "--method", method, "--concurrency", str(concurrency),
            "--duration", str(duration), "--warmup", str(warmup)]
    if body is not None:
        args += ["--body", body]
    for header in headers:
        args += ["--header", header]
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE)
    await asyncio.sleep(warmup)
    if callable(watch):
        watch = await watch()
    meter = CpuMeter({"bench": [os.getpid()], **(watch or {})})
    meter.begin()
    out, _ = await proc.communicate()
    used = meter.end()
    if proc.returncode:
        raise RuntimeError("load generator failed")
    result = json.loads(out.decode().strip().splitlines()[-1])
    used["load"] = result.pop("cpu_seconds")  # it measured itself: it has exited by now
    used["others"] = max(0.0, used["others"] - used["load"])
    result["cpu"] = {k: v / used["wall"] for k, v in used.items() if k != "wall"}  # cores busy
    return result


async def wait_http(url: str, timeout: float = 30.0) -> None:
    import aiohttp

    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{url} did not answer")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}/s"


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("receiver")
    rec.add_argument("--port", type=int, required=True)
    rec.add_argument("--cpu", type=int)
    cli = sub.add_parser("client")
    cli.add_argument("--url", required=True)
    cli.add_argument("--count", type=int, required=True)
    cli.add_argument("--in-flight", type=int, default=64)
    cli.add_argument("--mode", choices=["bare", "sender", "httpx", "httpx-aiohttp"], default="bare")
    cli.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    cli.add_argument("--cpu", type=int)
    api = sub.add_parser("bare-api")
    api.add_argument("--port", type=int, required=True)
    api.add_argument("--database-url")
    load = sub.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--method", default="GET")
    load.add_argument("--body")
    load.add_argument("--header", action="append", default=[])
    load.add_argument("--concurrency", type=int, default=16)
    load.add_argument("--duration", type=float, default=5.0)
    load.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    if args.command == "receiver":
        serve_receiver(args.port, args.cpu)
    elif args.command == "client":
        run_client(args.url, args.count, args.in_flight, args.mode, args.cpu, args.loop)
    elif args.command == "bare-api":
        serve_bare_api(args.port, args.database_url)
    else:
        run_load(args.url, args.method, args.body, args.header, args.concurrency, args.duration, args.warmup)


if __name__ == "__main__":
    main()
