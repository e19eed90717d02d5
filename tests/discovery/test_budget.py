"""Budget: X's rate limits over many cycles, 429 storms, fair rotation, terminal errors, spend cap."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY

from app.core.context import AppContext
from app.discovery.component import DiscoveryComponent
from app.discovery.planner import SEARCH
from app.main import create_app
from app.x.client import XClient
from app.x.sim import RunningSim, SimState
from tests.conftest import RunningServer, free_port
from tests.discovery.conftest import ClockSleep, bulk_subscribe, cycle, later, new_account, subscribe


def record_statuses(sim_state: SimState) -> list[tuple[str, int, datetime, dict[str, str]]]:
    """Every request the simulator answers: (endpoint, status, sim time, params)."""
    seen: list[tuple[str, int, datetime, dict[str, str]]] = []
    original = sim_state.record

    def record(endpoint: str, params: list[tuple[str, str]], status: int) -> None:
        seen.append((endpoint, status, sim_state.now(), dict(params)))
        original(endpoint, params, status)

    sim_state.record = record  # type: ignore[method-assign]
    return seen


def max_in_any_window(times: list[datetime], seconds: float) -> int:
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t < start + timedelta(seconds=seconds)))
    return best


async def test_many_cycles_never_provoke_a_429(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    ctx.settings.x_requests_per_window = sim_state.requests_per_window = 20
    sim_state.window_seconds = ctx.settings.x_window_seconds = 600
    seen = record_statuses(sim_state)
    account = await new_account(ctx)
    creators = [sim_state.add_user(f"c{i}", id=str(5000 + i)) for i in range(250)]
    for i, user in enumerate(creators[:40]):
        sim_state.add_space(user.id, f"Talk {i}", scheduled_start=later(ctx, hours=1 + i % 5), id=f"1S{i:011d}")
    await bulk_subscribe(ctx, account, creator_ids=[u.id for u in creators])
    for word in ["python", "rust", "jazz", "chess", "golf", "tea"]:
        await subscribe(ctx, account, keyword=word, event_types=["space.started"])

    reports = [await cycle(ctx, xclient) for _ in range(70)]  # 35 minutes: three and a half windows

    assert {status for _, status, _, _ in seen} == {200}
    for endpoint in {e for e, _, _, _ in seen}:
        times = [at for e, _, at, _ in seen if e == endpoint]
        assert max_in_any_window(times, 600) <= 20, endpoint
    assert sum(len(r.events) for r in reports) == 40
    assert all(r.errors == [] and r.stopped is None for r in reports)
    # 250 creators take 3 calls; 12 searches at 1 a cycle (20 per 600 s window, spread over 20 cycles).
    last = reports[-1]
    assert last.staleness_bound_seconds == 12 * 30
    assert last.max_staleness_seconds is not None and last.max_staleness_seconds <= last.staleness_bound_seconds


async def test_cycles_closer_than_the_interval_still_respect_the_window(
    ctx: AppContext, sim_state: SimState, xclient: XClient
) -> None:
    """Ticks bunched up (a restart, a manual run): our call log, not the even share, holds the line."""
    ctx.settings.x_requests_per_window = sim_state.requests_per_window = 20
    sim_state.window_seconds = ctx.settings.x_window_seconds = 600
    seen = record_statuses(sim_state)
    await subscribe(ctx, await new_account(ctx), keyword="python")
    reports = [await cycle(ctx, xclient, advance=5) for _ in range(250)]  # 1250 s, a cycle every 5 s
    searches = [at for e, _, at, _ in seen if e == "spaces_search"]
    assert {status for _, status, _, _ in seen} == {200}
    assert max_in_any_window(searches, 600) == 20
    start = reports[0].started_at
    per_window = Counter(int((at - start).total_seconds() // 600) for at in searches)
    # The window fills in its first 100 s, then nothing until the oldest call leaves it.
    assert per_window == {0: 20, 1: 20, 2: 10}
    assert all(r.errors == [] for r in reports)


async def test_default_budget_under_heavy_demand(ctx: AppContext, sim_state: SimState, xclient: XClient) -> None:
    seen = record_statuses(sim_state)
    account = await new_account(ctx)
    users = [sim_state.add_user(f"u{i}", id=str(7000 + i)) for i in range(1500)]
    await bulk_subscribe(ctx, account, creator_ids=[u.id for u in users], keywords=[f"topic{i}" for i in range(40)])
    reports = [await cycle(ctx, xclient) for _ in range(35)]
    assert {status for _, status, _, _ in seen} == {200}
    by_creator = sorted(at for e, _, at, _ in seen if e == "spaces_by_creator")
    assert all((b - a).total_seconds() >= 1.0 for a, b in zip(by_creator, by_creator[1:], strict=False))
    assert max_in_any_window(by_creator, 900) <= 300
    assert max(r.calls.get("spaces_search", 0) for r in reports) == 10  # 300 / (900 s / 30 s)
    assert reports[-1].staleness_bound_seconds == 4 * 30  # 40 keywords at 10 a cycle; 15 creator calls at 10


@pytest.mark.parametrize(("status", "says"), [(429, "rate limited"), (503, "unavailable")])
async def test_error_storm_is_recovered(
    ctx: AppContext, sim_state: SimState, xclient: XClient, sleep: ClockSleep, status: int, says: str
) -> None:
    alice = sim_state.add_user("alice", id="1001")
    bob = sim_state.add_user("bob", id="1002")
    mine = sim_state.add_space(alice.id, "Alice live soon", scheduled_start=later(ctx, hours=1), id="1AAAAAAAAAAAA")
    chess = sim_state.add_space(bob.id, "Chess night", scheduled_start=later(ctx, hours=2), id="1BBBBBBBBBBBB")
    account = await new_account(ctx)
    await subscribe(ctx, account, creator_id=alice.id)
    await subscribe(ctx, account, keyword="chess")
    sim_state.set_fault(status, count=8, endpoint="spaces_search")

    first = await cycle(ctx, xclient)
    assert first.events == [(mine.id, "space.scheduled")]  # the creator poll went through
    assert len(first.errors) == 1 and says in first.errors[0]
    assert first.polled and all(t.kind == "creator" for t in first.polled)  # the keyword stays due
    assert first.stopped is None and sleep.waits  # the client backed off on the simulated clock

    reports = [await cycle(ctx, xclient) for _ in range(3)]
    assert [(chess.id, "space.scheduled")] in [r.events for r in reports]
    assert reports[-1].errors == []


async def test_fair_rotation_with_more_keywords_than_budget(
    ctx: AppContext, sim_state: SimState, xclient: XClient
) -> None:
    ctx.settings.x_requests_per_window = sim_state.requests_per_window = 60  # 2 searches a 30 s cycle
    seen = record_statuses(sim_state)
    bob = sim_state.add_user("bob", id="1002")
    account = await new_account(ctx)
    words = [f"kw{i:02d}" for i in range(25)]
    for i, word in enumerate(words):
        await subscribe(ctx, account, keyword=word)
        sim_state.add_space(bob.id, f"About {word}", scheduled_start=later(ctx, days=1), id=f"1K{i:011d}")

    reports = [await cycle(ctx, xclient) for _ in range(40)]

    bound = reports[-1].staleness_bound_seconds
    assert bound == 13 * 30  # ceil(25 / 2) cycles
    polls: dict[str, list[datetime]] = defaultdict(list)
    for endpoint, status, at, params in seen:
        assert status == 200
        if endpoint == "spaces_search":
            polls[params["query"]].append(at)
    assert set(polls) == set(words)
    start = reports[0].started_at
    for word, times in polls.items():
        gaps = [(b - a).total_seconds() for a, b in zip([start, *times], times, strict=False)]
        assert max(gaps) <= bound, (word, gaps)
    for report in reports[13:]:
        assert report.max_staleness_seconds is not None and report.max_staleness_seconds <= bound
    assert sum(len(r.events) for r in reports) == 25
    assert [r.calls.get(SEARCH) for r in reports] == [2] * 40, [(r.calls, r.plan and r.plan.allowances) for r in reports]
    assert REGISTRY.get_sample_value("spacebell_discovery_staleness_bound_seconds") == bound


async def readyz(server: RunningServer) -> tuple[int, dict]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/readyz")
        return r.status_code, r.json()


@pytest.mark.parametrize("fault", ["usage_capped", "credits"])
async def test_terminal_error_stops_polling_until_reset(
    ctx: AppContext, sim: RunningSim, sim_state: SimState, xclient: XClient, fault: str
) -> None:
    alice = sim_state.add_user("alice", id="1001")
    sim_state.add_space(alice.id, "Later", scheduled_start=later(ctx, days=40), id="1AAAAAAAAAAAA")
    await subscribe(ctx, await new_account(ctx), creator_id=alice.id)
    leader = DiscoveryComponent(ctx, lambda: xclient, schedule=False)
    watcher = DiscoveryComponent(ctx, None, schedule=False)  # a process that serves the API only
    (sim_state.set_usage_capped if fault == "usage_capped" else sim_state.set_credits_depleted)()
    async with RunningServer(create_app(ctx, components=[leader, watcher]), free_port()) as server:
        report = await leader.tick()
        await watcher.tick()
        assert report is not None and report.stopped is not None
        reason = "usage-capped" if fault == "usage_capped" else "credits"
        assert report.stopped.reason == reason and report.events == []
        expected_resume = datetime(2026, 4, 1, tzinfo=UTC) if fault == "usage_capped" else report.started_at + timedelta(hours=1)
        assert report.stopped.resume_at == expected_resume
        status, body = await readyz(server)
        assert status == 503
        check = body["checks"]["discovery"]
        assert check["ready"] is False and check["polling"] == "stopped"
        assert (check["stopped_reason"], check["resumes_at"]) == (reason, expected_resume.isoformat())
        assert watcher.readiness()["stopped_reason"] == reason and watcher.readiness()["ready"] is False
        assert REGISTRY.get_sample_value("spacebell_discovery_polling_stopped", {"reason": reason}) == 1

        calls = sum(sim_state.calls.values())
        ctx.clock.advance(600)
        skipped = await leader.tick()
        assert skipped is not None and skipped.calls == {} and sum(sim_state.calls.values()) == calls

        sim_state.clear_faults()
        ctx.clock.set(expected_resume + timedelta(seconds=1))
        resumed = await leader.tick()
        await watcher.tick()
        assert resumed is not None and resumed.stopped is None and resumed.calls.get("spaces_by_creator") == 1
        assert resumed.events == [("1AAAAAAAAAAAA", "space.scheduled")]
        status, body = await readyz(server)
        assert status == 200 and body["checks"]["discovery"]["polling"] == "running"
        assert watcher.readiness()["ready"] is True


async def test_unauthorized_is_reported(ctx: AppContext, sim: RunningSim, sim_state: SimState, sleep: ClockSleep) -> None:
    sim_state.add_user("alice", id="1001")
    await subscribe(ctx, await new_account(ctx), creator_id="1001")
    bad = XClient(sim.base_url, "wrong-token", clock=ctx.clock, sleep=sleep)
    component = DiscoveryComponent(ctx, lambda: bad, schedule=False)
    await component.start()
    try:
        report = await component.tick()
        assert report is not None and report.stopped is not None and report.stopped.reason == "unauthorized"
        ready = component.readiness()
        assert ready["ready"] is False and ready["stopped_reason"] == "unauthorized"
        assert "Unauthorized" in ready["stopped_detail"]
    finally:
        await component.stop()


async def test_daily_spend_cap_stops_polling_until_next_utc_day(
    ctx: AppContext, sim_state: SimState, xclient: XClient
) -> None:
    ctx.settings.x_daily_spend_cap_usd = 0.05
    alice = sim_state.add_user("alice", id="1001")
    bob = sim_state.add_user("bob", id="1002")
    for i in range(12):
        sim_state.add_space(alice.id, f"Episode {i}", scheduled_start=later(ctx, hours=i + 1), id=f"1A{i:011d}")
    sim_state.add_space(bob.id, "Chess", scheduled_start=later(ctx, hours=1), id="1BBBBBBBBBBBB")
    account = await new_account(ctx)
    await subscribe(ctx, account, creator_id=alice.id)
    await subscribe(ctx, account, keyword="chess")

    first = await cycle(ctx, xclient)
    # 12 Spaces ($0.06) and their creator ($0.01) in the first call; nothing more once over the cap.
    assert first.calls == {"spaces_by_creator": 1}
    assert first.spend_usd == pytest.approx(0.07)
    assert first.stopped is not None and first.stopped.reason == "daily-spend-cap"
    assert REGISTRY.get_sample_value("spacebell_x_estimated_daily_spend_usd") == pytest.approx(0.07)
    assert REGISTRY.get_sample_value("spacebell_x_daily_spend_cap_usd") == pytest.approx(0.05)

    calls = sum(sim_state.calls.values())
    blocked = await cycle(ctx, xclient)
    assert blocked.calls == {} and blocked.stopped is not None and sum(sim_state.calls.values()) == calls
    ctx.clock.set(datetime(2026, 3, 3, 0, 0, 1, tzinfo=UTC))
    next_day = await cycle(ctx, xclient)
    assert next_day.stopped is not None  # a new day, but the same 13 resources cost the same again
    assert next_day.calls == {"spaces_by_creator": 1}

    ctx.settings.x_daily_spend_cap_usd = 0  # no cap
    ctx.clock.set(datetime(2026, 3, 4, 0, 0, 1, tzinfo=UTC))
    free = await cycle(ctx, xclient)
    assert free.stopped is None and free.events == [("1BBBBBBBBBBBB", "space.scheduled")]
    assert free.calls == {"spaces_by_creator": 1, "spaces_search": 1}

