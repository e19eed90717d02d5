from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from sqlalchemy import delete

from app.accounts.auth import API_DEPENDENCIES, AccountId
from app.core.deps import CtxDep, SessionDep
from app.core.idempotency import IdempotencyDep
from app.core.pagination import Page, PageDep, page_of
from app.core.problems import PROBLEM_RESPONSES
from app.core.responses import json_response
from app.core.secrets import link_signing_key
from app.delivery.consent import request_confirmation
from app.delivery.models import EmailRecipient
from app.delivery.outbox import Reason, outbox_for, wake_dispatcher_after_commit
from app.subscriptions import service
from app.subscriptions.models import Subscription
from app.subscriptions.schemas import SubscriptionCreate, SubscriptionOut, SubscriptionUpdate

router = APIRouter(
    prefix="/v1/subscriptions", tags=["subscriptions"], responses=PROBLEM_RESPONSES,
    dependencies=API_DEPENDENCIES,  # the API key, then no NUL or lone surrogates in any input
)


@router.post("", status_code=201, response_model=SubscriptionOut)
async def create_subscription(
    body: SubscriptionCreate, ctx: CtxDep, session: SessionDep, account_id: AccountId, idem: IdempotencyDep
) -> Any:
    if (replayed := await idem.replay()) is not None:
        return replayed
    now = ctx.clock.now()
    sub = await service.create_subscription(
        session, account_id, body, now, ctx.settings.max_subscriptions_per_account, outbox_for(ctx)
    )
    if sub.email_recipient_id is not None:
        recipient = await session.get(EmailRecipient, sub.email_recipient_id)
        assert recipient is not None
        await request_confirmation(session, recipient, now, ctx.settings, await link_signing_key(ctx))
    wake_dispatcher_after_commit(session, ctx)
    out = service.to_out(sub, await service.recipients_by_id(session, [sub]))
    return await idem.respond(201, out)


@router.get("", response_model=Page[SubscriptionOut])
async def list_subscriptions(
    session: SessionDep,
    account_id: AccountId,
    page: PageDep,
    target_kind: Annotated[Literal["creator", "keyword"] | None, Query()] = None,
    creator_id: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
    creator_username: Annotated[str | None, Query(pattern=r"^@?[A-Za-z0-9_]{1,15}$")] = None,
    keyword: Annotated[str | None, Query(min_length=1, max_length=512)] = None,
    webhook_endpoint_id: Annotated[str | None, Query(max_length=40)] = None,
    paused: bool | None = None,
) -> Any:
    filters = service.SubscriptionFilter(target_kind, creator_id, creator_username, keyword, webhook_endpoint_id, paused)
    documents = await service.list_subscriptions(session, account_id, filters, page)
    return json_response(page_of(documents, page, lambda d: d, id_of=lambda d: d["id"]))


@router.get("/{subscription_id}", response_model=SubscriptionOut)
async def get_subscription(subscription_id: str, session: SessionDep, account_id: AccountId) -> Any:
    sub = await service.get_subscription(session, account_id, subscription_id)
    return json_response(service.to_out(sub, await service.recipients_by_id(session, [sub])))


@router.patch("/{subscription_id}", response_model=SubscriptionOut)
async def update_subscription(
    subscription_id: str, body: SubscriptionUpdate, ctx: CtxDep, session: SessionDep, account_id: AccountId
) -> Any:
    sub = await service.get_subscription(session, account_id, subscription_id)
    now = ctx.clock.now()
    service.apply_update(sub, body, now)
    await session.flush()
    await outbox_for(ctx).plan_subscription(session, sub, now)
    wake_dispatcher_after_commit(session, ctx)
    return json_response(service.to_out(sub, await service.recipients_by_id(session, [sub])))


@router.delete("/{subscription_id}", status_code=204)
async def delete_subscription(
    subscription_id: str, ctx: CtxDep, session: SessionDep, account_id: AccountId
) -> Response:
    sub = await service.get_subscription(session, account_id, subscription_id)
    await outbox_for(ctx).cancel_subscription(session, sub.id, ctx.clock.now(), Reason.deleted)
    await session.execute(delete(Subscription).where(Subscription.id == sub.id))
    return Response(status_code=204)
