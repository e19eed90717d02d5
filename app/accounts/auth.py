"""The `Authorization: Bearer <api key>` dependency, with a per-key request rate limit."""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import Depends, Request

from app.accounts.service import authenticate
from app.core.context import AppContext
from app.core.deps import SessionDep, get_ctx
from app.core.problems import ProblemError, reject_unstorable_text


class KeyRateLimiter:
    """Token bucket per key, in process memory: each process enforces the limit on what it serves."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key_id: str, now: float | None = None) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key_id] = (tokens - 1, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1 - tokens) / self.rate


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def current_account_id(request: Request, session: SessionDep) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send the API key as `Authorization: Bearer <api key>`")
    key = await authenticate(session, token.strip())
    if key is None:
        raise _unauthorized("the API key is unknown or revoked")
    ctx: AppContext = get_ctx(request)
    limiter: KeyRateLimiter = ctx.components.setdefault(
        "key_rate_limiter", KeyRateLimiter(ctx.settings.api_rate_limit_per_minute)
    )
    wait = limiter.check(key.id)
    if wait > 0:
        raise ProblemError(
            429, "Too many requests", f"this API key is limited to {ctx.settings.api_rate_limit_per_minute} "
            "requests a minute", slug="rate-limited", headers={"Retry-After": str(math.ceil(wait))},
        )
    return key.account_id


AccountId = Annotated[str, Depends(current_account_id)]

# What every /v1 router runs before its routes: the key first (cached, so the route's AccountId
# does not count against the rate limit again), then the refusal of text
# no database can store (NUL, lone surrogates).
API_DEPENDENCIES = [Depends(current_account_id), Depends(reject_unstorable_text)]
