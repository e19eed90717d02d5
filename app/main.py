"""The ASGI app: API routers, problem handlers, health, and the lifespan that hosts background roles."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core import migrate
from app.core.components import Component
from app.core.idempotency import purge_old_records
from app.core.context import AppContext
from app.core.secrets import link_signing_key
from app.core.problems import BodySizeLimit, install_problem_handlers
from app.core.settings import get_settings

# Every role's metrics are declared in every process, so dashboards see zeros rather than gaps.
from app.delivery import dispatch_metrics as _dispatch_metrics  # noqa: F401
from app.discovery import metrics as _discovery_metrics  # noqa: F401
from app.x import metrics as _x_metrics  # noqa: F401

log = logging.getLogger(__name__)

DESCRIPTION = """Spacebell tells people before a Twitter/X Space starts, by signed webhook or by email.

Authenticate with `Authorization: Bearer <api key>` (create one with `spacebell accounts create NAME`).
Errors are RFC 9457 `application/problem+json` documents naming the offending field in `invalid_params`.
POST requests accept an `Idempotency-Key` header.
"""


async def _purge_idempotency_records(ctx: AppContext) -> None:
    while True:
        try:
            async with ctx.db.write() as session:
                await purge_old_records(session, ctx.clock.now())
        except Exception:  # a failed purge must not stop the API; the next hour tries again
            log.exception("purging old idempotency records failed")
        await ctx.clock.sleep_until(ctx.clock.now() + timedelta(hours=1))


def create_app(ctx: AppContext | None = None, *, components: Sequence[Component] = (), single_writer: bool = True) -> FastAPI:
    ctx = ctx or AppContext.from_settings(get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.db.is_sqlite and single_writer:
            ctx.db.acquire_writer_lock()
        if ctx.settings.migrate_on_start:
            await migrate.upgrade(ctx.db.engine)
        # Load (or generate) the link-signing key now: requests must not open a second write transaction.
        await link_signing_key(ctx)
        started: list[Component] = []
        housekeeping = asyncio.create_task(_purge_idempotency_records(ctx))
        try:
            for component in components:
                await component.start()
                started.append(component)
            yield
        finally:
            housekeeping.cancel()
            for component in reversed(started):
                try:
                    await component.stop()
                except Exception:
                    log.exception("stopping %s failed", component.name)
            await ctx.db.dispose()

    app = FastAPI(
        title="Spacebell",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    app.state.components = list(components)
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=ctx.settings.max_body_bytes)

    from app.delivery.mail_links import router as mail_links_router
    from app.delivery.notifications import router as notifications_router
    from app.delivery.router import router as endpoints_router
    from app.spaces.router import router as spaces_router
    from app.subscriptions.router import router as subscriptions_router

    app.include_router(subscriptions_router)
    app.include_router(endpoints_router)
    app.include_router(spaces_router)
    app.include_router(notifications_router)
    app.include_router(mail_links_router)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of this process", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz", tags=["health"], summary="Database reachable, migrations at head, roles working",
        responses={503: {"description": "Not ready; `checks` says which check failed", "content": {"application/json": {}}}},
    )
    async def readyz() -> JSONResponse:
        checks: dict[str, Any] = {}
        ready = True
        try:
            await ctx.db.ping()
            current = await migrate.current_revision(ctx.db.engine)
            head = migrate.head_revision()
            checks["database"] = {"ready": current == head, "revision": current, "head": head}
            ready &= current == head
        except Exception as exc:  # the point of /readyz is to report this, not raise it
            checks["database"] = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
            ready = False
        for component in app.state.components:
            state = component.readiness()
            checks[component.name] = state
            ready &= bool(state.get("ready", True))
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)

    return app
