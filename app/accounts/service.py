"""Accounts and their API keys: `sb_<prefix>_<secret>`, the secret stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.models import Account, ApiKey
from app.core.ids import new_id

KEY_SCHEME = "sb"


@dataclass(frozen=True)
class IssuedKey:
    account_id: str
    key_id: str
    prefix: str
    api_key: str  # shown once


def _hash(secret: str) -> str:
    # API key secrets carry 190 random bits, so a fast hash is enough; what matters is not storing them.
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(api_key: str) -> tuple[str, str] | None:
    parts = api_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


async def create_account(session: AsyncSession, name: str, now: datetime) -> IssuedKey:
    account = Account(id=new_id("acc"), name=name, created_at=now)
    session.add(account)
    await session.flush()
    return await issue_key(session, account.id, now)


async def issue_key(session: AsyncSession, account_id: str, now: datetime) -> IssuedKey:
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"), account_id=account_id, prefix=prefix, secret_hash=_hash(secret), created_at=now
    )
    session.add(key)
    await session.flush()
    return IssuedKey(account_id, key.id, prefix, f"{KEY_SCHEME}_{prefix}_{secret}")


async def authenticate(session: AsyncSession, api_key: str) -> ApiKey | None:
    """The live key for `api_key`, compared in constant time; None when unknown or revoked."""
    split = _split(api_key)
    if split is None:
        return None
    prefix, secret = split
    key = await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_hash, _hash(secret)):
        return None
    return key


async def revoke_key(session: AsyncSession, key_or_prefix: str, now: datetime) -> int:
    """Revoke by key id, by prefix, or by the full key. Returns how many keys were revoked."""
    split = _split(key_or_prefix)
    prefix = split[0] if split else key_or_prefix
    result = await session.execute(
        update(ApiKey)
        .where((ApiKey.id == key_or_prefix) | (ApiKey.prefix == prefix), ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount or 0
