"""Cursor pagination over time-ordered ids: `{"data": [...], "next_cursor": ...}`."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import Select

from app.core.problems import invalid

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page; null on the last.")


class PageParams(BaseModel):
    limit: int
    after_id: str | None


def _decode(cursor: str) -> str:
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except Exception:
        raise invalid("query.cursor", "not a cursor this API returned") from None
    if not value.startswith("c1:") or "\x00" in value:  # PostgreSQL cannot compare text holding NUL
        raise invalid("query.cursor", "not a cursor this API returned")
    return value[3:]


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"c1:{last_id}".encode()).decode().rstrip("=")


async def page_params(  # async: a plain `def` dependency would run in FastAPI's thread pool
    limit: Annotated[int, Query(ge=1, le=100, description="Items per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> PageParams:
    return PageParams(limit=limit, after_id=_decode(cursor) if cursor else None)


PageDep = Annotated[PageParams, Depends(page_params)]


def paginate(stmt: Select[Any], id_column: Any, params: PageParams) -> Select[Any]:
    if params.after_id is not None:
        stmt = stmt.where(id_column > params.after_id)
    return stmt.order_by(id_column).limit(params.limit + 1)


def page_of(rows: list[Any], params: PageParams, to_item: Any, id_of: Any = lambda r: r.id) -> dict[str, Any]:
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    return {
        "data": [to_item(r) for r in rows],
        "next_cursor": encode_cursor(id_of(rows[-1])) if more and rows else None,
    }
