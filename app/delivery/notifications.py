"""Notifications API: what the outbox did for an account, each attempt, and replay of failures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.auth import API_DEPENDENCIES, AccountId
from app.core.deps import CtxDep, SessionDep
from app.core.events import EventType
from app.core.pagination import Page, PageDep, PageParams, page_of, paginate
from app.core.problems import PROBLEM_RESPONSES, ProblemError, not_found
from app.delivery.models import DeliveryAttempt, Notification
from app.delivery.outbox import ReminderOutbox, outbox_for, wake_dispatcher_after_commit

StateName = Literal["pending", "held", "sending", "delivered", "failed", "expired", "canceled"]
KindName = EventType | Literal["email.confirmation"]


class DeliveryAttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    started_at: datetime
    latency_ms: float | None
    outcome: str = Field(description="delivered, retry, failed or gone (HTTP 410).")
    status_code: int | None = Field(description="HTTP status, or the SMTP reply code.")
    error: str | None
    response_excerpt: str | None = Field(description="The first bytes of the response.")


class NotificationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Also the `webhook-id` header and the left part of the email Message-ID.")
    kind: str
    channel: Literal["webhook", "email"]
    state: str = Field(description="pending, held, sending, delivered, failed, expired or canceled.")
    state_reason: str | None
    late: bool = Field(description="Delivered more than a minute after its due time (e.g. after downtime).")
    subscription_id: str | None
    space_id: str | None
    space_revision: int
    lead_time_minutes: int
    webhook_endpoint_id: str | None
    email_recipient_id: str | None
    due_at: datetime
    next_attempt_at: datetime
    expires_at: datetime | None
    attempts: int
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime


class NotificationDetail(NotificationOut):
    delivery_attempts: list[DeliveryAttemptOut]


@dataclass
class NotificationFilter:
    state: str | None = None
    kind: str | None = None
    subscription_id: str | None = None
    space_id: str | None = None


async def list_notifications(
    session: AsyncSession, account_id: str, filters: NotificationFilter, page: PageParams
) -> list[Notification]:
    stmt = select(Notification).where(Notification.account_id == account_id)
    if filters.state:
        stmt = stmt.where(Notification.state == filters.state)
    if filters.kind:
        stmt = stmt.where(Notification.kind == filters.kind)
    if filters.subscription_id:
        stmt = stmt.where(Notification.subscription_id == filters.subscription_id)
    if filters.space_id:
        stmt = stmt.where(Notification.space_id == filters.space_id)
    return list(await session.scalars(paginate(stmt, Notification.id, page)))


async def get_notification(session: AsyncSession, account_id: str, notification_id: str) -> Notification:
    notification = await session.get(Notification, notification_id)
    if notification is None or notification.account_id != account_id:
        raise not_found("notification")
    return notification


async def attempts_of(session: AsyncSession, notification_id: str) -> list[DeliveryAttempt]:
    stmt = (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.notification_id == notification_id)
        .order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
    )
    return list(await session.scalars(stmt))


async def replay_notification(
    session: AsyncSession, outbox: ReminderOutbox, account_id: str, notification_id: str, now: datetime
) -> Notification:
    notification = await get_notification(session, account_id, notification_id)
    refusal = await outbox.replay(session, notification, now)
    if refusal is not None:
        raise ProblemError(409, "Cannot replay", refusal, slug="cannot-replay")
    return notification


def _detail(notification: Notification, attempts: list[DeliveryAttempt]) -> dict[str, Any]:
    out = NotificationOut.model_validate(notification).model_dump()
    out["delivery_attempts"] = [DeliveryAttemptOut.model_validate(a).model_dump() for a in attempts]
    return out


router = APIRouter(
    prefix="/v1/notifications", tags=["notifications"], responses=PROBLEM_RESPONSES,
    dependencies=API_DEPENDENCIES,  # the API key, then no NUL or lone surrogates in any input
)


@router.get("", response_model=Page[NotificationOut], summary="Notifications of this account, oldest first")
async def list_notifications_route(
    session: SessionDep,
    account_id: AccountId,
    page: PageDep,
    state: Annotated[StateName | None, Query()] = None,
    kind: Annotated[KindName | None, Query()] = None,
    subscription_id: Annotated[str | None, Query(max_length=40)] = None,
    space_id: Annotated[str | None, Query(max_length=16)] = None,
) -> Any:
    rows = await list_notifications(
        session, account_id, NotificationFilter(state, kind, subscription_id, space_id), page
    )
    return page_of(rows, page, lambda n: NotificationOut.model_validate(n).model_dump())


@router.get("/{notification_id}", response_model=NotificationDetail, summary="One notification and its attempts")
async def get_notification_route(notification_id: str, session: SessionDep, account_id: AccountId) -> Any:
    notification = await get_notification(session, account_id, notification_id)
    return _detail(notification, await attempts_of(session, notification.id))


@router.post(
    "/{notification_id}/replay",
    response_model=NotificationDetail,
    summary="Send a failed or expired notification again (same id, fresh attempt budget)",
)
async def replay_notification_route(
    notification_id: str, ctx: CtxDep, session: SessionDep, account_id: AccountId
) -> Any:
    notification = await replay_notification(session, outbox_for(ctx), account_id, notification_id, ctx.clock.now())
    wake_dispatcher_after_commit(session, ctx)
    return _detail(notification, await attempts_of(session, notification.id))
