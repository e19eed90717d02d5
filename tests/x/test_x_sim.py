"""The simulator's fidelity to X: envelopes, validation, headers, limits, admin API (raw HTTP)."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from app.x.sim import RunningSim, SimState, serve_sim
from app.x.sim.state import ENDPOINTS

from .helpers import START, TOKEN

CREATOR_ID = "2244994945"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def http(sim: RunningSim) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as client:
        yield client


def seed_space(state: SimState, **kwargs) -> str:
    if CREATOR_ID not in state.users:
        state.add_user("TwitterDev", id=CREATOR_ID, name="Twitter Dev")
    kwargs.setdefault("scheduled_start", START + timedelta(hours=1))
    return state.add_space(CREATOR_ID, kwargs.pop("title", "hello world 👋"), **kwargs).id


# --- envelopes --------------------------------------------------------------------------------


async def test_empty_search_and_by_creator_are_meta_only(sim: RunningSim, http: httpx.AsyncClient) -> None:
    search = await http.get("/2/spaces/search", params={"query": "nothing"})
    by_creator = await http.get("/2/spaces/by/creator_ids", params={"user_ids": "12345"})

    assert search.json() == {"meta": {"result_count": 0}}
    assert by_creator.json() == {"meta": {"result_count": 0}}


async def test_only_id_and_state_by_default_and_only_requested_fields(sim: RunningSim, http: httpx.AsyncClient) -> None:
    space_id = seed_space(sim.state)

    default = await http.get("/2/spaces", params={"ids": space_id})
    chosen = await http.get(
        "/2/spaces", params={"ids": space_id, "space.fields": "title,ended_at,speaker_ids,scheduled_start"}
    )

    assert default.json() == {"data": [{"id": space_id, "state": "scheduled"}]}  # ids lookups have no meta
    assert chosen.json() == {
        "data": [
            {
                "id": space_id,
                "state": "scheduled",
                "title": "hello world 👋",
                "scheduled_start": "2026-03-01T13:00:00.000Z",
            }
        ]
    }


async def test_single_space_route_and_creator_expansion(sim: RunningSim, http: httpx.AsyncClient) -> None:
    space_id = seed_space(sim.state, id="1zqKVXPQhvZJB")

    response = await http.get(
        f"/2/spaces/{space_id}", params={"space.fields": "created_at,creator_id", "expansions": "creator_id"}
    )

    assert response.json() == {
        "data": {
            "id": space_id,
            "state": "scheduled",
            "created_at": "2026-03-01T12:00:00.000Z",
            "creator_id": CREATOR_ID,
        },
        "includes": {"users": [{"id": CREATOR_ID, "name": "Twitter Dev", "username": "TwitterDev"}]},
    }


async def test_search_route_is_not_taken_for_a_space_id(sim: RunningSim, http: httpx.AsyncClient) -> None:
    seed_space(sim.state, id="search")  # a valid Space id that collides with the path

    response = await http.get("/2/spaces/search", params={"query": "hello"})

    assert response.json()["meta"] == {"result_count": 1}
    assert sim.state.calls == {"spaces_search": 1}


async def test_not_found_errors_have_xs_shape(sim: RunningSim, http: httpx.AsyncClient) -> None:
    sim.state.add_user("gone_user", id="99", suspended=True)

    spaces = await http.get("/2/spaces", params={"ids": "1nAJELYEEPvGL"})
    single = await http.get("/2/spaces/1nAJELYEEPvGL")
    users = await http.get("/2/users/by", params={"usernames": "giggggfbgfb,gone_user"})
    user = await http.get("/2/users/by/username/giggggfbgfb")

    problems = "https://api.twitter.com/2/problems/resource-not-found"
    assert spaces.status_code == 200 and "data" not in spaces.json()
    assert spaces.json()["errors"] == [
        {
            "value": "1nAJELYEEPvGL",
            "detail": "Could not find space with ids: [1nAJELYEEPvGL].",
            "title": "Not Found Error",
            "resource_type": "space",
            "parameter": "ids",
            "resource_id": "1nAJELYEEPvGL",
            "type": problems,
        }
    ]
    assert single.json()["errors"][0]["parameter"] == "id"
    missing, suspended = users.json()["errors"]
    assert missing["detail"] == "Could not find user with usernames: [giggggfbgfb]."
    assert (suspended["title"], suspended["detail"], suspended["type"]) == (
        "Forbidden",
        "User has been suspended: [gone_user].",
        problems,
    )
    assert user.json() == {
        "errors": [
            {
                "value": "giggggfbgfb",
                "detail": "Could not find user with username: [giggggfbgfb].",
                "title": "Not Found Error",
                "resource_type": "user",
                "parameter": "username",
                "resource_id": "giggggfbgfb",
                "type": problems,
            }
        ]
    }


async def test_user_lookup_is_case_insensitive_and_returns_default_fields(
    sim: RunningSim, http: httpx.AsyncClient
) -> None:
    sim.state.add_user("TwitterDev", id=CREATOR_ID, name="Twitter Dev")

    single = await http.get("/2/users/by/username/twitterdev")
    plural = await http.get("/2/users/by", params={"usernames": "TWITTERDEV"})

    expected = {"id": CREATOR_ID, "name": "Twitter Dev", "username": "TwitterDev"}
    assert single.json() == {"data": expected}
    assert plural.json() == {"data": [expected]}


# --- validation and auth ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "bad_parameter", "message"),
    [
        ("/2/spaces/search", {"query": "x", "next_token": "abc"}, "next_token", "is not one of [query,state,"),
        ("/2/spaces/search", {"query": "x", "max_results": "101"}, "max_results", "is not between 1 and 100"),
        ("/2/spaces/search", {"query": "x", "state": "ended"}, "state", "is not one of [live,scheduled,all]"),
        ("/2/spaces/search", {"query": "x" * 2049}, "query", "is not between 1 and 2048"),
        ("/2/spaces/search", {}, "query", "can not be empty"),
        ("/2/spaces/search", {"query": "x", "space.fields": "title,colour"}, "space.fields", "value [colour]"),
        ("/2/spaces", {"ids": ",".join(["1abc"] * 101)}, "ids", "list [101] is not between 1 and 100"),
        ("/2/spaces", {"ids": "bad-id!"}, "ids", "does not match ^[a-zA-Z0-9]{1,13}$"),
        ("/2/spaces/by/creator_ids", {"user_ids": "12a"}, "user_ids", "does not match ^[0-9]{1,19}$"),
        ("/2/spaces/by/creator_ids", {"user_ids": "1", "max_results": "5"}, "max_results", "is not one of"),
        ("/2/users/by", {"usernames": "has space"}, "usernames", "does not match ^[A-Za-z0-9_]{1,15}$"),
        ("/2/users/by/username/waytoolongusername", {}, "username", "does not match"),
        ("/2/spaces/abcdefghijklmn", {}, "id", "does not match"),
    ],
)
async def test_invalid_params_answer_invalid_request(
    sim: RunningSim, http: httpx.AsyncClient, path: str, params: dict, bad_parameter: str, message: str
) -> None:
    response = await http.get(path, params=params)

    assert response.status_code == 400
    body = response.json()
    assert body["title"] == "Invalid Request"
    assert body["detail"] == "One or more parameters to your request was invalid."
    assert body["type"] == "https://api.twitter.com/2/problems/invalid-request"
    assert any(bad_parameter in e["parameters"] and message in e["message"] for e in body["errors"]), body


async def test_repeated_parameter_is_invalid(sim: RunningSim, http: httpx.AsyncClient) -> None:
    response = await http.get("/2/spaces?ids=1abc&ids=1def")
    assert response.status_code == 400


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}])
async def test_bearer_token_is_required(sim: RunningSim, headers: dict) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as anonymous:
        response = await anonymous.get("/2/spaces/search", params={"query": "x"}, headers=headers)

    assert response.status_code == 401
    assert response.json() == {"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"}
    assert response.headers["x-rate-limit-remaining"] == "300"  # not counted against the window


async def test_unknown_path_answers_xs_404(sim: RunningSim, http: httpx.AsyncClient) -> None:
    response = await http.get("/2/spaces/1abc/unknown")
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == 34


# --- rate limits ------------------------------------------------------------------------------


async def test_windows_are_per_endpoint_and_reset_on_the_simulated_clock(start_sim) -> None:
    sim = await start_sim(requests_per_window=2, window_seconds=60)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as http:
        search = [await http.get("/2/spaces/search", params={"query": "x"}) for _ in range(3)]
        users = await http.get("/2/users/by", params={"usernames": "someone"})
        sim.state.advance_time(59)
        still_limited = await http.get("/2/spaces/search", params={"query": "x"})
        sim.state.advance_time(1)
        after_reset = await http.get("/2/spaces/search", params={"query": "x"})

    reset = str(int((START + timedelta(seconds=60)).timestamp()))
    assert [r.status_code for r in search] == [200, 200, 429]
    assert [r.headers["x-rate-limit-remaining"] for r in search] == ["1", "0", "0"]
    assert {r.headers["x-rate-limit-reset"] for r in search} == {reset}
    assert search[2].json() == {
        "title": "Too Many Requests",
        "detail": "Too Many Requests",
        "type": "about:blank",
        "status": 429,
    }
    assert users.status_code == 200 and users.headers["x-rate-limit-remaining"] == "1"
    assert still_limited.status_code == 429
    assert after_reset.status_code == 200 and after_reset.headers["x-rate-limit-remaining"] == "1"


async def test_by_creator_is_limited_per_second(start_sim) -> None:
    sim = await start_sim(by_creator_per_second=2)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as http:
        get = lambda: http.get("/2/spaces/by/creator_ids", params={"user_ids": "1"})  # noqa: E731
        burst = [(await get()).status_code for _ in range(3)]
        sim.state.advance_time(1)
        next_second = (await get()).status_code

    assert burst == [200, 200, 429]
    assert next_second == 200


async def test_reset_rate_limits_opens_the_window(start_sim) -> None:
    sim = await start_sim(requests_per_window=1)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as http:
        await http.get("/2/spaces/search", params={"query": "x"})
        limited = await http.get("/2/spaces/search", params={"query": "x"})
        await http.post("/_sim/rate-limits/reset")
        reopened = await http.get("/2/spaces/search", params={"query": "x"})

    assert (limited.status_code, reopened.status_code) == (429, 200)


# --- faults -----------------------------------------------------------------------------------


async def test_fault_applies_to_one_endpoint_for_n_responses(sim: RunningSim, http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/_sim/faults", json={"kind": "response", "endpoint": "users_by", "status": 503, "count": 2}
    )
    assert response.status_code == 200

    users = [(await http.get("/2/users/by", params={"usernames": "a"})).status_code for _ in range(3)]
    search = await http.get("/2/spaces/search", params={"query": "x"})

    assert users == [503, 503, 200]
    assert search.status_code == 200


async def test_fault_on_every_endpoint_until_cleared(sim: RunningSim, http: httpx.AsyncClient) -> None:
    await http.post("/_sim/faults", json={"kind": "response", "status": 500, "count": None})

    first = await http.get("/2/spaces", params={"ids": "1abc"})
    second = await http.get("/2/users/by", params={"usernames": "a"})
    await http.delete("/_sim/faults")
    cleared = await http.get("/2/spaces", params={"ids": "1abc"})

    assert first.status_code == second.status_code == 500
    assert first.json()["title"] == "Internal Server Error"
    assert cleared.status_code == 200


async def test_usage_cap_and_credits_bodies(sim: RunningSim, http: httpx.AsyncClient) -> None:
    await http.post("/_sim/faults", json={"kind": "usage_capped", "period": "Daily"})
    capped = await http.get("/2/spaces/search", params={"query": "x"})
    await http.post("/_sim/faults", json={"kind": "credits"})
    broke = await http.get("/2/spaces/search", params={"query": "x"})

    assert capped.status_code == 429
    assert capped.json()["type"].endswith("/2/problems/usage-capped") and capped.json()["period"] == "Daily"
    assert broke.status_code == 402
    assert broke.json()["title"] == "CreditsDepleted"


async def test_delay_fault_slows_the_response(sim: RunningSim, http: httpx.AsyncClient) -> None:
    sim.state.set_delay(0.2, count=1, endpoint="spaces_search")

    # Only the read is short: a loaded machine may take longer than 50 ms to connect.
    with pytest.raises(httpx.ReadTimeout):
        await http.get("/2/spaces/search", params={"query": "x"}, timeout=httpx.Timeout(5.0, read=0.05))
    fast = await http.get("/2/spaces/search", params={"query": "x"}, timeout=1)

    assert fast.status_code == 200


async def test_bad_fault_endpoint_is_rejected(sim: RunningSim, http: httpx.AsyncClient) -> None:
    response = await http.post("/_sim/faults", json={"kind": "response", "endpoint": "nope", "status": 503})
    assert response.status_code == 422
    assert "endpoint must be" in response.json()["error"]


# --- admin API --------------------------------------------------------------------------------


async def test_admin_lifecycle_over_http(sim: RunningSim, http: httpx.AsyncClient) -> None:
    user = (await http.post("/_sim/users", json={"username": "host_1", "name": "Host"})).json()
    assert re.fullmatch(r"[0-9]{1,19}", user["id"])
    created = await http.post(
        "/_sim/spaces",
        json={"creator_id": user["id"], "title": "Lifecycle", "scheduled_start": "2026-03-02T10:00:00Z", "lang": "fr"},
    )
    assert created.status_code == 201
    space_id = created.json()["id"]
    assert re.fullmatch(r"[a-zA-Z0-9]{13}", space_id)

    await http.post("/_sim/time", json={"advance_seconds": 30})
    moved = (
        await http.post(f"/_sim/spaces/{space_id}/reschedule", json={"scheduled_start": "2026-03-03T10:00:00Z"})
    ).json()
    assert moved["scheduled_start"] == "2026-03-03T10:00:00.000Z"
    assert moved["updated_at"] == "2026-03-01T12:00:30.000Z"

    live = (await http.post(f"/_sim/spaces/{space_id}/start")).json()
    assert live["state"] == "live" and live["started_at"] == "2026-03-01T12:00:30.000Z"
    conflict = await http.post(f"/_sim/spaces/{space_id}/cancel")
    assert conflict.status_code == 409
    ended = (await http.post(f"/_sim/spaces/{space_id}/end")).json()
    assert ended["state"] == "ended" and ended["ended_at"] == "2026-03-01T12:00:30.000Z"

    dump = (await http.get("/_sim/state")).json()
    assert dump["now"] == "2026-03-01T12:00:30.000Z"
    assert [s["state"] for s in dump["spaces"]] == ["ended"]

    assert (await http.delete(f"/_sim/spaces/{space_id}")).status_code == 204
    lookup = await http.get("/2/spaces", params={"ids": space_id})
    assert lookup.json()["errors"][0]["resource_id"] == space_id
    assert (await http.post(f"/_sim/spaces/{space_id}/start")).status_code == 404


async def test_admin_rejects_unknown_creator_and_bad_ids(sim: RunningSim, http: httpx.AsyncClient) -> None:
    unknown = await http.post(
        "/_sim/spaces", json={"creator_id": "1", "title": "x", "scheduled_start": "2026-03-02T10:00:00Z"}
    )
    bad_username = await http.post("/_sim/users", json={"username": "no spaces allowed"})
    creator = await http.post("/_sim/users", json={"username": "ok_user", "id": "77"})
    missing_start = await http.post("/_sim/spaces", json={"creator_id": "77", "title": "x"})

    assert unknown.status_code == 404
    assert bad_username.status_code == 422
    assert creator.status_code == 201
    assert missing_start.status_code == 422


async def test_update_space_changes_title_and_hosts(sim: RunningSim, http: httpx.AsyncClient) -> None:
    space_id = seed_space(sim.state)
    sim.state.add_user("cohost", id="6253282")
    sim.state.advance_time(5)

    await http.patch(f"/_sim/spaces/{space_id}", json={"title": "New title", "host_ids": ["6253282"]})
    response = await http.get(f"/2/spaces/{space_id}", params={"space.fields": "title,host_ids,updated_at"})

    assert response.json()["data"] == {
        "id": space_id,
        "state": "scheduled",
        "title": "New title",
        "host_ids": [CREATOR_ID, "6253282"],
        "updated_at": "2026-03-01T12:00:05.000Z",
    }


async def test_time_can_be_set_and_returned_to_real_time(http: httpx.AsyncClient) -> None:
    state = SimState()  # its own SimClock: real time until set
    assert not state.clock.is_fixed
    state.set_time(START)
    assert state.now() == START
    state.advance_time(90)
    assert state.now() == START + timedelta(seconds=90)
    state.use_real_time()
    assert state.now() > START + timedelta(days=30)

    fixed = await http.post("/_sim/time", json={"now": "2026-05-01T00:00:00Z"})
    assert fixed.json() == {"now": "2026-05-01T00:00:00.000Z"}


async def test_populate_and_config_over_http(sim: RunningSim, http: httpx.AsyncClient) -> None:
    counts = (
        await http.post("/_sim/populate", json={"seed": 3, "creators": 4, "spaces_per_creator": 2, "soon": 2})
    ).json()
    config = (await http.post("/_sim/config", json={"gone_mode": "not_found", "requests_per_window": 5})).json()
    bad_config = await http.post("/_sim/config", json={"gone_mode": "maybe"})

    assert counts == {"users": 4, "spaces": 8}
    assert config["gone_mode"] == "not_found" and config["requests_per_window"] == 5
    assert bad_config.status_code == 422
    soon = [
        s for s in sim.state.spaces.values() if s.scheduled_start and s.scheduled_start <= START + timedelta(minutes=30)
    ]
    assert len(soon) >= 2


async def test_request_log_records_params_and_status(sim: RunningSim, http: httpx.AsyncClient) -> None:
    await http.get("/2/spaces/search", params={"query": "héllo", "state": "live"})

    log = (await http.get("/_sim/requests")).json()

    assert log == [{"endpoint": "spaces_search", "params": [["query", "héllo"], ["state", "live"]], "status": 200}]


def test_endpoint_names_cover_every_route() -> None:
    assert set(ENDPOINTS) == {
        "space_by_id",
        "spaces_lookup",
        "spaces_by_creator",
        "spaces_search",
        "users_by",
        "user_by_username",
    }


# --- serve_sim (the CLI entry) ----------------------------------------------------------------


async def test_serve_sim_serves_a_seeded_world_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = SimState()
    task = asyncio.create_task(
        serve_sim(
            "127.0.0.1", port, bearer_token="cli-token", seed=5, seed_creators=3, state=state, log_level="warning"
        )
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(200):
                try:
                    response = await http.get(
                        "/2/spaces/search", params={"query": " "}, headers={"Authorization": "Bearer cli-token"}
                    )
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("serve_sim did not start")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert response.status_code == 200
    assert len(state.users) == 3 and len(state.spaces) == 9
