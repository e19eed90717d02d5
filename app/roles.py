"""Process roles: `api` (HTTP), `scheduler` (discovery), `worker` (dispatcher), hosted alone or together."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any

import uvicorn

from app.core.components import Component
from app.core.context import AppContext
from app.core.settings import Settings

log = logging.getLogger(__name__)


def build_components(ctx: AppContext, roles: set[str]) -> list[Component]:
    from app.delivery.dispatcher import Dispatcher, fan_out_hook
    from app.discovery.component import DiscoveryComponent, x_client_from_settings

    components: list[Component] = []
    if "worker" in roles:
        components.append(Dispatcher(ctx))
    if "scheduler" in roles:
        components.append(
            DiscoveryComponent(
                ctx, lambda: x_client_from_settings(ctx.settings, ctx.clock), after_cycle=fan_out_hook(ctx)
            )
        )
    elif "api" in roles:
        # Watch-only: this process's /readyz reports why the leader stopped polling X, if it did.
        components.append(DiscoveryComponent(ctx, None))
    return components


def run_roles(
    settings: Settings, roles: set[str], *, simulate: bool = False, host: str | None = None, port: int | None = None,
) -> Coroutine[Any, Any, None]:
    """The coroutine that hosts `roles` until a signal: `asyncio.run(run_roles(...))`.

    Every role runs on uvloop, as `uvicorn` itself would choose: calling this installs uvloop's
    event loop policy before `asyncio.run` creates the loop. The dispatcher and the API spend much
    of their time in the loop's socket handling (HTTP, and each database round trip), which uvloop
    does in C; an API list request cost ~40% less CPU on it (docs/benchmarks.md).
    """
    use_uvloop()
    return _run_roles(settings, roles, simulate=simulate, host=host, port=port)


def use_uvloop() -> bool:
    """Make event loops created from now on uvloop loops, if uvloop is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


WORKER_GC_THRESHOLD = 10_000  # young objects between collections (CPython's default is 700)


def tune_gc_for_worker() -> None:
    """The collector, set for a process that sends webhooks all day.

    Everything allocated during start-up (modules, settings, metadata, pools) moves into the
    permanent generation, so full collections stop re-scanning it; and the youngest generation is
    collected after 10,000 allocations instead of 700: each webhook allocates dozens of container
    objects (aiohttp's request and response, futures, rows), so at the default the collector ran
    every few webhooks (in the benchmark, about 6 µs of CPU per webhook; a collection of 10,000
    young objects takes a couple of milliseconds)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])


async def _run_roles(
    settings: Settings, roles: set[str], *, simulate: bool = False, host: str | None = None, port: int | None = None,
) -> None:
    from app.core.logging import configure_logging

    configure_logging(settings)
    async with AsyncExitStack() as stack:
        if simulate:
            from app.x.sim.server import running_sim

            sim = await stack.enter_async_context(running_sim(seed=7, seed_creators=20, soon=5))
            settings.x_api_base_url = sim.base_url
            settings.x_bearer_token = "sim-token"
            log.info("X API simulator at %s (admin API and docs under %s/_sim/docs)", sim.base_url, sim.base_url)
        elif "scheduler" in roles and not settings.x_bearer_token:
            raise RuntimeError(
                "SPACEBELL_X_BEARER_TOKEN is not set: discovery needs an X API bearer token "
                "(or pass --simulate to poll a local X API simulator)"
            )
        ctx = AppContext.from_settings(settings)
        if ctx.db.is_sqlite:
            ctx.db.acquire_writer_lock()  # refuse a second process before anything starts
        components = build_components(ctx, roles)
        if "api" in roles:
            await serve_api(ctx, components, host=host, port=port)
        else:
            await run_headless(ctx, components)


async def serve_api(
    ctx: AppContext, components: list[Component], *, host: str | None = None, port: int | None = None,
    stop: asyncio.Event | None = None, started: asyncio.Event | None = None,
) -> None:
    from app.main import create_app

    config = uvicorn.Config(
        create_app(ctx, components=components), host=host or ctx.settings.api_host,
        port=port or ctx.settings.api_port, log_config=None, access_log=False, lifespan="on",
    )
    server = uvicorn.Server(config)
    watchers = []
    if stop is not None:
        watchers.append(asyncio.create_task(_exit_when(stop, server)))
    if started is not None:
        watchers.append(asyncio.create_task(_signal_started(server, started)))
    try:
        await server.serve()
    finally:
        for task in watchers:
            task.cancel()


async def _exit_when(stop: asyncio.Event, server: Any) -> None:
    await stop.wait()
    server.should_exit = True


async def _signal_started(server: Any, started: asyncio.Event) -> None:
    while not server.started:
        await asyncio.sleep(0.02)
    started.set()


async def run_headless(ctx: AppContext, components: list[Component], stop: asyncio.Event | None = None) -> None:
    """Workers and schedulers without the API: migrate, start, wait for a signal, stop cleanly."""
    from app.core import migrate

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ctx.db.is_sqlite:
        ctx.db.acquire_writer_lock()
    if ctx.settings.migrate_on_start:
        await migrate.upgrade(ctx.db.engine)
    started: list[Component] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
        if any(c.name == "dispatcher" for c in components):
            tune_gc_for_worker()
        log.info("running %s; Ctrl-C stops", ", ".join(c.name for c in components) or "nothing")
        await stop.wait()
    finally:
        for component in reversed(started):
            await component.stop()
        await ctx.db.dispose()
