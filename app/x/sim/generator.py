"""Seedable generator of realistic creators and Spaces for the simulator and demos.

The same seed and the same `now` give the same world, so demos and tests are repeatable.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta

MAX_SCHEDULE_AHEAD = timedelta(days=14)  # X lets hosts schedule up to 14 days ahead
_SPACE_ID_ALPHABET = string.ascii_letters + string.digits
_EMOJI = ["🎙️", "🚀", "🔥", "☕", "🎧", "💬", "🌍", "✨", "📚", "⚽", "🎮", "🤖", "🌸", "💡", "🎶", "📈"]


@dataclass(frozen=True)
class LanguagePack:
    names: list[str]
    handles: list[str]
    topics: list[str]
    templates: list[str]


LANGUAGES: dict[str, LanguagePack] = {
    "en": LanguagePack(
        names=["Alex Rivera", "Jen Park", "Sam O'Neil", "Priya Nair", "Marcus Lee", "Dev Weekly"],
        handles=["alex", "jenpark", "samtalks", "priya", "marcus", "devweekly", "buildinpublic"],
        topics=["Python", "indie games", "startup funding", "NBA playoffs", "AI art", "book club", "Web3"],
        templates=[
            "{topic} AMA {emoji}",
            "Weekly {topic} hangout {emoji}",
            "Let's talk {topic}! {emoji}",
            "{topic} news roundup",
            "Building in public: {topic} {emoji}",
        ],
    ),
    "es": LanguagePack(
        names=["María José", "Carlos Núñez", "Lucía Peña", "Andrés Muñoz"],
        handles=["mariajose", "carlosn", "luciap", "andresm", "charlas"],
        topics=["fútbol", "emprendimiento", "música latina", "tecnología", "inteligencia artificial"],
        templates=["Charla sobre {topic} {emoji}", "Hablemos de {topic}", "{topic}: preguntas y respuestas {emoji}"],
    ),
    "ja": LanguagePack(
        names=["さくら🌸", "田中 太郎", "ゆうき", "山田花子"],
        handles=["sakura", "tanaka", "yuuki", "hanako", "nihongo"],
        topics=["アニメ", "プログラミング", "ゲーム", "音楽", "投資"],
        templates=["{topic}について話そう{emoji}", "{topic}雑談スペース", "【{topic}】みんなで語る会 {emoji}"],
    ),
    "pt": LanguagePack(
        names=["João Silva", "Ana Luísa", "Thiago Araújo", "Beatriz Conceição"],
        handles=["joaosilva", "analuisa", "thiago", "bia", "papo"],
        topics=["futebol", "tecnologia", "empreendedorismo", "música", "criptomoedas"],
        templates=[
            "Papo sobre {topic} {emoji}",
            "Live de {topic}: tire suas dúvidas",
            "Vamos falar de {topic}? {emoji}",
        ],
    ),
    "ar": LanguagePack(
        names=["محمد العلي", "سارة", "عمر خالد", "ليلى"],
        handles=["mohammed", "sara", "omarkh", "layla", "majlis"],
        topics=["التقنية", "كرة القدم", "الذكاء الاصطناعي", "ريادة الأعمال", "الشعر"],
        templates=["حديث عن {topic} {emoji}", "مساحة {topic} الأسبوعية", "لنتحدث عن {topic}"],
    ),
    "hi": LanguagePack(
        names=["प्रिया शर्मा", "Rahul Verma", "अमित", "Sneha Iyer"],
        handles=["priyas", "rahulv", "amit", "sneha", "charcha"],
        topics=["क्रिकेट", "तकनीक", "स्टार्टअप", "बॉलीवुड", "शिक्षा"],
        templates=["{topic} पर चर्चा {emoji}", "आइए बात करें {topic} के बारे में", "{topic} सवाल-जवाब {emoji}"],
    ),
    "fr": LanguagePack(
        names=["Élodie Martin", "Jérôme", "Chloé Dubois", "François Lefèvre"],
        handles=["elodie", "jerome", "chloe", "francois", "causerie"],
        topics=["l'IA", "le football", "la musique", "l'entrepreneuriat", "les jeux vidéo"],
        templates=["Discussion sur {topic} {emoji}", "Parlons de {topic} !", "{topic} : questions-réponses {emoji}"],
    ),
    "de": LanguagePack(
        names=["Jürgen Weiß", "Anna Müller", "Lena Schröder", "Tobias Groß"],
        handles=["juergen", "annam", "lena", "tobias", "plauderei"],
        topics=["Fußball", "Technik", "KI", "Start-ups", "Musik"],
        templates=["Gespräch über {topic} {emoji}", "{topic}-Stammtisch", "Lasst uns über {topic} reden {emoji}"],
    ),
    "ko": LanguagePack(
        names=["김민준", "이서연", "박지훈"],
        handles=["minjun", "seoyeon", "jihoon", "suda"],
        topics=["K-pop", "게임", "개발", "주식"],
        templates=["{topic} 이야기 {emoji}", "{topic} 수다방", "함께하는 {topic} 토크 {emoji}"],
    ),
}


@dataclass(frozen=True)
class GeneratedCreator:
    id: str
    username: str
    name: str
    lang: str


@dataclass(frozen=True)
class GeneratedSpace:
    id: str
    creator_id: str
    title: str
    lang: str
    state: str  # scheduled or live
    created_at: datetime
    scheduled_start: datetime | None
    started_at: datetime | None
    host_ids: list[str] = field(default_factory=list)
    is_ticketed: bool = False
    participant_count: int = 0


@dataclass(frozen=True)
class GeneratedWorld:
    creators: list[GeneratedCreator]
    spaces: list[GeneratedSpace]


class SpaceGenerator:
    def __init__(self, seed: int | None = None) -> None:
        self.random = random.Random(seed)
        self._user_ids: set[str] = set()
        self._usernames: set[str] = set()
        self._space_ids: set[str] = set()

    def user_id(self) -> str:
        """Old accounts have short numeric ids, newer ones 19-digit snowflakes."""
        while True:
            if self.random.random() < 0.3:
                user_id = str(self.random.randint(10**5, 10**10 - 1))
            else:
                user_id = str(self.random.randint(10**18, 19 * 10**17))
            if user_id not in self._user_ids:
                self._user_ids.add(user_id)
                return user_id

    def username(self, lang: str) -> str:
        handles = LANGUAGES[lang].handles
        while True:
            stem = self.random.choice(handles)
            suffix = self.random.choice(["", "_", "x", ""]) + str(self.random.randint(0, 9999))
            username = (stem + suffix)[:15]
            if username.lower() not in self._usernames:
                self._usernames.add(username.lower())
                return username

    def space_id(self) -> str:
        """13 letters and digits; real ids start with 1 (e.g. 1DXxyRYNejbKM)."""
        while True:
            space_id = "1" + "".join(self.random.choices(_SPACE_ID_ALPHABET, k=12))
            if space_id not in self._space_ids:
                self._space_ids.add(space_id)
                return space_id

    def creator(self, lang: str | None = None) -> GeneratedCreator:
        lang = lang or self.random.choice(sorted(LANGUAGES))
        return GeneratedCreator(self.user_id(), self.username(lang), self.random.choice(LANGUAGES[lang].names), lang)

    def title(self, lang: str) -> str:
        pack = LANGUAGES[lang]
        template = self.random.choice(pack.templates)
        return template.format(topic=self.random.choice(pack.topics), emoji=self.random.choice(_EMOJI)).strip()

    def space(
        self,
        creator: GeneratedCreator,
        now: datetime,
        *,
        horizon: timedelta = MAX_SCHEDULE_AHEAD,
        starts_within: timedelta | None = None,
        live: bool = False,
        co_hosts: list[str] | None = None,
    ) -> GeneratedSpace:
        """A scheduled Space up to `horizon` ahead (on a quarter hour), or within `starts_within`
        (to the second, for demos), or one that is live now."""
        now = now.replace(microsecond=0)
        created_at = now - timedelta(seconds=self.random.randint(60, 3 * 86400))
        scheduled_start: datetime | None
        started_at: datetime | None = None
        participants = 0
        if live:
            started_at = now - timedelta(seconds=self.random.randint(60, 90 * 60))
            created_at = min(created_at, started_at)
            # Half of live Spaces were scheduled first; the others started on the spot.
            scheduled_start = (
                started_at - timedelta(minutes=self.random.randint(0, 5)) if self.random.random() < 0.5 else None
            )
            participants = self.random.randint(1, 5000)
        elif starts_within is not None:
            seconds = max(60, int(starts_within.total_seconds()))
            scheduled_start = now + timedelta(seconds=self.random.randint(60, seconds))
        else:
            scheduled_start = self._quarter_hour_within(now, horizon)
        return GeneratedSpace(
            id=self.space_id(),
            creator_id=creator.id,
            title=self.title(creator.lang),
            lang=creator.lang,
            state="live" if live else "scheduled",
            created_at=created_at,
            scheduled_start=scheduled_start,
            started_at=started_at,
            host_ids=[creator.id, *(co_hosts or [])],
            is_ticketed=self.random.random() < 0.03,
            participant_count=participants,
        )

    def world(
        self,
        now: datetime,
        *,
        creators: int = 10,
        spaces_per_creator: int = 3,
        horizon: timedelta = MAX_SCHEDULE_AHEAD,
        soon: int = 0,
        soon_within_minutes: float = 30.0,
        live_fraction: float = 0.1,
        taken_user_ids: set[str] | None = None,
        taken_usernames: set[str] | None = None,
        taken_space_ids: set[str] | None = None,
    ) -> GeneratedWorld:
        """`creators` creators with `spaces_per_creator` Spaces each; the first `soon` of them start
        within `soon_within_minutes`, about `live_fraction` of the rest are live now."""
        self._user_ids |= taken_user_ids or set()
        self._usernames |= taken_usernames or set()
        self._space_ids |= taken_space_ids or set()
        people = [self.creator() for _ in range(creators)]
        spaces: list[GeneratedSpace] = []
        soon_left = soon
        for person in people:
            for _ in range(spaces_per_creator):
                co_hosts = self._co_hosts(person, people)
                if soon_left > 0:
                    soon_left -= 1
                    window = timedelta(minutes=soon_within_minutes)
                    spaces.append(self.space(person, now, starts_within=window, co_hosts=co_hosts))
                else:
                    live = self.random.random() < live_fraction
                    spaces.append(self.space(person, now, horizon=horizon, live=live, co_hosts=co_hosts))
        return GeneratedWorld(people, spaces)

    def _co_hosts(self, person: GeneratedCreator, people: list[GeneratedCreator]) -> list[str]:
        others = [p.id for p in people if p.id != person.id]
        if not others or self.random.random() > 0.25:
            return []
        return self.random.sample(others, k=min(len(others), self.random.randint(1, 2)))

    def _quarter_hour_within(self, now: datetime, horizon: timedelta) -> datetime:
        latest = now + min(horizon, MAX_SCHEDULE_AHEAD)
        start = now + timedelta(seconds=self.random.randint(15 * 60, max(15 * 60, int(horizon.total_seconds()))))
        start = start.replace(minute=start.minute - start.minute % 15, second=0)
        if start <= now:
            start += timedelta(minutes=15)
        return min(start, latest)
