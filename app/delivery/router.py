from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import delete, select

from app.accounts.auth import API_DEPENDENCIES, AccountId
from app.core.deps import CtxDep, SessionDep
from app.core.idempotency import IdempotencyDep
from app.core.pagination import Page, PageDep, page_of, paginate
from app.core.problems import PROBLEM_RESPONSES, ProblemError
from app.delivery import service
from app.delivery.egress import EgressPolicyError, check_webhook_url_async
from app.delivery.models import WebhookEndpoint
from app.delivery.schemas import (
    WebhookEndpointCreate,
    WebhookEndpointOut,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
)

router = APIRouter(
    prefix="/v1/webhook-endpoints", tags=["webhook endpoints"], responses=PROBLEM_RESPONSES,
    dependencies=API_DEPENDENCIES,  # the API key, then no NUL or lone surrogates in any input
)


def _out(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    model = WebhookEndpointWithSecret if with_secret else WebhookEndpointOut
    # JSON mode: the POST answer goes out through idem.respond, not the response model, and must
    # spell its datetimes as GET does ("…Z", not "…+00:00").
    return model.model_validate(endpoint, from_attributes=True).model_dump(mode="json")


@router.post("", status_code=201, response_model=WebhookEndpointWithSecret)
async def create_webhook_endpoint(
    body: WebhookEndpointCreate, ctx: CtxDep, session: SessionDep, account_id: AccountId, idem: IdempotencyDep
) -> Any:
    if (replayed := await idem.replay()) is not None:
        return replayed
    url = str(body.url)
    try:
        await check_webhook_url_async(
            url, allow_http=ctx.settings.webhook_allow_http, allowed_networks=ctx.settings.allowed_networks
        )
    except EgressPolicyError as exc:
        raise ProblemError(422, "Webhook URL refused", str(exc), slug="egress-policy", field="body.url") from None
    endpoint = await service.create_endpoint(
        session, account_id, url, list(body.event_types), ctx.clock.now(),
        ctx.settings.max_webhook_endpoints_per_account,
    )
    return await idem.respond(201, _out(endpoint, with_secret=True))


@router.get("", response_model=Page[WebhookEndpointOut])
async def list_webhook_endpoints(session: SessionDep, account_id: AccountId, page: PageDep) -> Any:
    stmt = paginate(select(WebhookEndpoint).where(WebhookEndpoint.account_id == account_id), WebhookEndpoint.id, page)
    return page_of(list(await session.scalars(stmt)), page, _out)


@router.get("/{endpoint_id}", response_model=WebhookEndpointOut)
async def get_webhook_endpoint(endpoint_id: str, session: SessionDep, account_id: AccountId) -> Any:
    return _out(await service.get_endpoint(session, account_id, endpoint_id))


@router.patch("/{endpoint_id}", response_model=WebhookEndpointOut)
async def update_webhook_endpoint(
    endpoint_id: str, body: WebhookEndpointUpdate, ctx: CtxDep, session: SessionDep, account_id: AccountId
) -> Any:
    endpoint = await service.get_endpoint(session, account_id, endpoint_id)
    now = ctx.clock.now()
    if body.event_types is not None:
        endpoint.event_types = list(body.event_types)
    if body.enabled is True:
        service.enable_endpoint(endpoint, now)
    elif body.enabled is False:
        endpoint.enabled = False
        endpoint.disabled_reason = "disabled through the API"
        endpoint.disabled_at = now
    endpoint.updated_at = now
    return _out(endpoint)


@router.post("/{endpoint_id}/rotate-secret", response_model=WebhookEndpointWithSecret)
async def rotate_webhook_secret(endpoint_id: str, ctx: CtxDep, session: SessionDep, account_id: AccountId) -> Any:
    endpoint = await service.get_endpoint(session, account_id, endpoint_id)
    endpoint.secret = service.new_webhook_secret()
    endpoint.updated_at = ctx.clock.now()
    return _out(endpoint, with_secret=True)


@router.post("/{endpoint_id}/enable", response_model=WebhookEndpointOut)
async def enable_webhook_endpoint(endpoint_id: str, ctx: CtxDep, session: SessionDep, account_id: AccountId) -> Any:
    endpoint = await service.get_endpoint(session, account_id, endpoint_id)
    service.enable_endpoint(endpoint, ctx.clock.now())
    return _out(endpoint)


@router.delete("/{endpoint_id}", status_code=204)
async def delete_webhook_endpoint(endpoint_id: str, session: SessionDep, account_id: AccountId) -> Response:
    endpoint = await service.get_endpoint(session, account_id, endpoint_id)
    await session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id))
    return Response(status_code=204)
