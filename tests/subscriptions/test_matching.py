from __future__ import annotations

from datetime import timedelta

from app.accounts.service import create_account
from app.core.context import AppContext
from app.spaces.models import Space
from app.subscriptions.matching import (
    KeywordIndex,
    KeywordIndexCache,
    subscription_rows_for_spaces,
    subscriptions_for_spaces,
    upcoming_spaces_for_subscription,
)
from app.subscriptions.schemas import SubscriptionCreate, normalize_keyword
from app.subscriptions.service import create_subscription


def test_keyword_index_is_case_insensitive_unicode_phrase_match() -> None:
    index = KeywordIndex(normalize_keyword(k) for k in ["Python", "Straße", "東京", "AI  news", "🚀 Launch"])
    assert index.matches("Weekly PYTHON hangout") == {"python"}
    assert index.matches("Die STRASSE talk") == {"strasse"}
    assert index.matches("Die Straße") == {"strasse"}
    assert index.matches("東京の夜 🌃") == {"東京"}
    assert index.matches("Daily  AI   News with friends") == {"ai news"}
    assert index.matches("news about ai") == set()
    assert index.matches("🚀 LAUNCH party") == {"🚀 launch"}
    assert index.matches(None) == set()
    assert KeywordIndex([]).matches("anything") == set()


def _space(now, sid: str, creator: str, title: str, hosts: list[str] | None = None) -> Space:  # type: ignore[no-untyped-def]
    return Space(
        id=sid, creator_id=creator, title=title, state="scheduled", scheduled_start=now + timedelta(hours=1),
        host_ids=hosts or [creator], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False,
    )


async def test_subscriptions_for_spaces_by_creator_hosts_and_keyword(ctx: AppContext) -> None:
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        account = (await create_account(session, "a", now)).account_id

        async def sub(**kw):  # type: ignore[no-untyped-def]
            return await create_subscription(session, account, SubscriptionCreate(email="a@example.com", **kw), now, 100)

        by_creator = await sub(creator_id="111")
        with_hosts = await sub(creator_id="222", include_hosts=True)
        only_creator = await sub(creator_id="333")
        keyword = await sub(keyword="Rust")
        paused = await sub(keyword="rust lang")
        paused.paused = True
        spaces = [
            _space(now, "AAAAAAAAAAAAA", "111", "Rust lang weekly", hosts=["111", "222", "333"]),
            _space(now, "BBBBBBBBBBBBB", "999", "gardening"),
        ]
        session.add_all(spaces)
        await session.flush()
        index = await KeywordIndexCache().get(session)
        matched = await subscriptions_for_spaces(session, spaces, index)
        assert {s.id for s in matched["AAAAAAAAAAAAA"]} == {by_creator.id, with_hosts.id, keyword.id}
        assert matched["BBBBBBBBBBBBB"] == []
        assert only_creator.id not in {s.id for s in matched["AAAAAAAAAAAAA"]}

        assert [s.id for s in await upcoming_spaces_for_subscription(session, keyword, now)] == ["AAAAAAAAAAAAA"]
        assert [s.id for s in await upcoming_spaces_for_subscription(session, with_hosts, now)] == ["AAAAAAAAAAAAA"]
        later = now + timedelta(hours=2)
        assert await upcoming_spaces_for_subscription(session, keyword, later) == []


async def test_subscription_rows_match_what_the_entities_match(ctx: AppContext) -> None:
    """The fan-out loads plain rows: the same subscriptions, in the same order, with the same values."""
    now = ctx.clock.now()
    async with ctx.db.write() as session:
        account = (await create_account(session, "a", now)).account_id

        async def sub(**kw):  # type: ignore[no-untyped-def]
            return await create_subscription(session, account, SubscriptionCreate(email="a@example.com", **kw), now, 100)

        await sub(creator_id="111", lead_times=[60, 15])
        await sub(creator_id="222", include_hosts=True, event_types=["space.reminder", "space.started"])
        await sub(creator_id="333")
        await sub(keyword="Rust")
        (await sub(keyword="rust lang")).paused = True
        (await sub(creator_id="111", lead_times=[5])).target_status = "suspended"
        await sub(creator_id="111", include_hosts=True, lead_times=[120, 30, 1])
        spaces = [
            _space(now, "AAAAAAAAAAAAA", "111", "Rust lang weekly", hosts=["111", "222", "333"]),
            _space(now, "BBBBBBBBBBBBB", "222", "rust", hosts=["222", "111"]),
            _space(now, "CCCCCCCCCCCCC", "999", "gardening"),
        ]
        session.add_all(spaces)
        await session.flush()
        index = await KeywordIndexCache().get(session)
        for include_paused in (False, True):
            entities = await subscriptions_for_spaces(session, spaces, index, include_paused=include_paused)
            rows = await subscription_rows_for_spaces(session, spaces, index, include_paused=include_paused)
            assert [len(entities[s.id]) for s in spaces] == ([5, 3, 0] if include_paused else [4, 3, 0])
            for space in spaces:
                assert [
                    (e.id, e.account_id, e.creator_id, e.keyword_normalized, e.include_hosts, e.webhook_endpoint_id,
                     e.email_recipient_id, e.lead_times, e.event_types, e.paused)
                    for e in entities[space.id]
                ] == [
                    (r.id, r.account_id, r.creator_id, r.keyword_normalized, r.include_hosts, r.webhook_endpoint_id,
                     r.email_recipient_id, list(r.lead_times), list(r.event_types), r.paused)
                    for r in rows[space.id]
                ]


async def test_keyword_index_cache_rebuilds_on_change(ctx: AppContext) -> None:
    now = ctx.clock.now()
    cache = KeywordIndexCache()
    async with ctx.db.write() as session:
        account = (await create_account(session, "a", now)).account_id
        assert (await cache.get(session)).matches("go live") == set()
        await create_subscription(session, account, SubscriptionCreate(keyword="go", email="a@example.com"), now, 100)
        assert (await cache.get(session)).matches("go live") == {"go"}


def test_phrase_mode_needs_word_boundaries_except_in_unspaced_scripts() -> None:
    from app.subscriptions.matching import SUBSTRING, keyword_in_title

    phrase = KeywordIndex(["ai", "東京", "c++", "go"])
    substring = KeywordIndex(["ai", "東京", "c++", "go"], SUBSTRING)
    assert phrase.matches("What she said") == set()
    assert substring.matches("What she said") == {"ai"}
    assert phrase.matches("AI: the week, ai-news") == {"ai"}
    assert phrase.matches("東京タワー") == {"東京"}
    assert phrase.matches("Learning C++ together") == {"c++"}
    assert phrase.matches("Let's go!") == {"go"} and phrase.matches("Google") == set()
    assert keyword_in_title("ai", "Said AI") is True
    assert keyword_in_title("ai", "Said") is False
    assert keyword_in_title("ai", "Said", SUBSTRING) is True
