"""Why the webhook sender is aiohttp: HTTP clients posting the same signed webhooks to the same receiver.

    .venv/bin/python bench/bench_http_clients.py [--count 20000] [--quick]

Each client runs in its own process with 64 requests in flight (connection pool of 64), posting N
signed bodies of the reminder size to the loopback receiver (its own process, pinned to the last
CPU); rate and CPU per request are printed. `httpx-aiohttp` needs `pip install httpx-aiohttp` (a
measuring tool, not a dependency of the service); it is skipped when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import Receiver, client_run, print_machine

CLIENTS = [
    ("httpx.AsyncClient, asyncio", "httpx", "asyncio"),
    ("httpx.AsyncClient, uvloop", "httpx", "uvloop"),
    ("httpx + httpx-aiohttp transport, uvloop", "httpx-aiohttp", "uvloop"),
    ("aiohttp, asyncio", "bare", "asyncio"),
    ("aiohttp, uvloop", "bare", "uvloop"),
    ("app WebhookSender (aiohttp), uvloop", "sender", "uvloop"),
]


async def run(args: argparse.Namespace) -> None:
    print_machine()
    receiver = Receiver()
    try:
        print(f"\n{args.count:,} signed POSTs per client, 64 in flight")
        for label, mode, loop in CLIENTS:
            if mode == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
                print(f"  {label:<42} skipped (pip install httpx-aiohttp)")
                continue
            count = args.count if mode not in ("httpx",) else max(1000, args.count // 4)
            r = await client_run(receiver, count, mode=mode, loop=loop)
            print(f"  {label:<42} {r['rate']:8,.0f} req/s   CPU/request: client {r['cpu_us']:5.0f} µs, "
                  f"receiver {r['receiver_cpu_us']:3.0f} µs   ({count:,} requests, others busy "
                  f"{r['others_cores']:.2f} cores)", flush=True)
    finally:
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="5,000 requests per client")
    args = parser.parse_args()
    if args.quick:
        args.count = 5_000
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
