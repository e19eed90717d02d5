"""Which stored Spaces an account may see: those one of its subscriptions matches, by creator, co-host
or keyword, with the same rules as the notifications (see app.subscriptions.matching)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.clock import utc
from app.core.pagination import PageParams, encode_cursor
from app.core.problems import invalid, not_found
from app.spaces.models import Creator, Space, SpaceEvent, SpaceState
from app.spaces.schemas import SPACE_URL, SpaceEventOut, SpaceOut
from app.subscriptions.matching import PHRASE, KeywordIndex, keyword_in_title
from app.subscriptions.models import Subscription, TargetKind, TargetStatus
from app.subscriptions.schemas import normalize_keyword

UPCOMING = (SpaceState.scheduled, SpaceState.live)
_SCAN = 500
_NARROW_BY_CREATOR = 1000  # above this many creator ids an IN list costs more than filtering here


class AccountMatcher:
    """An account's live subscriptions as lookups: creator id -> subs, co-host subs, a keyword automaton."""

    def __init__(self, subs: Iterable[Subscription], mode: str = PHRASE) -> None:
        self.by_creator: dict[str, list[str]] = defaultdict(list)
        self.by_host: dict[str, list[str]] = defaultdict(list)
        self.by_keyword: dict[str, list[str]] = defaultdict(list)
        for sub in subs:
            if sub.target_kind == TargetKind.creator and sub.creator_id:
                self.by_creator[sub.creator_id].append(sub.id)
                if sub.include_hosts:
                    self.by_host[sub.creator_id].append(sub.id)
            elif sub.target_kind == TargetKind.keyword and sub.keyword_normalized:
                self.by_keyword[sub.keyword_normalized].append(sub.id)
        self.keywords = KeywordIndex(self.by_keyword, mode)

    @property
    def empty(self) -> bool:
        return not (self.by_creator or self.by_keyword)

    @property
    def creators_only(self) -> bool:
        return not self.by_keyword and not self.by_host

    def matches(self, space: Space) -> list[str]:
        ids = list(self.by_creator.get(space.creator_id, ()))
        for host in space.host_ids or []:
            if host != space.creator_id:
                ids += self.by_host.get(host, ())
        for keyword in self.keywords.matches(space.title):
            ids += self.by_keyword[keyword]
        return sorted(set(ids))


async def account_matcher(session: AsyncSession, account_id: str, mode: str = PHRASE) -> AccountMatcher:
    subs = await session.scalars(
        select(Subscription).where(
            Subscription.account_id == account_id, Subscription.target_status == TargetStatus.active
        )
    )
    return AccountMatcher(subs)


@dataclass
class SpaceFilter:
    creator_id: str | None = None
    creator_username: str | None = None
    keyword: str | None = None
    state: str | None = None
    starts_after: datetime | None = None
    starts_before: datetime | None = None


def start_key(space: Space) -> datetime:
    """When a Space starts, or started, or (impromptu and unknown) was first seen: the list's order."""
    return space.scheduled_start or space.started_at or space.first_seen_at


_START = func.coalesce(Space.scheduled_start, Space.started_at, Space.first_seen_at)


def _cursor(space: Space) -> str:
    return encode_cursor(f"{start_key(space).isoformat()}|{space.id}")


def _after(value: str) -> tuple[datetime, str]:
    at, _, space_id = value.rpartition("|")
    try:
        return utc(datetime.fromisoformat(at)), space_id
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved to UTC
        raise invalid("query.cursor", "not a cursor this API returned") from None


async def list_spaces(
    session: AsyncSession, account_id: str, filters: SpaceFilter, page: PageParams, mode: str = PHRASE
) -> tuple[list[tuple[Space, list[str]]], str | None]:
    """A page of matching Spaces ordered by start time, and the cursor of the next page."""
    matcher = await account_matcher(session, account_id, mode)
    if matcher.empty:
        return [], None
    stmt = select(Space).where(Space.state == filters.state if filters.state else Space.state.in_(UPCOMING))
    if filters.creator_id:
        stmt = stmt.where(Space.creator_id == filters.creator_id)
    if filters.creator_username:
        ids = list(
            await session.scalars(
                select(Creator.id).where(Creator.username_lower == filters.creator_username.lower().lstrip("@"))
            )
        )
        if not ids:
            return [], None
        stmt = stmt.where(Space.creator_id.in_(ids))
    if matcher.creators_only and len(matcher.by_creator) <= _NARROW_BY_CREATOR:
        stmt = stmt.where(Space.creator_id.in_(sorted(matcher.by_creator)))
    if filters.starts_after:
        stmt = stmt.where(_START >= filters.starts_after)
    if filters.starts_before:
        stmt = stmt.where(_START < filters.starts_before)
    keyword = normalize_keyword(filters.keyword) if filters.keyword else None

    after = _after(page.after_id) if page.after_id else None
    found: list[tuple[Space, list[str]]] = []
    # Keyword matching is Unicode case folding, which SQL cannot do alike on both databases: scan in
    # start order and keep what matches until the page is full.
    while len(found) <= page.limit:
        batch_stmt = stmt
        if after is not None:
            batch_stmt = batch_stmt.where(or_(_START > after[0], and_(_START == after[0], Space.id > after[1])))
        batch = list(await session.scalars(batch_stmt.order_by(_START, Space.id).limit(_SCAN)))
        for space in batch:
            if keyword and not keyword_in_title(keyword, space.title, mode):
                continue
            matched = matcher.matches(space)
            if matched:
                found.append((space, matched))
                if len(found) > page.limit:
                    break
        if len(batch) < _SCAN:
            break
        after = (start_key(batch[-1]), batch[-1].id)
    more = len(found) > page.limit
    found = found[: page.limit]
    return found, _cursor(found[-1][0]) if more and found else None


async def get_visible_space(
    session: AsyncSession, account_id: str, space_id: str, mode: str = PHRASE
) -> tuple[Space, list[str]]:
    """The Space when one of the account's subscriptions matches it; 404 otherwise (existence is not leaked)."""
    space = await session.get(Space, space_id)
    if space is None:
        raise not_found("space")
    matched = (await account_matcher(session, account_id, mode)).matches(space)
    if not matched:
        raise not_found("space")
    return space, matched


async def list_events(session: AsyncSession, space_id: str, page: PageParams) -> list[SpaceEvent]:
    stmt = select(SpaceEvent).where(SpaceEvent.space_id == space_id)
    if page.after_id is not None:
        try:
            after_id = int(page.after_id)
        except ValueError:
            raise invalid("query.cursor", "not a cursor this API returned") from None
        if not 0 <= after_id < 2**63:  # beyond a BIGINT the drivers fail rather than compare
            raise invalid("query.cursor", "not a cursor this API returned")
        stmt = stmt.where(SpaceEvent.id > after_id)
    return list(await session.scalars(stmt.order_by(SpaceEvent.id).limit(page.limit + 1)))


async def usernames_of(session: AsyncSession, creator_ids: Sequence[str]) -> dict[str, str]:
    if not creator_ids:
        return {}
    rows = await session.execute(select(Creator.id, Creator.username).where(Creator.id.in_(sorted(set(creator_ids)))))
    return dict(rows.all())


def to_out(space: Space, matched: list[str], usernames: dict[str, str]) -> SpaceOut:
    return SpaceOut(
        id=space.id, title=space.title, state=space.state, scheduled_start=space.scheduled_start,
        started_at=space.started_at, ended_at=space.ended_at, creator_id=space.creator_id,
        creator_username=usernames.get(space.creator_id), lang=space.lang, host_ids=list(space.host_ids or []),
        url=SPACE_URL.format(id=space.id), revision=space.revision, first_seen_at=space.first_seen_at,
        last_seen_at=space.last_seen_at, matched_subscription_ids=matched,
    )


def event_out(event: SpaceEvent) -> SpaceEventOut:
    return SpaceEventOut(
        id=event.id, space_id=event.space_id, kind=event.kind, revision=event.revision,
        occurred_at=event.occurred_at, scheduled_start=event.scheduled_start,
        previous_scheduled_start=event.previous_scheduled_start,
    )
