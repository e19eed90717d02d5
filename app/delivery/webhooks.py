"""Standard Webhooks sender on aiohttp: one pooled session, signed POSTs, outcomes the dispatcher acts on.

Status semantics follow the Standard Webhooks spec: 2xx delivered; 3xx a failure (redirects are
never followed); 410 disables the endpoint; 429/502/503/504 and any Retry-After throttle it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets as secrets_module
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from functools import lru_cache
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from standardwebhooks.webhooks import EmptyWebhookSecretError
from yarl import URL

from app.delivery import metrics
from app.delivery.egress import (
    EgressPolicyError,
    NetworkLike,
    PolicyResolver,
    check_webhook_url,
    parse_networks,
)

if TYPE_CHECKING:
    from app.core.settings import Settings

log = logging.getLogger(__name__)

RETRYABLE_4XX = frozenset({408, 409, 425, 429})
THROTTLE_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 86400.0
_DRAIN_LIMIT_BYTES = 65536  # read and discard this much more so the connection can be reused
_MSG_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_SECRET_PREFIX = "whsec_"
_TARGET_CACHE_SIZE = 4096


class WebhookOutcome(StrEnum):
    delivered = "delivered"
    retry = "retry"
    failed = "failed"
    gone = "gone"


@dataclass(frozen=True, slots=True)
class WebhookResult:
    outcome: WebhookOutcome
    status_code: int | None
    latency_ms: float
    error: str | None = None
    response_excerpt: str | None = None
    retry_after_seconds: float | None = None  # slow this endpoint down at least this long
    disable_endpoint: bool = False  # the receiver asked us to stop (410 Gone)

    @property
    def delivered(self) -> bool:
        return self.outcome is WebhookOutcome.delivered


def generate_webhook_secret(nbytes: int = 32) -> str:
    """A new `whsec_` secret (24–64 random bytes per the spec)."""
    if not 24 <= nbytes <= 64:
        raise ValueError("a webhook secret has 24 to 64 bytes")
    return "whsec_" + base64.b64encode(secrets_module.token_bytes(nbytes)).decode()


def build_webhook_body(type: str, timestamp: datetime, data: dict[str, Any]) -> bytes:  # noqa: A002
    """The compact JSON body `{"type", "timestamp", "data"}`; timestamp is ISO 8601 UTC with `Z`."""
    return json.dumps(
        {"type": type, "timestamp": format_utc(timestamp), "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
        default=_json_default,
    ).encode()


def format_utc(moment: datetime) -> str:
    """2026-01-06T18:00:00.123Z (milliseconds only when present)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return format_utc(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret, decoded exactly as `standardwebhooks.Webhook` decodes it
    (prefix optional, padding optional); raises ValueError or EmptyWebhookSecretError like it."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX) + "==")
    if not key:
        raise EmptyWebhookSecretError("webhook secret may not be empty")
    return key


class WebhookSigner:
    """`standardwebhooks.Webhook(secret).sign(...)`, with the HMAC keyed once: each signature copies
    the keyed state instead of hashing the key again (tests prove the two give the same values)."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: str) -> None:
        self._keyed = hmac.new(secret_key(secret), digestmod=hashlib.sha256)

    def sign(self, msg_id: str, timestamp: str, body: bytes) -> str:
        """`timestamp` is the `webhook-timestamp` header value (whole seconds since the epoch)."""
        mac = self._keyed.copy()
        mac.update(f"{msg_id}.{timestamp}.".encode())
        mac.update(body)
        return "v1," + base64.b64encode(mac.digest()).decode()


@lru_cache(maxsize=4096)
def _signer(secret: str) -> WebhookSigner:
    # Endpoints are few, sends are many: decode and key each secret once.
    return WebhookSigner(secret)


def _unix_seconds(timestamp: datetime) -> str:
    """The `webhook-timestamp` value; a naive time counts as UTC (as standardwebhooks does)."""
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return str(math.floor(timestamp.timestamp()))


def _signature(secret: str | Sequence[str], msg_id: str, stamp: str, body: bytes) -> str:
    if isinstance(secret, str):
        return _signer(secret).sign(msg_id, stamp, body)
    return " ".join(_signer(s).sign(msg_id, stamp, body) for s in secret)


def sign_webhook(secret: str | Sequence[str], msg_id: str, timestamp: datetime, body: bytes) -> str:
    """The `webhook-signature` value; several secrets (during rotation) give space-separated signatures."""
    return _signature(secret, msg_id, _unix_seconds(timestamp), body)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP-date relative to `now`), clamped to [0, 1 day]."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _reference_time(response: aiohttp.ClientResponse, fallback: datetime) -> datetime:
    """An HTTP-date Retry-After is relative to the server's clock, so prefer its Date header."""
    date = response.headers.get("Date")
    if date:
        try:
            parsed = parsedate_to_datetime(date)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except (TypeError, ValueError, IndexError):
            pass
    return fallback


def classify_status(status: int) -> WebhookOutcome:
    if 200 <= status < 300:
        return WebhookOutcome.delivered
    if status == 410:
        return WebhookOutcome.gone
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return WebhookOutcome.failed
    return WebhookOutcome.retry  # 3xx, 408/409/425/429, 5xx, anything unexpected


class WebhookSender:
    """Sends signed webhooks over one pooled aiohttp session; use `async with` or start()/close()."""

    def __init__(
        self,
        *,
        timeout_seconds: float = 15.0,
        max_in_flight: int = 64,
        max_response_bytes: int = 4096,
        allow_http: bool = False,
        allowed_networks: Sequence[NetworkLike] = (),
        user_agent: str = "Spacebell/0.1",
        default_throttle_seconds: float = 30.0,
        keepalive_seconds: float = 30.0,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`resolver` is the DNS resolver wrapped by the egress policy (aiohttp's default when None);
        `ssl_context` overrides certificate verification settings (tests with a private CA)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.timeout_seconds = timeout_seconds
        self.max_in_flight = max_in_flight
        self.max_response_bytes = max(0, max_response_bytes)
        self.allow_http = allow_http
        self.allowed_networks = parse_networks(allowed_networks)
        self.user_agent = user_agent
        self.default_throttle_seconds = default_throttle_seconds
        self._keepalive_seconds = keepalive_seconds
        self._inner_resolver = resolver
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._headers: CIMultiDict[str] = CIMultiDict({"content-type": "application/json"})
        # URL string -> the URL to post to, or why the egress policy refuses it (see _check_target).
        self._targets: dict[str, URL | EgressPolicyError] = {}
        self._target_policy: tuple[bool, tuple[Any, ...]] = (self.allow_http, self.allowed_networks)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WebhookSender:
        options: dict[str, Any] = {
            "timeout_seconds": settings.webhook_timeout_seconds,
            "max_in_flight": settings.dispatcher_concurrency,
            "max_response_bytes": settings.webhook_max_response_bytes,
            "allow_http": settings.webhook_allow_http,
            "allowed_networks": settings.allowed_networks,
        }
        return cls(**(options | overrides))

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.max_in_flight,
            limit_per_host=0,
            resolver=PolicyResolver(self.allowed_networks, inner=self._inner_resolver),
            keepalive_timeout=self._keepalive_seconds,
            ssl=self._ssl_context if self._ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),  # no cookies carried from one endpoint to another
            trust_env=False,  # never pick up a proxy from the environment by accident
            headers={"User-Agent": self.user_agent},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> WebhookSender:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def send(
        self,
        url: str,
        secret: str | Sequence[str],
        *,
        msg_id: str,
        body: bytes,
        timestamp: datetime,
    ) -> WebhookResult:
        """POST one signed message; never raises for delivery problems, only for programming errors.

        `msg_id` is the notification id (the same on every retry); `timestamp` is this attempt's time.
        """
        if self._session is None:
            raise RuntimeError("WebhookSender.start() must be awaited before send()")
        if not _MSG_ID.match(msg_id):
            raise ValueError("msg_id must be 1-128 characters of [A-Za-z0-9_-]")
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=UTC)  # the signature treats naive times as UTC too
        in_flight = metrics.webhooks_in_flight
        async with self._slots:
            in_flight.count += 1
            try:
                result = await self._attempt(url, secret, msg_id, body, timestamp)
            finally:
                in_flight.count -= 1
        metrics.record_webhook_attempt(result.outcome, result.latency_ms)
        if result.outcome is not WebhookOutcome.delivered:
            # The host only: webhook URLs often carry tokens in their path or query.
            log.info("webhook %s to host %s: %s (%s)", msg_id, _host_of(url), result.outcome, result.error)
        return result

    def _check_target(self, url: str) -> URL:
        """The registration rules again before a send, because IP literals never reach the resolver
        (aiohttp connects to them directly); host names are checked again by `PolicyResolver` on
        every connection. The verdict only depends on the URL string and this sender's
        `allow_http` and `allowed_networks`, so it is cached per URL (and dropped if those change)."""
        policy = (self.allow_http, self.allowed_networks)
        if policy != self._target_policy:
            self._targets.clear()
            self._target_policy = policy
        verdict = self._targets.get(url)
        if verdict is None:
            try:
                check_webhook_url(url, allow_http=self.allow_http, allowed_networks=self.allowed_networks)
                verdict = URL(url)
            except EgressPolicyError as exc:
                verdict = exc
            if len(self._targets) >= _TARGET_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = verdict
        if isinstance(verdict, EgressPolicyError):
            raise EgressPolicyError(verdict.reason)
        return verdict

    async def _attempt(
        self, url: str, secret: str | Sequence[str], msg_id: str, body: bytes, timestamp: datetime
    ) -> WebhookResult:
        assert self._session is not None
        started = time.perf_counter()
        try:
            target = self._check_target(url)
        except EgressPolicyError as exc:
            return WebhookResult(WebhookOutcome.failed, None, _ms_since(started), error=exc.reason)

        stamp = _unix_seconds(timestamp)
        try:
            signature = _signature(secret, msg_id, stamp, body)
        except (ValueError, EmptyWebhookSecretError):  # binascii.Error is a ValueError
            return WebhookResult(
                WebhookOutcome.failed, None, _ms_since(started), error="the endpoint's webhook secret is invalid"
            )
        headers = CIMultiDict(self._headers)
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = stamp
        headers["webhook-signature"] = signature
        try:
            try:
                return await self._post(target, body, headers, started, timestamp)
            except aiohttp.ServerDisconnectedError:
                # Most often a pooled keep-alive connection the server closed as we reused it;
                # one immediate try on another connection (receivers dedupe on webhook-id).
                return await self._post(target, body, headers, started, timestamp)
        except EgressPolicyError as exc:
            return WebhookResult(WebhookOutcome.failed, None, _ms_since(started), error=exc.reason)
        except TimeoutError:
            return WebhookResult(
                WebhookOutcome.retry, None, _ms_since(started), error=f"timed out after {self.timeout_seconds:g}s"
            )
        except aiohttp.ClientConnectorDNSError as exc:
            return WebhookResult(WebhookOutcome.retry, None, _ms_since(started), error=f"DNS lookup failed: {exc}")
        except aiohttp.ClientConnectorCertificateError as exc:
            return WebhookResult(
                WebhookOutcome.retry, None, _ms_since(started),
                error=f"TLS certificate rejected: {exc.certificate_error}",
            )
        except aiohttp.ClientSSLError as exc:
            return WebhookResult(WebhookOutcome.retry, None, _ms_since(started), error=f"TLS error: {exc}")
        except aiohttp.InvalidURL as exc:
            return WebhookResult(WebhookOutcome.failed, None, _ms_since(started), error=f"invalid webhook URL: {exc}")
        except aiohttp.ClientConnectionError as exc:
            return WebhookResult(
                WebhookOutcome.retry, None, _ms_since(started), error=f"connection failed: {exc or type(exc).__name__}"
            )
        except aiohttp.ClientError as exc:
            return WebhookResult(
                WebhookOutcome.retry, None, _ms_since(started), error=f"HTTP error: {exc or type(exc).__name__}"
            )

    async def _post(
        self,
        target: URL,
        body: bytes,
        headers: CIMultiDict[str],
        started: float,
        timestamp: datetime,
    ) -> WebhookResult:
        assert self._session is not None
        async with self._session.post(target, data=body, headers=headers, allow_redirects=False) as response:
            excerpt = await self._read_excerpt(response)
            return self._result_for_response(response, response.status, excerpt, _ms_since(started), timestamp)

    async def _read_excerpt(self, response: aiohttp.ClientResponse) -> str | None:
        """At most max_response_bytes of the body; a body that fails to arrive is not an outcome."""
        try:
            excerpt = await _read_up_to(response.content, self.max_response_bytes)
            if not response.content.at_eof():
                await _read_up_to(response.content, _DRAIN_LIMIT_BYTES)
        except (TimeoutError, aiohttp.ClientError):
            return None
        return excerpt.decode("utf-8", errors="replace") if excerpt else None

    def _result_for_response(
        self,
        response: aiohttp.ClientResponse,
        status: int,
        excerpt: str | None,
        latency_ms: float,
        timestamp: datetime,
    ) -> WebhookResult:
        outcome = classify_status(status)
        if outcome is WebhookOutcome.delivered:
            return WebhookResult(outcome, status, latency_ms, response_excerpt=excerpt)
        if outcome is WebhookOutcome.gone:
            return WebhookResult(
                outcome,
                status,
                latency_ms,
                error="HTTP 410 Gone: the receiver asked to disable this endpoint",
                response_excerpt=excerpt,
                disable_endpoint=True,
            )

        retry_after: float | None = None
        if outcome is WebhookOutcome.retry:
            retry_after = parse_retry_after(
                response.headers.get("Retry-After"), _reference_time(response, timestamp)
            )
            if retry_after is None and status in THROTTLE_STATUSES:
                retry_after = self.default_throttle_seconds

        if 300 <= status < 400:
            location = response.headers.get("Location", "")[:200]
            error = f"HTTP {status} redirect not followed" + (f" (Location: {location})" if location else "")
        else:
            error = f"HTTP {status} {response.reason or ''}".rstrip()
        return WebhookResult(
            outcome, status, latency_ms, error=error, response_excerpt=excerpt, retry_after_seconds=retry_after
        )


def _host_of(url: str) -> str:
    try:
        return URL(url).host or "?"
    except (ValueError, TypeError):
        return "?"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


async def _read_up_to(stream: aiohttp.StreamReader, limit: int) -> bytes:
    if limit <= 0:
        return b""
    first = await stream.read(limit)
    if not first or len(first) >= limit or stream.at_eof():
        return first  # the usual short answer: one read, no second call to learn it has ended
    buffer = bytearray(first)
    while len(buffer) < limit:
        chunk = await stream.read(limit - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)

