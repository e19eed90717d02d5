"""Webhook endpoints and email recipients of an account."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.ids import new_id
from app.core.problems import ProblemError, not_found
from app.delivery.models import EmailRecipient, WebhookEndpoint


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def create_endpoint(
    session: AsyncSession, account_id: str, url: str, event_types: list[str], now: datetime, limit: int
) -> WebhookEndpoint:
    count = await session.scalar(select(func.count()).where(WebhookEndpoint.account_id == account_id))
    if (count or 0) >= limit:
        raise ProblemError(
            409, "Limit reached", f"an account may hold at most {limit} webhook endpoints", slug="limit-reached"
        )
    endpoint = WebhookEndpoint(
        id=new_id("we"), account_id=account_id, url=url, secret=new_webhook_secret(),
        event_types=event_types, enabled=True, created_at=now, updated_at=now,
    )
    session.add(endpoint)
    await session.flush()
    return endpoint


async def get_endpoint(session: AsyncSession, account_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.account_id != account_id:
        raise not_found("webhook endpoint")
    return endpoint


def enable_endpoint(endpoint: WebhookEndpoint, now: datetime) -> None:
    endpoint.enabled = True
    endpoint.disabled_reason = None
    endpoint.disabled_at = None
    endpoint.failing_since = None
    endpoint.throttled_until = None
    endpoint.updated_at = now


def normalize_address(address: str) -> str:
    local, _, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


async def get_or_create_recipient(
    session: AsyncSession, account_id: str, address: str, now: datetime, timezone: str | None = None
) -> EmailRecipient:
    address = normalize_address(address)
    recipient = await session.scalar(
        select(EmailRecipient).where(EmailRecipient.account_id == account_id, EmailRecipient.address == address)
    )
    if recipient is None:
        recipient = EmailRecipient(id=new_id("er"), account_id=account_id, address=address, created_at=now)
        session.add(recipient)
    if timezone:
        recipient.timezone = timezone
    await session.flush()
    return recipient
