"""Process roles: `api` (HTTP), `scheduler` (discovery), `worker` (dispatcher), hosted alone or together."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvicorn

from app.core.components import Component
from app.core.context import AppContext
from app.core.settings import Settings

log = logging.getLogger(__name__)


def build_components(ctx: AppContext, roles: set[str]) -> list[Component]:
    components: list[Component] = []
    return components


async def run_roles(
    settings: Settings, roles: set[str], *, simulate: bool = False, host: str | None = None, port: int | None = None,
    ctx: AppContext | None = None, stop: asyncio.Event | None = None,
) -> None:
    from app.core.logging import configure_logging

    configure_logging(settings)
    if "scheduler" in roles and not simulate and not settings.x_bearer_token:
        raise RuntimeError(
            "SPACEBELL_X_BEARER_TOKEN is not set: discovery needs an X API bearer token "
            "(or run with --simulate to poll a local X API simulator)"
        )
    ctx = ctx or AppContext.from_settings(settings)
    components = build_components(ctx, roles)
    if "api" in roles:
        from app.main import create_app

        app = create_app(ctx, components=components)
        config = uvicorn.Config(
            app, host=host or settings.api_host, port=port or settings.api_port,
            log_config=None, access_log=False, lifespan="on",
        )
        server = uvicorn.Server(config)
        if stop is not None:
            asyncio.get_running_loop().create_task(_stop_server_on(stop, server))
        await server.serve()
        return
    await _run_headless(ctx, components, stop)


async def _stop_server_on(stop: asyncio.Event, server: Any) -> None:
    await stop.wait()
    server.should_exit = True


async def _run_headless(ctx: AppContext, components: list[Component], stop: asyncio.Event | None) -> None:
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
        await stop.wait()
    finally:
        for component in reversed(started):
            await component.stop()
        await ctx.db.dispose()
