"""XClient against the simulator over real HTTP."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from app.core.clock import ManualClock
from app.x.client import (
    SPACE_FIELDS,
    RateLimit,
    XClient,
    XRateLimitError,
    XRequestError,
    XSpace,
    XTerminalError,
    XUnavailableError,
)
from app.x.sim import RunningSim, SimState

from .helpers import START, RecordingSleep

CREATOR_ID = "2244994945"


def add_creator(sim_state: SimState, user_id: str = CREATOR_ID, username: str = "XDevelopers") -> None:
    sim_state.add_user(username, id=user_id, name="X Developers")


def calls(endpoint: str, status: str) -> float:
    return REGISTRY.get_sample_value("spacebell_x_api_calls_total", {"endpoint": endpoint, "status": status}) or 0.0


# --- parsing ----------------------------------------------------------------------------------


async def test_spaces_by_ids_parses_every_requested_field(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    sim.state.add_user("cohost", id="6253282", name="Co Host")
    start = START + timedelta(days=2, hours=3)
    created = sim.state.add_space(
        CREATOR_ID, "Say hello 👋", id="1DXxyRYNejbKM", scheduled_start=start, lang="en", host_ids=["6253282"]
    )

    result = await client.spaces_by_ids(["1DXxyRYNejbKM"])

    assert result.spaces == [
        XSpace(
            id="1DXxyRYNejbKM",
            state="scheduled",
            title="Say hello 👋",
            creator_id=CREATOR_ID,
            host_ids=[CREATOR_ID, "6253282"],
            lang="en",
            is_ticketed=False,
            scheduled_start=start,
            created_at=created.created_at,
            updated_at=created.updated_at,
        )
    ]
    assert result.spaces[0].scheduled_start.tzinfo == UTC
    assert [(u.id, u.username, u.name) for u in result.users_included] == [(CREATOR_ID, "XDevelopers", "X Developers")]
    assert result.not_found == [] and result.suspended == []
    sent = dict(sim.state.requests[-1].params)
    assert sent["space.fields"] == SPACE_FIELDS
    assert sent["expansions"] == "creator_id" and sent["user.fields"] == "username,name"


async def test_timestamps_without_milliseconds_and_unknown_states_are_kept(sim: RunningSim, client: XClient) -> None:
    sim.state.set_fault(
        200,
        endpoint="spaces_lookup",
        body={
            "data": [
                {
                    "id": "1zqKVXPQhvZJB",
                    "state": "Running",
                    "scheduled_start": "2021-07-14T08:00:00Z",
                    "started_at": "2021-07-14T08:00:12.345Z",
                    "updated_at": "2021-07-11T14:44:44+02:00",
                },
                {"id": "1OdKrjgmNkeKX", "state": "canceled", "title": None},
            ]
        },
    )

    result = await client.spaces_by_ids(["1zqKVXPQhvZJB", "1OdKrjgmNkeKX"])

    running, canceled = result.spaces
    assert running.state == "Running"
    assert running.scheduled_start == datetime(2021, 7, 14, 8, 0, tzinfo=UTC)
    assert running.started_at == datetime(2021, 7, 14, 8, 0, 12, 345000, tzinfo=UTC)
    assert running.updated_at == datetime(2021, 7, 11, 12, 44, 44, tzinfo=UTC)
    assert running.host_ids == [] and running.title is None
    assert canceled.state == "canceled" and canceled.title is None


async def test_sim_timestamps_carry_milliseconds_and_parse_back_exactly(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    start = datetime(2026, 3, 2, 9, 30, 15, 123000, tzinfo=UTC)
    sim.state.add_space(CREATOR_ID, "ms precision", id="1msPrecision1", scheduled_start=start)

    result = await client.spaces_by_ids(["1msPrecision1"])

    assert result.spaces[0].scheduled_start == start


# --- empty results and partial errors ---------------------------------------------------------


async def test_empty_results_have_no_data_and_parse_to_empty_lists(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)

    by_creator = await client.spaces_by_creator_ids([CREATOR_ID])
    sim.state.advance_time(1)
    search = await client.search_spaces("nothing matches this")

    for result in (by_creator, search):
        assert result.spaces == [] and result.users_included == [] and result.result_count == 0


async def test_partial_not_found_on_a_200(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    sim.state.add_space(CREATOR_ID, "here", id="1here00000000", scheduled_start=START + timedelta(hours=1))

    result = await client.spaces_by_ids(["1here00000000", "1missing00000"])

    assert [s.id for s in result.spaces] == ["1here00000000"]
    assert result.not_found == ["1missing00000"]
    assert result.suspended == []


async def test_users_found_missing_and_suspended(sim: RunningSim, client: XClient) -> None:
    sim.state.add_user("TwitterDev", id="2244994945", name="Twitter Dev")
    sim.state.add_user("banned_one", id="42", name="Banned", suspended=True)

    result = await client.users_by_usernames(["@twitterdev", "banned_one", "nobody_here"])

    assert [(u.id, u.username, u.name) for u in result.users] == [("2244994945", "TwitterDev", "Twitter Dev")]
    assert result.suspended == ["banned_one"]
    assert result.not_found == ["nobody_here"]


async def test_spaces_of_a_suspended_creator_disappear(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    sim.state.add_space(CREATOR_ID, "soon gone", id="1suspended000", scheduled_start=START + timedelta(hours=1))
    sim.state.suspend_user(CREATOR_ID)

    assert (await client.spaces_by_ids(["1suspended000"])).not_found == ["1suspended000"]
    assert (await client.spaces_by_creator_ids([CREATOR_ID])).spaces == []


# --- argument checks and request errors -------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.spaces_by_ids([]),
        lambda c: c.spaces_by_ids([f"1{i:012d}" for i in range(101)]),
        lambda c: c.spaces_by_creator_ids([str(i) for i in range(1, 102)]),
        lambda c: c.users_by_usernames(["", "  "]),
        lambda c: c.search_spaces(""),
        lambda c: c.search_spaces("x" * 2049),
        lambda c: c.search_spaces("ok", state="ended"),
    ],
)
async def test_bad_arguments_raise_value_error_without_calling_x(sim: RunningSim, client: XClient, call) -> None:
    with pytest.raises(ValueError):
        await call(client)
    assert sim.state.calls.total() == 0


async def test_exactly_100_ids_are_accepted(sim: RunningSim, client: XClient) -> None:
    ids = [f"1{i:012d}" for i in range(100)]
    result = await client.spaces_by_ids(ids)
    assert len(result.not_found) == 100


async def test_400_is_a_request_error_with_one_clear_log_line(
    sim: RunningSim, client: XClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.x.client"):
        with pytest.raises(XRequestError) as raised:
            await client.spaces_by_creator_ids(["not-a-number"])

    assert raised.value.status == 400
    assert raised.value.title == "Invalid Request"
    assert "does not match ^[0-9]{1,19}$" in raised.value.detail
    assert sim.state.calls["spaces_by_creator"] == 1  # not retried
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "spaces_by_creator" in lines[0] and "/2/spaces/by/creator_ids" in lines[0] and "400" in lines[0]


async def test_wrong_token_is_a_401_request_error(sim: RunningSim, make_client) -> None:
    client = make_client(sim.base_url, token="wrong")

    with pytest.raises(XRequestError) as raised:
        await client.search_spaces("hello")

    assert raised.value.status == 401 and raised.value.title == "Unauthorized"
    assert sim.state.calls["spaces_search"] == 1


async def test_403_client_forbidden_is_a_request_error(sim: RunningSim, client: XClient) -> None:
    sim.state.set_fault(403, endpoint="users_by")

    with pytest.raises(XRequestError) as raised:
        await client.users_by_usernames(["someone"])

    assert raised.value.status == 403
    assert raised.value.problem_type.endswith("/problems/client-forbidden")


# --- rate limits ------------------------------------------------------------------------------


async def test_rate_limit_headers_are_recorded_per_endpoint(sim: RunningSim, client: XClient) -> None:
    await client.search_spaces("hello")
    await client.search_spaces("again")
    await client.users_by_usernames(["someone"])

    reset_at = START + timedelta(seconds=900)
    assert client.rate_limits["spaces_search"] == RateLimit(limit=300, remaining=298, reset_at=reset_at)
    assert client.rate_limits["users_by"] == RateLimit(limit=300, remaining=299, reset_at=reset_at)
    gauge = REGISTRY.get_sample_value("spacebell_x_rate_limit_remaining", {"endpoint": "spaces_search"})
    assert gauge == 298


async def test_exhausted_window_waits_until_reset_then_succeeds(
    start_sim, make_client, sleep: RecordingSleep, clock: ManualClock
) -> None:
    sim = await start_sim(requests_per_window=2, window_seconds=900)
    client = make_client(sim.base_url)
    limited_before = calls("spaces_search", "429")

    for _ in range(3):
        result = await client.search_spaces("anything")

    assert result.result_count == 0
    assert calls("spaces_search", "429") == limited_before + 1
    # One wait, to the reset at START+900 s plus a second of slack, measured on the clock.
    assert sleep.waits == [901.0]
    assert clock.now() == START + timedelta(seconds=901)
    assert client.rate_limits["spaces_search"].remaining == 1  # new window, one call made


async def test_rate_limit_that_never_recovers_gives_up(start_sim, make_client, sleep: RecordingSleep) -> None:
    sim = await start_sim(requests_per_window=1)
    client = make_client(sim.base_url, max_retries=2)
    await client.search_spaces("first")
    sim.state.set_fault(429, endpoint="spaces_search", count=None)

    with pytest.raises(XRateLimitError):
        await client.search_spaces("second")

    assert len(sleep.waits) == 2
    assert sleep.waits[0] == 901.0  # the first 429 is the real, exhausted window


async def test_reset_further_than_the_client_waits_is_raised_not_slept(
    start_sim, make_client, sleep: RecordingSleep
) -> None:
    sim = await start_sim(requests_per_window=1)
    client = make_client(sim.base_url, max_rate_limit_wait=60)
    await client.search_spaces("first")

    with pytest.raises(XRateLimitError) as raised:
        await client.search_spaces("second")

    assert raised.value.reset_at == START + timedelta(seconds=900)
    assert sleep.waits == []


async def test_v11_rate_limit_body_is_retried(sim: RunningSim, client: XClient, sleep: RecordingSleep) -> None:
    sim.state.set_fault(
        429, endpoint="spaces_lookup", body={"errors": [{"code": 88, "message": "Rate limit exceeded"}]}
    )

    result = await client.spaces_by_ids(["1DXxyRYNejbKM"])

    assert result.not_found == ["1DXxyRYNejbKM"]
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 1.0
    assert sim.state.calls["spaces_lookup"] == 2


async def test_by_creator_one_per_second_is_recovered(sim: RunningSim, client: XClient, sleep: RecordingSleep) -> None:
    add_creator(sim.state)

    await client.spaces_by_creator_ids([CREATOR_ID])
    await client.spaces_by_creator_ids([CREATOR_ID])  # same simulated instant: 429, then a wait

    statuses = [r.status for r in sim.state.requests]
    assert statuses == [200, 429, 200]
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 1.0


async def test_by_creator_pacing_avoids_the_per_second_429(sim: RunningSim, make_client, sleep: RecordingSleep) -> None:
    add_creator(sim.state)
    client = make_client(sim.base_url, by_creator_min_interval=1.0)

    for _ in range(3):
        await client.spaces_by_creator_ids([CREATOR_ID])

    assert [r.status for r in sim.state.requests] == [200, 200, 200]
    assert sleep.waits == [1.0, 1.0]


# --- terminal errors --------------------------------------------------------------------------


async def test_usage_cap_is_terminal_and_not_retried(sim: RunningSim, client: XClient, sleep: RecordingSleep) -> None:
    sim.state.set_usage_capped(period="Monthly")

    with pytest.raises(XTerminalError) as raised:
        await client.search_spaces("hello")

    assert raised.value.status == 429
    assert raised.value.reason == "usage-capped" and raised.value.period == "Monthly"
    assert sim.state.calls["spaces_search"] == 1 and sleep.waits == []


async def test_credits_depleted_is_terminal_on_either_host(sim: RunningSim, client: XClient) -> None:
    sim.state.set_credits_depleted()
    sim.state.configure(problem_base="https://api.x.com/2/problems/")

    with pytest.raises(XTerminalError) as raised:
        await client.users_by_usernames(["someone"])

    assert raised.value.status == 402 and raised.value.reason == "credits" and raised.value.period is None
    assert sim.state.calls["users_by"] == 1

    sim.state.clear_faults()
    assert (await client.users_by_usernames(["someone"])).not_found == ["someone"]


# --- server errors, timeouts, connection errors -----------------------------------------------


async def test_5xx_then_success_is_retried_with_growing_backoff(
    sim: RunningSim, client: XClient, sleep: RecordingSleep
) -> None:
    sim.state.set_fault(503, count=2, endpoint="spaces_search")
    before = calls("spaces_search", "503")

    result = await client.search_spaces("hello")

    assert result.result_count == 0
    assert sim.state.calls["spaces_search"] == 3
    assert calls("spaces_search", "503") == before + 2
    first, second = sleep.waits
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0  # base 0.5 s doubling, jittered to 50-100 %


async def test_persistent_5xx_is_unavailable_after_bounded_retries(
    sim: RunningSim, make_client, sleep: RecordingSleep
) -> None:
    sim.state.set_fault(500, count=None)
    client = make_client(sim.base_url, max_retries=3)

    with pytest.raises(XUnavailableError) as raised:
        await client.spaces_by_ids(["1DXxyRYNejbKM"])

    assert not isinstance(raised.value, XRateLimitError)
    assert sim.state.calls["spaces_lookup"] == 4
    assert len(sleep.waits) == 3


async def test_slow_response_times_out_then_retry_succeeds(sim: RunningSim, make_client) -> None:
    sim.state.set_delay(0.8, count=1, endpoint="spaces_search")
    client = make_client(sim.base_url, timeout=0.3)
    errors_before = calls("spaces_search", "error")

    result = await client.search_spaces("hello")

    assert result.result_count == 0
    assert calls("spaces_search", "error") == errors_before + 1


async def test_always_slow_is_unavailable(sim: RunningSim, make_client) -> None:
    sim.state.set_delay(0.8, count=None, endpoint="spaces_search")
    client = make_client(sim.base_url, timeout=0.2, max_retries=1)

    with pytest.raises(XUnavailableError) as raised:
        await client.search_spaces("hello")

    assert "Timeout" in str(raised.value)


async def test_connection_refused_is_unavailable(make_client, sleep: RecordingSleep) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    client = make_client(f"http://127.0.0.1:{port}", max_retries=2)

    with pytest.raises(XUnavailableError):
        await client.users_by_usernames(["someone"])

    assert len(sleep.waits) == 2


# --- search semantics and gone Spaces ---------------------------------------------------------


async def test_search_is_unicode_case_insensitive_and_filters_state(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    soon = START + timedelta(hours=2)
    titles = {
        "1cafe00000000": "Café ☕ CHAT",
        "1strasse00000": "Die Straße der KI",
        "1japan0000000": "日本語スペース 🎧 Live",
        "1greek0000000": "ΣΊΣΥΦΟΣ και φίλοι",
    }
    for space_id, title in titles.items():
        sim.state.add_space(CREATOR_ID, title, id=space_id, scheduled_start=soon)
    sim.state.start("1japan0000000")

    async def ids(query: str, state: str = "all") -> set[str]:
        return {s.id for s in (await client.search_spaces(query, state=state)).spaces}

    assert await ids("CAFÉ") == {"1cafe00000000"}
    assert await ids("CAFE\u0301") == {"1cafe00000000"}  # decomposed accent, normalized to NFC
    assert await ids("strasse") == {"1strasse00000"}  # casefold: ß == ss
    assert await ids("σίσυφος") == {"1greek0000000"}  # final sigma folds too
    assert await ids("🎧") == {"1japan0000000"}
    assert await ids("スペース", state="scheduled") == set()
    assert await ids("スペース", state="live") == {"1japan0000000"}
    assert await ids("☕ chat") == {"1cafe00000000"}
    result = await client.search_spaces("café")
    assert result.users_included[0].username == "XDevelopers"


@pytest.mark.parametrize("gone_mode", ["state", "not_found"])
async def test_ended_and_canceled_spaces(start_sim, make_client, gone_mode: str) -> None:
    sim = await start_sim(gone_mode=gone_mode)
    client = make_client(sim.base_url, by_creator_min_interval=1.0)
    add_creator(sim.state)
    start = START + timedelta(hours=1)
    for space_id in ("1ended0000000", "1canceled0000", "1stillon00000"):
        sim.state.add_space(CREATOR_ID, "Gone soon", id=space_id, scheduled_start=start)
    sim.state.start("1ended0000000")
    sim.state.advance_time(3600)
    sim.state.end("1ended0000000")
    sim.state.cancel("1canceled0000")

    lookup = await client.spaces_by_ids(["1ended0000000", "1canceled0000", "1stillon00000"])
    by_creator = await client.spaces_by_creator_ids([CREATOR_ID])
    search = await client.search_spaces("gone soon", state="all")

    if gone_mode == "state":
        states = {s.id: s.state for s in lookup.spaces}
        assert states == {"1ended0000000": "ended", "1canceled0000": "canceled", "1stillon00000": "scheduled"}
        ended = next(s for s in lookup.spaces if s.id == "1ended0000000")
        assert ended.ended_at == START + timedelta(hours=1) and ended.started_at == START
        assert lookup.not_found == []
    else:
        assert [s.id for s in lookup.spaces] == ["1stillon00000"]
        assert lookup.not_found == ["1ended0000000", "1canceled0000"]
    assert [s.id for s in by_creator.spaces] == ["1stillon00000"]
    assert [s.id for s in search.spaces] == ["1stillon00000"]


async def test_reschedule_moves_start_and_bumps_updated_at(sim: RunningSim, client: XClient) -> None:
    add_creator(sim.state)
    sim.state.add_space(CREATOR_ID, "moving", id="1moving000000", scheduled_start=START + timedelta(hours=1))
    sim.state.advance_time(60)
    sim.state.reschedule("1moving000000", START + timedelta(days=1))

    (space,) = (await client.spaces_by_ids(["1moving000000"])).spaces

    assert space.scheduled_start == START + timedelta(days=1)
    assert space.updated_at == START + timedelta(seconds=60)
    assert space.created_at == START
