"""The key that signs links in mail: SPACEBELL_SECRET_KEY, or one generated once and kept in the database."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.core.context import AppContext
from app.core.models import ServiceState

_STATE_KEY = "link_signing_key"


async def link_signing_key(ctx: AppContext) -> bytes:
    if ctx.settings.secret_key:
        return ctx.settings.secret_key.encode()
    cached = ctx.components.get(_STATE_KEY)
    if cached is not None:
        return cached
    async with ctx.db.session() as session:
        row = await session.scalar(select(ServiceState).where(ServiceState.key == _STATE_KEY))
    if row is None:
        try:
            async with ctx.db.write() as session:
                session.add(
                    ServiceState(key=_STATE_KEY, value={"key": secrets.token_urlsafe(48)}, updated_at=ctx.clock.now())
                )
        except IntegrityError:
            pass  # another process generated it first; use theirs
        async with ctx.db.session() as session:
            row = await session.scalar(select(ServiceState).where(ServiceState.key == _STATE_KEY))
    assert row is not None
    key = str(row.value["key"]).encode()
    ctx.components[_STATE_KEY] = key
    return key
