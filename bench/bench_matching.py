"""Keyword matching at scale: 100,000 keyword subscriptions against 10,000 newly discovered Spaces.

    python bench/bench_matching.py [--subscriptions 100000] [--spaces 10000] [--no-db]

Part 1 times the Aho-Corasick KeywordIndex with a dict standing in for the subscription lookup (target:
matching under 1 s). Part 2 times the real path against a migrated SQLite file: KeywordIndexCache
builds the index from the subscription table, then subscriptions_for_spaces loads what matched.
Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.subscriptions.matching import KeywordIndex  # noqa: E402
from app.subscriptions.schemas import normalize_keyword  # noqa: E402
from app.x.sim.generator import _EMOJI, LANGUAGES  # noqa: E402

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

# More words per language than the simulator's packs, so that keywords have a long, realistic tail.
EXTRA_WORDS: dict[str, list[str]] = {
    "en": ["python", "rust", "golang", "typescript", "machine learning", "crypto", "bitcoin", "ethereum", "nft",
           "climate", "podcast", "startup", "design", "ux", "marketing", "seo", "nba", "nfl", "premier league",
           "taylor swift", "anime", "gaming", "esports", "indie hackers", "web3", "devops", "kubernetes", "llm",
           "open source", "remote work", "investing", "stocks", "real estate", "fitness", "mental health"],
    "es": ["fútbol", "música", "emprendedores", "criptomonedas", "política", "cine", "series", "educación",
           "salud", "liga mx", "real madrid", "barça", "reguetón", "programación", "economía"],
    "pt": ["futebol", "flamengo", "palmeiras", "tecnologia", "negócios", "investimentos", "política", "bbb",
           "sertanejo", "programação", "saúde mental", "marketing digital"],
    "ja": ["アニメ", "ゲーム", "プログラミング", "投資", "音楽", "声優", "野球", "漫画", "仮想通貨", "副業",
           "ポケモン", "原神", "エンジニア", "雑談", "朝活"],
    "ko": ["케이팝", "게임", "개발", "주식", "부동산", "드라마", "축구", "코인", "스타트업", "웹툰"],
    "ar": ["التقنية", "كرة القدم", "الذكاء الاصطناعي", "ريادة الأعمال", "الشعر", "الاقتصاد", "العملات الرقمية",
           "التسويق", "البرمجة", "الدوري السعودي"],
    "hi": ["क्रिकेट", "तकनीक", "स्टार्टअप", "बॉलीवुड", "शिक्षा", "राजनीति", "निवेश", "आईपीएल", "योग", "संगीत"],
    "fr": ["l'ia", "football", "musique", "rap", "politique", "cinéma", "startups", "crypto", "ligue 1",
           "jeux vidéo", "développement web", "écologie"],
    "de": ["fußball", "bundesliga", "technik", "ki", "musik", "politik", "aktien", "gaming", "nachhaltigkeit",
           "programmierung", "straße"],
}
SYLLABLES = {
    "latin": ["ka", "ri", "to", "mo", "la", "ne", "su", "vi", "po", "de", "xa", "zu", "bel", "tor", "ran", "mik"],
    "ja": ["か", "き", "さ", "し", "た", "な", "ま", "ら", "リ", "ト", "ン", "ス", "ア", "ク"],
    "ko": ["가", "나", "다", "라", "마", "바", "사", "아", "자", "하", "민", "준"],
    "ar": ["ال", "مر", "كت", "سل", "نو", "حب", "قم", "رس"],
}


def vocabulary(rng: random.Random) -> tuple[list[str], list[str]]:
    """(head, tail): popular words many people follow, and a long tail of rarer keywords."""
    head: list[str] = []
    for lang, pack in LANGUAGES.items():
        head += pack.topics + EXTRA_WORDS.get(lang, []) + [h for h in pack.handles]
    head = list(dict.fromkeys(head))
    tail: set[str] = set()
    while len(tail) < 80_000:
        roll = rng.random()
        if roll < 0.3:  # a phrase of two known words
            tail.add(f"{rng.choice(head)} {rng.choice(head)}")
        elif roll < 0.45:  # hashtags and mentions
            tail.add(f"{rng.choice('#@')}{rng.choice(head).replace(' ', '')}{rng.randint(0, 999)}")
        elif roll < 0.55:  # a known word with a year or an emoji
            tail.add(f"{rng.choice(head)} {rng.choice(['2026', '2027', *_EMOJI])}")
        else:  # invented words in several scripts (names of projects, shows, people)
            script = rng.choice(["latin", "latin", "ja", "ko", "ar"])
            word = "".join(rng.choices(SYLLABLES[script], k=rng.randint(2, 4)))
            tail.add(word if rng.random() < 0.7 else f"{word} {rng.choice(head)}")
    return head, sorted(tail)


def keyword_subscriptions(rng: random.Random, count: int, head: list[str], tail: list[str]) -> list[tuple[str, str]]:
    """(subscription id, keyword as typed): a Zipf-ish head shared by many, a tail mostly unique."""
    weights = [1 / (rank + 1) for rank in range(len(head))]
    subs = []
    for i in range(count):
        word = rng.choices(head, weights)[0] if rng.random() < 0.35 else rng.choice(tail)
        typed = word.upper() if rng.random() < 0.1 else word.title() if rng.random() < 0.1 else word
        subs.append((f"sub_{i:08d}", typed))
    return subs


def space_titles(rng: random.Random, count: int, head: list[str], tail: list[str]) -> list[str]:
    """Titles from the simulator's per-language templates, about that language's topics mostly."""
    titles = []
    for _ in range(count):
        lang = rng.choice(list(LANGUAGES))
        pack = LANGUAGES[lang]
        topic = rng.choice(tail) if rng.random() < 0.3 else rng.choice(pack.topics + EXTRA_WORDS.get(lang, []))
        title = rng.choice(pack.templates).format(topic=topic, emoji=rng.choice(_EMOJI))
        if rng.random() < 0.2:
            title = f"{title} | {rng.choice(head).upper()} {rng.randint(1, 99)}"
        titles.append(title)
    return titles


def bench_in_memory(subs: list[tuple[str, str]], titles: list[str]) -> None:
    started = time.perf_counter()
    by_keyword: dict[str, list[str]] = defaultdict(list)
    for sub_id, typed in subs:
        by_keyword[normalize_keyword(typed)].append(sub_id)
    normalized = time.perf_counter()
    index = KeywordIndex(by_keyword)
    built = time.perf_counter()

    pairs = 0
    per_space: list[int] = []
    for title in titles:
        matched = {sub_id for keyword in index.matches(title) for sub_id in by_keyword[keyword]}
        pairs += len(matched)
        per_space.append(len(matched))
    matched_at = time.perf_counter()

    match_seconds = matched_at - built
    print("== In memory: KeywordIndex + dict lookup ==")
    print(f"subscriptions            {len(subs):>12,}")
    print(f"distinct keywords        {len(by_keyword):>12,}   (shared by >1 subscription: "
          f"{sum(1 for v in by_keyword.values() if len(v) > 1):,})")
    print(f"Spaces                   {len(titles):>12,}")
    print(f"normalize keywords       {normalized - started:>12.3f} s")
    print(f"build automaton          {built - normalized:>12.3f} s")
    print(f"match all Spaces         {match_seconds:>12.3f} s   target < 1 s: {'OK' if match_seconds < 1 else 'MISSED'}")
    print(f"(Space, subscription)    {pairs:>12,} pairs")
    print(f"matches/s                {pairs / match_seconds:>12,.0f}")
    print(f"Spaces/s                 {len(titles) / match_seconds:>12,.0f}")
    print(f"Spaces with a match      {sum(1 for n in per_space if n):>12,}")
    print(f"subs per Space           median {statistics.median(per_space):.0f}, max {max(per_space):,}")
    print()


async def bench_sqlite(subs: list[tuple[str, str]], titles: list[str]) -> None:
    from sqlalchemy import insert

    from app.accounts.service import create_account
    from app.core import migrate
    from app.core.db import Database
    from app.spaces.models import Space
    from app.subscriptions.matching import KeywordIndexCache, subscriptions_for_spaces
    from app.subscriptions.models import Subscription

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await migrate.upgrade(db.engine)
            async with db.write() as session:
                account = (await create_account(session, "bench", NOW)).account_id
            started = time.perf_counter()
            rows = [
                dict(id=sub_id, account_id=account, target_kind="keyword", keyword=typed,
                     keyword_normalized=normalize_keyword(typed), include_hosts=False, target_status="active",
                     lead_times=[15], event_types=["space.reminder"], paused=False, created_at=NOW, updated_at=NOW)
                for sub_id, typed in subs
            ]
            async with db.write() as session:
                for start in range(0, len(rows), 5000):
                    await session.execute(insert(Subscription), rows[start : start + 5000])
            loaded = time.perf_counter()

            rng = random.Random(7)
            spaces = [
                Space(id=f"1{i:012d}", creator_id=str(10**17 + rng.randint(0, 2000)), title=title, state="scheduled",
                      scheduled_start=NOW + timedelta(hours=1), host_ids=[], first_seen_at=NOW, last_seen_at=NOW,
                      revision=1, is_ticketed=False)
                for i, title in enumerate(titles)
            ]
            cache = KeywordIndexCache()
            async with db.session() as session:
                t0 = time.perf_counter()
                index = await cache.get(session)
                t1 = time.perf_counter()
                await cache.get(session)  # unchanged subscriptions: only the fingerprint query
                t2 = time.perf_counter()
                matched = await subscriptions_for_spaces(session, spaces, index)
                t3 = time.perf_counter()
            pairs = sum(len(v) for v in matched.values())
            distinct = len({s.id for v in matched.values() for s in v})
            print("== SQLite file: KeywordIndexCache + subscriptions_for_spaces ==")
            print(f"insert subscriptions     {loaded - started:>12.3f} s")
            print(f"index from database      {t1 - t0:>12.3f} s   ({index.size:,} keywords)")
            print(f"cache hit (fingerprint)  {t2 - t1:>12.3f} s")
            print(f"subscriptions_for_spaces {t3 - t2:>12.3f} s   ({len(spaces):,} Spaces, {pairs:,} pairs, "
                  f"{distinct:,} distinct subscriptions loaded)")
            print(f"matches/s                {pairs / (t3 - t2):>12,.0f}")
        finally:
            await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=100_000)
    parser.add_argument("--spaces", type=int, default=10_000)
    parser.add_argument("--no-db", action="store_true", help="skip the SQLite part")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    head, tail = vocabulary(rng)
    subs = keyword_subscriptions(rng, args.subscriptions, head, tail)
    titles = space_titles(rng, args.spaces, head, tail)
    langs = Counter(
        "cjk" if any("\u3040" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" for c in t)
        else "arabic/devanagari" if any("\u0600" <= c <= "\u097f" for c in t) else "latin"
        for _, t in subs
    )
    print(f"keywords by script: {dict(langs)}; sample: {[t for _, t in rng.sample(subs, 6)]}")
    print(f"sample titles: {rng.sample(titles, 3)}")
    print()
    bench_in_memory(subs, titles)
    if not args.no_db:
        asyncio.run(bench_sqlite(subs, titles))


if __name__ == "__main__":
    main()
