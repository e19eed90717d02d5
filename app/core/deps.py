"""FastAPI dependencies: the process context and one session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.context import AppContext


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per request.
async def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request. GET and HEAD only read, outside a transaction (no BEGIN/COMMIT round
    trips); anything else runs in one write transaction, committed on success."""
    ctx: AppContext = request.app.state.ctx
    opener = ctx.db.read if request.method in ("GET", "HEAD") else ctx.db.write
    async with opener() as session:
        yield session


CtxDep = Annotated[AppContext, Depends(get_ctx)]
# scope="function": commit when the route returns, before the response goes out. (The default,
# "request", commits after the response is sent: a client could act on a 201 before the row is
# visible, or get a 201 for a commit that then fails.)
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
