from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from app.accounts.auth import VerifiedKeyCache
from app.accounts.service import revoke_key
from tests.conftest import create_account


async def test_missing_and_bad_keys_are_401_problems(api) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=api.url) as http:
        r = await http.get("/v1/subscriptions")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"] == "Bearer"
        for key in ["nope", "sb_abc_def", "sb__", "Bearer"]:
            r = await http.get("/v1/subscriptions", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 401, key


async def test_revoked_key_stops_working_at_once_without_the_key_cache(api, ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.components.pop("verified_key_cache", None)
    ctx.settings.api_key_cache_seconds = 0
    key = await create_account(ctx)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert (await http.get("/v1/subscriptions")).status_code == 200
        async with ctx.db.write() as session:
            assert await revoke_key(session, key, ctx.clock.now()) == 1
        assert (await http.get("/v1/subscriptions")).status_code == 401


async def test_revoked_key_stops_working_when_its_cache_entry_expires(api, ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.components.pop("verified_key_cache", None)
    ctx.settings.api_key_cache_seconds = 10
    key = await create_account(ctx)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert (await http.get("/v1/subscriptions")).status_code == 200
        async with ctx.db.write() as session:  # as `spacebell accounts revoke-key` does, from another process
            assert await revoke_key(session, key, ctx.clock.now()) == 1
        ctx.clock.advance(9)
        assert (await http.get("/v1/subscriptions")).status_code == 200  # trusted for up to 10 s
        ctx.clock.advance(1)
        r = await http.get("/v1/subscriptions")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"


def test_key_cache_keeps_only_the_most_recently_used_keys() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cache = VerifiedKeyCache(timedelta(seconds=10), max_entries=2)
    a, b, c = (VerifiedKeyCache.digest(t) for t in ("sb_a_1", "sb_b_2", "sb_c_3"))
    cache.put(a, "key_a", "acc_a", now)
    cache.put(b, "key_b", "acc_b", now)
    assert cache.get(a, now) == ("key_a", "acc_a")  # a is now the most recent
    cache.put(c, "key_c", "acc_c", now)
    assert cache.get(b, now) is None
    assert cache.get(a, now) == ("key_a", "acc_a")
    assert cache.get(c, now + timedelta(seconds=10)) is None
    off = VerifiedKeyCache(timedelta(0))
    off.put(a, "key_a", "acc_a", now)
    assert off.get(a, now) is None


async def test_rate_limit_per_key(api, ctx) -> None:  # type: ignore[no-untyped-def]
    ctx.components.pop("key_rate_limiter", None)
    ctx.settings.api_rate_limit_per_minute = 3
    key = await create_account(ctx)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        codes = [(await http.get("/v1/subscriptions")).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200]
        last = await http.get("/v1/subscriptions")
        assert last.status_code == 429
        assert int(last.headers["retry-after"]) >= 1


async def test_health_and_ready(api) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=api.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["database"]["ready"] is True


async def test_openapi_has_examples_and_problem_responses(api) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=api.url) as http:
        spec = (await http.get("/openapi.json")).json()
        post = spec["paths"]["/v1/subscriptions"]["post"]
        assert "422" in post["responses"]
        schema = spec["components"]["schemas"]["SubscriptionCreate"]
        assert schema.get("examples")
        assert (await http.get("/docs")).status_code == 200


async def test_unknown_route_is_problem_json(api) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=api.url) as http:
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
