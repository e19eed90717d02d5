"""The seedable data generator: determinism, X's id formats, languages, schedules."""

from __future__ import annotations

import re
from datetime import timedelta

from app.x.sim import SimState
from app.x.sim.generator import LANGUAGES, MAX_SCHEDULE_AHEAD, SpaceGenerator

from .helpers import START


def test_same_seed_same_world_and_different_seed_different_world() -> None:
    first = SpaceGenerator(seed=42).world(START, creators=20, spaces_per_creator=3, soon=4)
    again = SpaceGenerator(seed=42).world(START, creators=20, spaces_per_creator=3, soon=4)
    other = SpaceGenerator(seed=43).world(START, creators=20, spaces_per_creator=3, soon=4)

    assert first == again
    assert [c.id for c in first.creators] != [c.id for c in other.creators]
    assert [s.title for s in first.spaces] != [s.title for s in other.spaces]


def test_ids_and_usernames_follow_xs_formats_and_are_unique() -> None:
    world = SpaceGenerator(seed=1).world(START, creators=300, spaces_per_creator=2)

    user_ids = [c.id for c in world.creators]
    usernames = [c.username.lower() for c in world.creators]
    space_ids = [s.id for s in world.spaces]
    assert all(re.fullmatch(r"[0-9]{1,19}", i) for i in user_ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_]{1,15}", c.username) for c in world.creators)
    assert all(re.fullmatch(r"[a-zA-Z0-9]{13}", i) for i in space_ids)
    assert len(set(user_ids)) == len(user_ids)
    assert len(set(usernames)) == len(usernames)
    assert len(set(space_ids)) == len(space_ids)


def test_titles_span_languages_and_carry_emoji() -> None:
    world = SpaceGenerator(seed=2).world(START, creators=200, spaces_per_creator=2)

    langs = {s.lang for s in world.spaces}
    assert {"en", "es", "ja", "pt", "ar", "hi", "fr", "de"} <= langs <= set(LANGUAGES)
    assert any(re.search(r"[\U0001F300-\U0001FAFF\u2600-\u27BF]", s.title) for s in world.spaces)
    assert any(re.search(r"[\u3040-\u30ff]", s.title) for s in world.spaces if s.lang == "ja")
    assert any(re.search(r"[\u0600-\u06ff]", s.title) for s in world.spaces if s.lang == "ar")
    assert all(s.title for s in world.spaces)


def test_schedules_spread_up_to_14_days_and_soon_ones_start_within_the_window() -> None:
    world = SpaceGenerator(seed=3).world(
        START, creators=50, spaces_per_creator=4, soon=5, soon_within_minutes=10, live_fraction=0.1
    )

    soon, rest = world.spaces[:5], world.spaces[5:]
    assert all(START < s.scheduled_start <= START + timedelta(minutes=10) for s in soon)
    scheduled = [s for s in rest if s.state == "scheduled"]
    live = [s for s in rest if s.state == "live"]
    assert all(START < s.scheduled_start <= START + MAX_SCHEDULE_AHEAD for s in scheduled)
    assert all(s.scheduled_start.minute % 15 == 0 and s.scheduled_start.second == 0 for s in scheduled)
    assert max(s.scheduled_start for s in scheduled) > START + timedelta(days=10)  # spread, not bunched
    assert live and all(s.started_at < START and s.participant_count > 0 for s in live)
    assert all(s.created_at < START for s in world.spaces)


def test_populate_fills_the_simulator_without_clashing_with_existing_data() -> None:
    state = SimState(seed=0)
    state.set_time(START)
    state.add_user("taken", id="123")

    users, spaces = state.populate(seed=9, creators=5, spaces_per_creator=2)

    assert len(users) == 5 and len(spaces) == 10 and len(state.users) == 6
    assert all(space.creator_id in state.users for space in spaces)
    assert all(set(space.host_ids) <= set(state.users) for space in spaces)
