"""`Idempotency-Key` on POST: the same key and body replays the first response; another body is a 422."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.auth import AccountId
from app.core.deps import CtxDep, SessionDep
from app.core.models import IdempotencyRecord
from app.core.problems import ProblemError
from app.core.responses import json_bytes


@dataclass
class Idempotency:
    session: AsyncSession
    account_id: str
    key: str | None
    method_path: str
    request_hash: str
    now: datetime

    async def replay(self) -> Response | None:
        """The stored response for this key, or None when the request is new."""
        if self.key is None:
            return None
        record = await self.session.get(IdempotencyRecord, (self.account_id, self.key))
        if record is None:
            return None
        if record.request_hash != self.request_hash or record.method_path != self.method_path:
            raise ProblemError(
                422, "Idempotency key reused", "this Idempotency-Key was used with a different request",
                slug="idempotency-key-reused", field="header.Idempotency-Key",
            )
        return Response(
            record.response_body, status_code=record.status_code, headers={"Idempotent-Replayed": "true"},
            media_type="application/json",
        )

    async def respond(self, status_code: int, body: Any) -> Response:
        """Build the response and, in the same transaction as the change, remember it under the key."""
        content = json_bytes(body)
        if self.key is not None:
            self.session.add(
                IdempotencyRecord(
                    account_id=self.account_id, key=self.key, method_path=self.method_path,
                    request_hash=self.request_hash, status_code=status_code,
                    response_body=content, created_at=self.now,
                )
            )
            try:
                await self.session.flush()
            except IntegrityError:
                # A concurrent request with the same key won the insert; this one's changes roll back.
                raise ProblemError(
                    409, "Request in progress", "another request with this Idempotency-Key is being processed",
                    slug="idempotency-key-in-use", field="header.Idempotency-Key",
                ) from None
        return Response(content, status_code=status_code, media_type="application/json")


async def get_idempotency(
    request: Request,
    ctx: CtxDep,
    session: SessionDep,
    account_id: AccountId,
    idempotency_key: Annotated[
        str | None,
        Header(min_length=1, max_length=255, description="Makes a POST safe to retry: same key, same response."),
    ] = None,
) -> Idempotency:
    body = await request.body()
    return Idempotency(
        session=session, account_id=account_id, key=idempotency_key,
        method_path=f"{request.method} {request.url.path}",
        request_hash=hashlib.sha256(body).hexdigest(), now=ctx.clock.now(),
    )


IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]


KEEP_FOR = timedelta(hours=24)


async def purge_old_records(session: AsyncSession, now: datetime) -> int:
    """Keys are remembered for 24 hours, as Svix, Knock and Courier do."""
    result = await session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < now - KEEP_FOR))
    return result.rowcount or 0
