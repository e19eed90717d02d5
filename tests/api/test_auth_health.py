from __future__ import annotations

import httpx

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


async def test_revoked_key_stops_working(api, ctx) -> None:  # type: ignore[no-untyped-def]
    key = await create_account(ctx)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert (await http.get("/v1/subscriptions")).status_code == 200
        async with ctx.db.write() as session:
            assert await revoke_key(session, key, ctx.clock.now()) == 1
        assert (await http.get("/v1/subscriptions")).status_code == 401


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
