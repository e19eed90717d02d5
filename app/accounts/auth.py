"""The `Authorization: Bearer <api key>` dependency, with a per-key request rate limit."""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request

from app.accounts.service import authenticate
from app.core.context import AppContext
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


class VerifiedKeyCache:
    """Keys this process checked against the database lately: (key id, account id) by token digest.

    A request with a cached key costs no database round trip. The price is that a revoked key (keys
    are revoked with `spacebell accounts revoke-key`, another process) keeps working here for up to
    `ttl`. Only keys that passed are kept, so unknown keys cannot fill it; it holds at most
    `max_entries`, least recently used out.
    """

    def __init__(self, ttl: timedelta, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[str, str, datetime]] = OrderedDict()

    @staticmethod
    def digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, digest: bytes, now: datetime) -> tuple[str, str] | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry[2]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry[0], entry[1]

    def put(self, digest: bytes, key_id: str, account_id: str, now: datetime) -> None:
        if self.ttl <= timedelta(0):
            return
        self._entries[digest] = (key_id, account_id, now + self.ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def current_account_id(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("send the API key as `Authorization: Bearer <api key>`")
    ctx: AppContext = request.app.state.ctx
    cache: VerifiedKeyCache | None = ctx.components.get("verified_key_cache")
    if cache is None:
        cache = ctx.components["verified_key_cache"] = VerifiedKeyCache(
            timedelta(seconds=ctx.settings.api_key_cache_seconds)
        )
    now = ctx.clock.now()
    digest = cache.digest(token)
    if (hit := cache.get(digest, now)) is not None:
        key_id, account_id = hit
    else:
        async with ctx.db.session() as session:
            key = await authenticate(session, token)
        if key is None:
            raise _unauthorized("the API key is unknown or revoked")
        key_id, account_id = key.id, key.account_id
        cache.put(digest, key_id, account_id, now)
    limiter: KeyRateLimiter | None = ctx.components.get("key_rate_limiter")
    if limiter is None:
        limiter = ctx.components["key_rate_limiter"] = KeyRateLimiter(ctx.settings.api_rate_limit_per_minute)
    wait = limiter.check(key_id)
    if wait > 0:
        raise ProblemError(
            429, "Too many requests", f"this API key is limited to {ctx.settings.api_rate_limit_per_minute} "
            "requests a minute", slug="rate-limited", headers={"Retry-After": str(math.ceil(wait))},
        )
    return account_id


AccountId = Annotated[str, Depends(current_account_id)]

# What every /v1 router runs before its routes: the key first (cached, so the route's AccountId
# does not count against the rate limit again), then the refusal of text
# no database can store (NUL, lone surrogates).
API_DEPENDENCIES = [Depends(current_account_id), Depends(reject_unstorable_text)]
