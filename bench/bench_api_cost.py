"""CPU of one API request inside the app: the ASGI app called directly, no HTTP server, no network.

    .venv/bin/python bench/bench_api_cost.py                       # list and create, SQLite and PostgreSQL
    .venv/bin/python bench/bench_api_cost.py --db postgres --what list --requests 2000 --profile

Complements bench_api.py (which measures over HTTP against a bare endpoint): this isolates what the
app spends per request — dependencies, database round trips, serialization — so a change to any of
them shows without the noise of a load generator. Prints µs of wall and of CPU (this process only;
PostgreSQL's own work is not counted) per request, after 50 warm-up requests. `--profile` adds a
cProfile table sorted by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import CREATOR_ID, ROOT, bench_database, make_context, print_machine  # noqa: E402
from bench_api import ENDPOINT, seed  # noqa: E402

sys.path.insert(0, str(ROOT))


async def call(app: Any, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]],
               body: bytes = b"") -> int:
    """One request through the ASGI interface; returns the status."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(kind: str, what: str, requests: int, profile: bool) -> None:
    from app.main import create_app

    async with bench_database(kind) as db:
        key = await seed(db, 200)
        ctx = make_context(db, api_rate_limit_per_minute=10**9, max_subscriptions_per_account=10**8)
        app = create_app(ctx)
        async with app.router.lifespan_context(app):
            headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
            body = json.dumps({"creator_id": CREATOR_ID, "webhook_endpoint_id": ENDPOINT, "lead_times": [15]}).encode()

            async def one() -> None:
                if what == "list":
                    status = await call(app, "GET", "/v1/subscriptions", "limit=50", headers)
                    assert status == 200, status
                else:
                    status = await call(app, "POST", "/v1/subscriptions", "", headers, body)
                    assert status == 201, status

            for _ in range(50):
                await one()
            profiler = cProfile.Profile() if profile else None
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            for _ in range(requests):
                await one()
            if profiler:
                profiler.disable()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"  {kind:<8} {what:<6} {wall / requests * 1e6:7,.0f} µs wall, {cpu / requests * 1e6:7,.0f} µs CPU "
                  f"per request ({requests} requests{', profiled' if profile else ''})", flush=True)
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


async def run(args: argparse.Namespace) -> None:
    print_machine()
    for kind in args.db:
        for what in args.what:
            await measure(kind, what, args.requests if what == "list" else args.requests // 2, args.profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--what", choices=["list", "create"], nargs="+", default=["list", "create"])
    parser.add_argument("--requests", type=int, default=1000, help="list requests (creates: half as many)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
