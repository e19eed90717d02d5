"""The budget planner is pure: these run without a database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from app.discovery.planner import (
    BY_CREATOR,
    CREATOR,
    KEYWORD,
    LOOKUP,
    SEARCH,
    USERS,
    BudgetConfig,
    KnownSpace,
    Target,
    billing_day,
    endpoint_allowance,
    estimated_spend,
    least_recently_polled,
    next_utc_midnight,
    plan_cycle,
    recheck_candidates,
    rotation_period,
    spend_cap_reached,
    terminal_resume_at,
)
from app.x.client import RateLimit

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
X = BudgetConfig(requests_per_window=300, window_seconds=900, interval_seconds=30, by_creator_min_interval_seconds=1)


def test_window_is_spread_over_its_cycles() -> None:
    assert endpoint_allowance(SEARCH, NOW, X, []) == 10
    assert endpoint_allowance(SEARCH, NOW, BudgetConfig(300, 900, 1200), []) == 300  # one cycle per window
    assert endpoint_allowance(SEARCH, NOW, BudgetConfig(5, 900, 30), []) == 1  # at least one a cycle
    # by_creator: 1 call a second, so at most 29 fit in a 30 s cycle without overrunning it.
    assert endpoint_allowance(BY_CREATOR, NOW, BudgetConfig(3000, 900, 30, 1.0), []) == 29


def test_our_call_log_caps_the_trailing_window() -> None:
    history = [(NOW - timedelta(seconds=30 * i), 10) for i in range(1, 30)]  # 290 in the last 870 s
    assert endpoint_allowance(SEARCH, NOW, X, history) == 10
    history.append((NOW - timedelta(seconds=5), 5))  # a burst: 295
    assert endpoint_allowance(SEARCH, NOW, X, history) == 5
    old = [(NOW - timedelta(seconds=900), 300)]  # exactly one window ago: X's window has reset
    assert endpoint_allowance(SEARCH, NOW, X, old) == 10


def test_x_reported_remaining_wins_when_lower() -> None:
    low = RateLimit(limit=300, remaining=3, reset_at=NOW + timedelta(seconds=100))
    assert endpoint_allowance(SEARCH, NOW, X, [], low) == 3
    exhausted = RateLimit(limit=300, remaining=0, reset_at=NOW + timedelta(seconds=100))
    assert endpoint_allowance(SEARCH, NOW, X, [], exhausted) == 0
    reset = RateLimit(limit=300, remaining=0, reset_at=NOW - timedelta(seconds=1))
    assert endpoint_allowance(SEARCH, NOW, X, [], reset) == 10


def test_rotation_is_least_recently_polled_first() -> None:
    targets = [
        Target(KEYWORD, "b", NOW - timedelta(minutes=1)),
        Target(KEYWORD, "a", NOW - timedelta(minutes=5)),
        Target(KEYWORD, "new"),
        Target(KEYWORD, "c", NOW - timedelta(minutes=5)),
    ]
    assert [t.value for t in least_recently_polled(targets, 3)] == ["new", "a", "c"]
    assert least_recently_polled(targets, 0) == []


def test_plan_batches_creators_by_100_and_bounds_staleness() -> None:
    creators = [Target(CREATOR, str(1000 + i), NOW - timedelta(seconds=i)) for i in range(2500)]
    searches = [Target(KEYWORD, f"k{i}") for i in range(45)]
    plan = plan_cycle(
        NOW, X, creators=creators, searches=searches, usernames=["Bob", "bob", "amy"], history={}, rate_limits={}
    )
    assert [len(b) for b in plan.creator_batches] == [100] * 10
    assert plan.creator_batches[0][0].value == str(1000 + 2499)  # the oldest poll goes first
    assert len(plan.searches) == 10 and plan.lookup_calls == 10
    assert plan.username_batches == [["amy", "bob"]]  # X usernames are case-insensitive
    assert plan.allowances == {BY_CREATOR: 10, SEARCH: 10, LOOKUP: 10, USERS: 10}
    # 25 creator batches at 10 a cycle: 3 cycles; 45 searches at 10 a cycle: 5 cycles.
    assert plan.staleness_bound_seconds == 5 * 30
    assert rotation_period(0, 10, 30) == 0


def test_recheck_prefers_spaces_a_poll_should_have_returned() -> None:
    seen = NOW - timedelta(seconds=30)
    known = [
        KnownSpace("A", "1", "mine", "scheduled", seen),  # creator polled, not returned: expected
        KnownSpace("B", "1", "mine too", "scheduled", seen),  # returned
        KnownSpace("C", "2", "rust night", "scheduled", seen),  # a complete search for "rust" ran
        KnownSpace("D", "3", "old live one", "live", NOW - timedelta(hours=1)),  # stale
        KnownSpace("E", "3", "fresh", "live", seen),  # neither
        KnownSpace("F", "4", "rust live", "live", seen),  # only a scheduled search ran for rust
    ]
    rust = lambda title: "rust" in (title or "")  # noqa: E731
    ids = recheck_candidates(
        known, NOW, returned={"B"}, polled_creators={"1"}, searched_scheduled=rust,
        searched_live=lambda _: False, stale_after_seconds=120, limit=100,
    )
    assert ids == ["A", "C", "D"]
    assert recheck_candidates(
        known, NOW, returned=set(), polled_creators={"1"}, searched_scheduled=rust,
        searched_live=lambda _: False, stale_after_seconds=120, limit=1,
    ) == ["A"]


def test_spend_and_resume_times() -> None:
    assert estimated_spend(12, 1, 0.005, 0.010) == 0.07
    assert spend_cap_reached(20.0, 20.0) and not spend_cap_reached(19.99, 20.0)
    assert not spend_cap_reached(1000.0, 0)  # 0 = no cap
    late = datetime(2026, 3, 2, 23, 59, 59, tzinfo=UTC)
    assert billing_day(late) == date(2026, 3, 2)
    assert next_utc_midnight(late) == datetime(2026, 3, 3, tzinfo=UTC)
    december = datetime(2026, 12, 15, tzinfo=UTC)
    assert terminal_resume_at("usage-capped", "Monthly", december) == datetime(2027, 1, 1, tzinfo=UTC)
    assert terminal_resume_at("usage-capped", "Daily", late) == datetime(2026, 3, 3, tzinfo=UTC)
    assert terminal_resume_at("credits", None, NOW) == NOW + timedelta(hours=1)
