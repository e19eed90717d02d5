"""API benchmark: subscription create and list, requests/s and p99, as ratios to a bare FastAPI endpoint.

    .venv/bin/python bench/bench_api.py                 # SQLite and PostgreSQL, 5 s per measurement
    .venv/bin/python bench/bench_api.py --quick         # SQLite only, 2 s per measurement
    .venv/bin/python bench/bench_api.py --db postgres --concurrency 32 --duration 10

Processes: `spacebell api` (the real app, `python -m app.cli api`, as deployed: uvicorn's Server
under asyncio.run on uvloop), a bare FastAPI app served the same way on another port — one GET returning a
page of 50 subscription-shaped items and one POST validating the same body with pydantic, no
database, no auth, no middleware — and the load generator (aiohttp on uvloop, N connections kept
busy, its own process). Each measurement: 1 s of warm-up, then `--duration` seconds counted.

  list:   GET /v1/subscriptions?limit=50 (an account with 200 subscriptions) vs GET /bare; and, for
          scale, GET /bare-db: the bare page after one `SELECT 1` on a connection of Spacebell's engine
  create: POST /v1/subscriptions {creator_id, webhook_endpoint_id, lead_times} vs POST /bare (same
          body, validated by pydantic); every create inserts a subscription (and matches it against
          stored Spaces) — the account grows by thousands during the run.
ratio = API requests/s / bare requests/s (target >= 0.5). The API's per-key rate limit and per-account
subscription cap are raised for the run (SPACEBELL_API_RATE_LIMIT_PER_MINUTE, ..._MAX_SUBSCRIPTIONS_...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    CREATOR_ID,
    PYTHON,
    ROOT,
    bench_database,
    free_port,
    load_run,
    make_context,
    print_machine,
    settings_env,
    wait_http,
)

ENDPOINT = "we_api"


async def seed(db: Any, subscriptions: int) -> str:
    from sqlalchemy import insert

    from app.accounts.service import create_account
    from app.delivery.models import WebhookEndpoint
    from app.spaces.models import Creator
    from app.subscriptions.models import Subscription

    now = datetime.now(UTC)
    ctx = make_context(db)
    try:
        async with ctx.db.write() as s:
            issued = await create_account(s, "bench", now)
            await s.execute(
                insert(WebhookEndpoint.__table__).values(
                    id=ENDPOINT, account_id=issued.account_id, url="https://hooks.example.com/spacebell",
                    secret="whsec_" + "A" * 43, event_types=["space.reminder"], enabled=True, created_at=now,
                    updated_at=now,
                )
            )
            await s.execute(
                insert(Creator.__table__).values(
                    id=CREATOR_ID, username="XDevelopers", username_lower="xdevelopers", resolved_at=now
                )
            )
            await s.execute(
                insert(Subscription.__table__),
                [
                    {
                        "id": f"sub_seed{i:05d}", "account_id": issued.account_id, "target_kind": "creator",
                        "creator_id": CREATOR_ID, "include_hosts": False, "target_status": "active",
                        "webhook_endpoint_id": ENDPOINT, "lead_times": [15], "event_types": ["space.reminder"],
                        "paused": False, "created_at": now, "updated_at": now,
                    }
                    for i in range(subscriptions)
                ],
            )
    finally:
        await ctx.db.dispose()
    return issued.api_key


class Server:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="spacebell-api-")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPACEBELL_")}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (full_env.get("PYTHONPATH"), str(ROOT)) if p)
        self.proc = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in args], cwd=self.dir.name, env=full_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await wait_http(self.base + "/healthz")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


def line(label: str, api: dict[str, Any], bare: dict[str, Any]) -> str:
    errors = {k: v for k, v in api["statuses"].items() if not k.startswith("2")}
    return (
        f"  {label:<7} API {api['rate']:8,.0f} req/s, p50 {api['p50_ms']:6.1f} ms, p99 {api['p99_ms']:6.1f} ms | bare "
        f"{bare['rate']:8,.0f} req/s, p99 {bare['p99_ms']:6.1f} ms | ratio {api['rate'] / bare['rate']:.2f} "
        f"(target >= 0.5: {'met' if api['rate'] / bare['rate'] >= 0.5 else 'NOT met'}); API server "
        f"{api['cpu']['server']:.2f} cores ({api['cpu']['server'] / api['rate'] * 1e6:,.0f} µs a request, bare "
        f"{bare['cpu']['server'] / bare['rate'] * 1e6:,.0f} µs), database {api['cpu'].get('database', 0):.2f}, "
        f"load generator {api['cpu']['load']:.2f}, others {api['cpu']['others']:.2f}"
        + (f" [non-2xx: {errors}]" if errors else "")
    )


async def run(args: argparse.Namespace) -> None:
    print_machine()
    for kind in args.db:
        async with bench_database(kind, args.pg) as db:
            key = await seed(db, 200)
            env = settings_env(db, api_rate_limit_per_minute=1_000_000_000, max_subscriptions_per_account=100_000_000)
            env["SPACEBELL_LOG_LEVEL"] = "WARNING"
            api = Server([PYTHON, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", "{port}"], env)
            bare = Server([PYTHON, str(Path(__file__).parent / "_support.py"), "bare-api", "--port", "{port}",
                           "--database-url", db.url])
            try:
                await api.start()
                await bare.start()
                auth = f"Authorization:Bearer {key}"
                body = json.dumps({"creator_id": CREATOR_ID, "webhook_endpoint_id": ENDPOINT, "lead_times": [15]})
                common = {"concurrency": args.concurrency, "duration": args.duration}

                async def watched(server: Server) -> dict[str, list[int]]:
                    return {"server": [server.proc.pid], "database": await db.backend_pids()}

                print(f"\n{kind}: {args.concurrency} connections, {args.duration:g} s per measurement", flush=True)
                bare_get = await load_run(bare.base + "/bare", watch=lambda: watched(bare), **common)
                api_list = await load_run(api.base + "/v1/subscriptions?limit=50", headers=[auth],
                                          watch=lambda: watched(api), **common)
                print(line("list", api_list, bare_get), flush=True)
                bare_db = await load_run(bare.base + "/bare-db", watch=lambda: watched(bare), **common)
                print(f"  (bare + one SELECT 1 on Spacebell's engine: {bare_db['rate']:,.0f} req/s, p99 "
                      f"{bare_db['p99_ms']:.1f} ms, {bare_db['rate'] / bare_get['rate']:.2f} of bare; the API list is "
                      f"{api_list['rate'] / bare_db['rate']:.2f} of it)", flush=True)
                bare_post = await load_run(
                    bare.base + "/bare", method="POST", body=body, watch=lambda: watched(bare), **common
                )
                api_create = await load_run(api.base + "/v1/subscriptions", method="POST", body=body,
                                            headers=[auth], watch=lambda: watched(api), **common)
                print(line("create", api_create, bare_post), flush=True)
            finally:
                api.stop()
                bare.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--pg", default=os.environ.get("SPACEBELL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="SQLite only, 2 s per measurement")
    args = parser.parse_args()
    if args.quick:
        args.db, args.duration = ["sqlite"], 2.0
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
