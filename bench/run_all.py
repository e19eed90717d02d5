"""Run every benchmark in sequence (`make bench`); each prints figures measured in its own run.

    .venv/bin/python bench/run_all.py              # full sizes: about 15-20 minutes on 2 cores
    .venv/bin/python bench/run_all.py --quick      # smaller sizes: about 4 minutes
    .venv/bin/python bench/run_all.py --only dispatcher fanout

Needs PostgreSQL for the PostgreSQL parts (--pg, default postgresql://postgres@127.0.0.1:5432/postgres
or $SPACEBELL_BENCH_PG): each benchmark creates its own scratch database and drops it afterwards.
Benchmarks are not tests: nothing here fails on a missed target, only on an error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "dispatcher": ("bench_dispatcher.py", ["--quick"]),
    "fanout": ("bench_fanout.py", ["--quick"]),
    "matching": ("bench_matching.py", ["--subscriptions", "20000", "--spaces", "2000"]),
    "api": ("bench_api.py", ["--quick"]),
    "api-cost": ("bench_api_cost.py", ["--db", "sqlite", "--requests", "300"]),
    "rss": ("bench_rss.py", ["--quick"]),
    "clients": ("bench_http_clients.py", ["--quick"]),
}
TAKES_PG = {"dispatcher", "fanout", "api", "rss"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--pg", default=os.environ.get("SPACEBELL_BENCH_PG"), help="PostgreSQL admin URL")
    args = parser.parse_args()

    failed = []
    for name in args.only or list(BENCHMARKS):
        script, quick_args = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), *(quick_args if args.quick else [])]
        if args.pg and name in TAKES_PG:
            command += ["--pg", args.pg]
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(command)
        print(f"===== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - started:.0f} s",
              flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
