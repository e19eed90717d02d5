"""Opaque, signed, unguessable tokens for the links in mail (confirm an address, unsubscribe)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

_SIG_BYTES = 20


@dataclass(frozen=True)
class LinkClaim:
    purpose: str  # "confirm" or "unsubscribe"
    recipient_id: str
    scope: str  # a subscription id, or "all" for everything this account sends to the address


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(key: bytes, claim: LinkClaim) -> str:
    body = f"{claim.purpose}|{claim.recipient_id}|{claim.scope}".encode()
    signature = hmac.new(key, body, hashlib.sha256).digest()[:_SIG_BYTES]
    return f"{_b64(body)}.{_b64(signature)}"


def verify_link(key: bytes, token: str, purpose: str) -> LinkClaim | None:
    try:
        body_text, signature_text = token.split(".", 1)
        body, signature = _unb64(body_text), _unb64(signature_text)
        expected = hmac.new(key, body, hashlib.sha256).digest()[:_SIG_BYTES]
        if not hmac.compare_digest(signature, expected):
            return None
        found_purpose, recipient_id, scope = body.decode().split("|")
    except (ValueError, UnicodeDecodeError):
        return None
    if found_purpose != purpose:
        return None
    return LinkClaim(found_purpose, recipient_id, scope)
