"""FastAPI dependencies: the process context and one session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.context import AppContext


def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request; writes (non-GET) start as write transactions, committed on success."""
    ctx: AppContext = request.app.state.ctx
    opener = ctx.db.session if request.method in ("GET", "HEAD") else ctx.db.write
    async with opener() as session:
        yield session


CtxDep = Annotated[AppContext, Depends(get_ctx)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
