"""Running the simulator under uvicorn: `serve_sim` for the CLI, `running_sim` for tests and demos."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.x.sim.app import create_sim_app
from app.x.sim.state import GoneMode, SimState


async def serve_sim(
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    bearer_token: str = "sim-token",
    seed: int | None = None,
    seed_creators: int = 0,
    spaces_per_creator: int = 3,
    soon: int = 0,
    soon_within_minutes: float = 30.0,
    gone_mode: GoneMode = "state",
    requests_per_window: int = 300,
    window_seconds: float = 900,
    by_creator_per_second: int = 1,
    log_level: str = "info",
    state: SimState | None = None,
) -> None:
    """Serve the simulator until interrupted (Ctrl+C / SIGTERM)."""
    app = create_sim_app(
        state,
        bearer_token=bearer_token,
        requests_per_window=requests_per_window,
        window_seconds=window_seconds,
        by_creator_per_second=by_creator_per_second,
        gone_mode=gone_mode,
        seed=seed,
        seed_creators=seed_creators,
        spaces_per_creator=spaces_per_creator,
        soon=soon,
        soon_within_minutes=soon_within_minutes,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    await uvicorn.Server(config).serve()


@dataclass
class RunningSim:
    base_url: str
    app: FastAPI
    server: uvicorn.Server

    @property
    def state(self) -> SimState:
        return self.app.state.sim


@asynccontextmanager
async def running_sim(
    app: FastAPI | None = None, *, host: str = "127.0.0.1", **create_kwargs: Any
) -> AsyncIterator[RunningSim]:
    """Serve `app` (or a new `create_sim_app(**create_kwargs)`) on a free port for the duration of the block."""
    app = app or create_sim_app(**create_kwargs)
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets (else ~40 ms per request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
                raise RuntimeError("simulator stopped during startup")
            await asyncio.sleep(0.005)
        yield RunningSim(f"http://{host}:{port}", app, server)
    finally:
        server.should_exit = True
        await task
        sock.close()
