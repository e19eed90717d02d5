from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from app.accounts.auth import API_DEPENDENCIES, AccountId
from app.core.clock import utc
from app.core.deps import CtxDep, SessionDep
from app.core.pagination import Page, PageDep, encode_cursor
from app.core.problems import PROBLEM_RESPONSES, invalid
from app.spaces import service
from app.spaces.schemas import SpaceEventOut, SpaceOut

router = APIRouter(
    prefix="/v1/spaces", tags=["spaces"], responses=PROBLEM_RESPONSES,
    dependencies=API_DEPENDENCIES,  # the API key, then no NUL or lone surrogates in any input
)

SpaceIdPath = Annotated[str, Path(pattern=r"^[a-zA-Z0-9]{1,13}$", description="X's Space id.")]


def _utc_param(name: str, value: datetime | None) -> datetime | None:
    try:
        return utc(value) if value else None
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past datetime.max in UTC
        raise invalid(f"query.{name}", "is out of the supported date range") from None


@router.get("", response_model=Page[SpaceOut], summary="Spaces your subscriptions match, by start time")
async def list_spaces(
    ctx: CtxDep,
    session: SessionDep,
    account_id: AccountId,
    page: PageDep,
    creator_id: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
    creator_username: Annotated[str | None, Query(pattern=r"^@?[A-Za-z0-9_]{1,15}$")] = None,
    keyword: Annotated[str | None, Query(min_length=1, max_length=512, description="Text in the title.")] = None,
    state: Annotated[
        Literal["scheduled", "live", "ended", "canceled"] | None,
        Query(description="Default: upcoming, i.e. scheduled and live."),
    ] = None,
    starts_after: Annotated[
        datetime | None, Query(description="Start (or, if impromptu, first seen) at or after.")
    ] = None,
    starts_before: Annotated[datetime | None, Query(description="Start before.")] = None,
) -> Any:
    after = _utc_param("starts_after", starts_after)
    before = _utc_param("starts_before", starts_before)
    if after and before and before <= after:
        raise invalid("query.starts_before", "must be later than starts_after")
    filters = service.SpaceFilter(creator_id, creator_username, keyword, state, after, before)
    found, next_cursor = await service.list_spaces(session, account_id, filters, page, ctx.settings.keyword_match)
    usernames = await service.usernames_of(session, [space.creator_id for space, _ in found])
    return {"data": [service.to_out(s, m, usernames) for s, m in found], "next_cursor": next_cursor}


@router.get("/{space_id}", response_model=SpaceOut, summary="One Space, if your subscriptions match it")
async def get_space(space_id: SpaceIdPath, ctx: CtxDep, session: SessionDep, account_id: AccountId) -> Any:
    space, matched = await service.get_visible_space(session, account_id, space_id, ctx.settings.keyword_match)
    return service.to_out(space, matched, await service.usernames_of(session, [space.creator_id]))


@router.get("/{space_id}/events", response_model=Page[SpaceEventOut], summary="What discovery saw change")
async def list_space_events(
    space_id: SpaceIdPath, ctx: CtxDep, session: SessionDep, account_id: AccountId, page: PageDep
) -> Any:
    await service.get_visible_space(session, account_id, space_id, ctx.settings.keyword_match)
    events = await service.list_events(session, space_id, page)
    more = len(events) > page.limit
    events = events[: page.limit]
    return {
        "data": [service.event_out(e) for e in events],
        "next_cursor": encode_cursor(str(events[-1].id)) if more and events else None,
    }
