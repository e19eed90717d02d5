"""Async client of X's API v2 for Spaces and username lookups. It knows nothing of the database.

Failures come out as three kinds of exception, by what the caller should do about them:
- XRequestError: the request itself is wrong (400/401/403/404); retrying will not help.
- XTerminalError: the account is out of credits or over its usage cap; waiting will not help.
- XUnavailableError: X kept failing (5xx, timeouts, rate limit not recovering); try again later.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from app.core.clock import Clock
from app.x.metrics import X_API_CALLS, X_RATE_LIMIT_REMAINING

log = logging.getLogger(__name__)

SPACE_FIELDS = (
    "title,state,scheduled_start,started_at,ended_at,creator_id,host_ids,lang,is_ticketed,created_at,updated_at"
)
SPACE_EXPANSIONS = "creator_id"
USER_FIELDS = "username,name"
MAX_IDS_PER_CALL = 100
MAX_QUERY_LENGTH = 2048
SEARCH_STATES = ("live", "scheduled", "all")

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class XUser:
    id: str
    username: str
    name: str | None = None


@dataclass(frozen=True)
class XSpace:
    id: str
    state: str  # open string: X also answers "ended", "canceled" and has shown others
    title: str | None = None
    creator_id: str | None = None
    host_ids: list[str] = field(default_factory=list)
    lang: str | None = None
    is_ticketed: bool | None = None
    scheduled_start: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class XResult:
    """One response: the objects found, expanded users, and the 200-with-errors partial failures."""

    spaces: list[XSpace] = field(default_factory=list)
    users: list[XUser] = field(default_factory=list)
    users_included: list[XUser] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)
    other_errors: list[dict[str, Any]] = field(default_factory=list)
    result_count: int | None = None

    def users_by_id(self) -> dict[str, XUser]:
        return {user.id: user for user in [*self.users_included, *self.users]}


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    reset_at: datetime


class XError(Exception):
    """Base of every failure of a call to X."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(f"X API {endpoint}: {message}")
        self.endpoint = endpoint


class XRequestError(XError):
    """X rejected the request (400/401/403/404 and other 4xx): fatal for this call."""

    def __init__(
        self, endpoint: str, status: int, title: str, detail: str, *, problem_type: str | None, body: Any
    ) -> None:
        super().__init__(endpoint, f"HTTP {status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem_type = problem_type
        self.body = body


class XTerminalError(XError):
    """No credits (402 .../credits) or usage cap reached (429 .../usage-capped): waiting does not fix it."""

    def __init__(self, endpoint: str, status: int, reason: str, period: str | None, detail: str) -> None:
        super().__init__(endpoint, f"HTTP {status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.period = period
        self.detail = detail


class XUnavailableError(XError):
    """X stayed unavailable (5xx, timeouts, connection errors) through every retry."""


class XRateLimitError(XUnavailableError):
    """Still rate limited after the allowed waits, or the reset is further away than the client may wait."""

    def __init__(self, endpoint: str, message: str, reset_at: datetime | None) -> None:
        super().__init__(endpoint, message)
        self.reset_at = reset_at


def problem_kind(problem_type: object) -> str | None:
    """`https://api.x.com/2/problems/usage-capped` -> `usage-capped` (hosts vary, the path does not)."""
    if not isinstance(problem_type, str) or "/problems/" not in problem_type:
        return None
    return problem_type.rsplit("/problems/", 1)[1].strip("/") or None


def parse_x_datetime(value: object) -> datetime | None:
    """X sends `2021-07-04T23:12:08.000Z`; accept it with or without fractional seconds or an offset."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        log.warning("X sent an unreadable timestamp %r", value)
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_space(raw: dict[str, Any]) -> XSpace:
    host_ids = raw.get("host_ids")
    is_ticketed = raw.get("is_ticketed")
    return XSpace(
        id=str(raw["id"]),
        state=str(raw.get("state") or "unknown"),
        title=raw.get("title") or None,
        creator_id=str(raw["creator_id"]) if raw.get("creator_id") is not None else None,
        host_ids=[str(h) for h in host_ids] if isinstance(host_ids, list) else [],
        lang=raw.get("lang") or None,
        is_ticketed=is_ticketed if isinstance(is_ticketed, bool) else None,
        scheduled_start=parse_x_datetime(raw.get("scheduled_start")),
        started_at=parse_x_datetime(raw.get("started_at")),
        ended_at=parse_x_datetime(raw.get("ended_at")),
        created_at=parse_x_datetime(raw.get("created_at")),
        updated_at=parse_x_datetime(raw.get("updated_at")),
    )


def parse_user(raw: dict[str, Any]) -> XUser:
    return XUser(id=str(raw["id"]), username=str(raw.get("username", "")), name=raw.get("name"))


def _is_suspension(error: dict[str, Any]) -> bool:
    return error.get("title") == "Forbidden" or str(error.get("detail", "")).startswith("User has been suspended")


def parse_result(body: dict[str, Any], *, kind: str) -> XResult:
    """`kind` is "spaces" or "users": which list `data` goes to. Missing `data` means nothing found."""
    result = XResult()
    data = body.get("data")
    items = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    for item in items:
        if kind == "spaces":
            result.spaces.append(parse_space(item))
        else:
            result.users.append(parse_user(item))
    includes = body.get("includes") or {}
    result.users_included = [parse_user(u) for u in includes.get("users") or []]
    for error in body.get("errors") or []:
        resource = str(error.get("resource_id") or error.get("value") or "")
        if problem_kind(error.get("type")) == "resource-not-found" and resource:
            (result.suspended if _is_suspension(error) else result.not_found).append(resource)
        else:
            result.other_errors.append(error)
    meta = body.get("meta") or {}
    if isinstance(meta.get("result_count"), int):
        result.result_count = meta["result_count"]
    return result


def _ids_param(values: Iterable[str], what: str) -> str:
    unique = list(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
    if not unique:
        raise ValueError(f"at least one {what} is required")
    if len(unique) > MAX_IDS_PER_CALL:
        raise ValueError(f"at most {MAX_IDS_PER_CALL} {what}s per call, got {len(unique)}")
    return ",".join(unique)


class XClient:
    def __init__(
        self,
        base_url: str,
        bearer_token: str,
        *,
        clock: Clock,
        http: httpx.AsyncClient | None = None,
        max_retries: int = 3,
        timeout: float = 10.0,
        sleep: Sleep | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_rate_limit_wait: float = 960.0,
        by_creator_min_interval: float = 0.0,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {bearer_token}", "User-Agent": "spacebell"}
        self._clock = clock
        self._own_http = http is None
        self._http = http or httpx.AsyncClient()
        self._max_retries = max_retries
        self._timeout = timeout
        self._sleep: Sleep = sleep or asyncio.sleep
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_rate_limit_wait = max_rate_limit_wait
        self._by_creator_min_interval = by_creator_min_interval
        self._by_creator_lock = asyncio.Lock()
        self._by_creator_last_call: datetime | None = None
        self.rate_limits: dict[str, RateLimit] = {}

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> XClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def spaces_by_creator_ids(self, user_ids: Iterable[str]) -> XResult:
        params = {"user_ids": _ids_param(user_ids, "user id"), **self._space_params()}
        async with self._by_creator_lock:
            await self._space_out_by_creator()
            try:
                body = await self._get("spaces_by_creator", "/2/spaces/by/creator_ids", params)
            finally:
                self._by_creator_last_call = self._clock.now()
        return parse_result(body, kind="spaces")

    async def search_spaces(self, query: str, state: str = "scheduled") -> XResult:
        if not 1 <= len(query) <= MAX_QUERY_LENGTH:
            raise ValueError(f"query must be 1 to {MAX_QUERY_LENGTH} characters")
        if state not in SEARCH_STATES:
            raise ValueError(f"state must be one of {', '.join(SEARCH_STATES)}")
        params = {"query": query, "state": state, "max_results": "100", **self._space_params()}
        body = await self._get("spaces_search", "/2/spaces/search", params)
        return parse_result(body, kind="spaces")

    async def spaces_by_ids(self, ids: Iterable[str]) -> XResult:
        params = {"ids": _ids_param(ids, "space id"), **self._space_params()}
        body = await self._get("spaces_lookup", "/2/spaces", params)
        return parse_result(body, kind="spaces")

    async def users_by_usernames(self, usernames: Iterable[str]) -> XResult:
        cleaned = (str(u).strip().lstrip("@") for u in usernames)
        params = {"usernames": _ids_param(cleaned, "username"), "user.fields": USER_FIELDS}
        body = await self._get("users_by", "/2/users/by", params)
        return parse_result(body, kind="users")

    @staticmethod
    def _space_params() -> dict[str, str]:
        return {"space.fields": SPACE_FIELDS, "expansions": SPACE_EXPANSIONS, "user.fields": USER_FIELDS}

    async def _space_out_by_creator(self) -> None:
        # X allows one by_creator call per second per app; waiting here is cheaper than a 429.
        if self._by_creator_min_interval <= 0 or self._by_creator_last_call is None:
            return
        elapsed = (self._clock.now() - self._by_creator_last_call).total_seconds()
        if elapsed < self._by_creator_min_interval:
            await self._sleep(self._by_creator_min_interval - elapsed)

    async def _get(self, endpoint: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = self._base_url + path
        failures = 0
        rate_limited = 0
        while True:
            try:
                response = await self._http.get(url, params=params, headers=self._headers, timeout=self._timeout)
            except httpx.TransportError as exc:
                X_API_CALLS.labels(endpoint, "error").inc()
                failures += 1
                await self._retry_or_raise(endpoint, failures, f"{type(exc).__name__}: {str(exc) or 'no detail'}")
                continue

            status = response.status_code
            X_API_CALLS.labels(endpoint, str(status)).inc()
            rate_limit = self._record_rate_limit(endpoint, response)
            body = _json_or_none(response)

            if status == 200 and isinstance(body, dict):
                return body
            if status == 200 or status >= 500:
                failures += 1
                reason = f"HTTP {status}" + ("" if status != 200 else " with a body that is not a JSON object")
                await self._retry_or_raise(endpoint, failures, reason)
                continue

            problem = body if isinstance(body, dict) else {}
            kind = problem_kind(problem.get("type"))
            if status == 402 or kind in ("usage-capped", "credits"):
                error = XTerminalError(
                    endpoint,
                    status,
                    reason=kind or "payment-required",
                    period=problem.get("period"),
                    detail=str(problem.get("detail") or problem.get("title") or ""),
                )
                log.error("%s", error)
                raise error
            if status == 429:
                rate_limited += 1
                await self._wait_for_rate_limit(endpoint, rate_limit, rate_limited)
                continue
            raise self._request_error(endpoint, path, status, problem, body)

    async def _retry_or_raise(self, endpoint: str, failures: int, reason: str) -> None:
        if failures > self._max_retries:
            log.error("X API %s unavailable after %d attempts: %s", endpoint, failures, reason)
            raise XUnavailableError(endpoint, f"unavailable after {failures} attempts: {reason}")
        delay = self._backoff(failures)
        log.warning("X API %s: %s; retry %d/%d in %.2fs", endpoint, reason, failures, self._max_retries, delay)
        await self._sleep(delay)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_cap, self._backoff_base * 2.0 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    async def _wait_for_rate_limit(self, endpoint: str, rate_limit: RateLimit | None, waits: int) -> None:
        reset_at = rate_limit.reset_at if rate_limit else None
        if waits > self._max_retries:
            log.error("X API %s still rate limited after %d waits", endpoint, waits - 1)
            raise XRateLimitError(endpoint, f"still rate limited after {waits - 1} waits", reset_at)
        if rate_limit is not None and rate_limit.remaining == 0:
            # The window is used up: nothing succeeds before its reset (+1 s for clock skew, as tweepy does).
            delay = max(0.0, (rate_limit.reset_at - self._clock.now()).total_seconds()) + 1.0
        else:
            # Window not exhausted (or no headers): a short-term limit such as by_creator's 1 request/second.
            delay = max(1.0, self._backoff(waits))
        if delay > self._max_rate_limit_wait:
            log.error("X API %s rate limited until %s, longer than the client waits", endpoint, reset_at)
            raise XRateLimitError(endpoint, f"rate limited for {delay:.0f}s", reset_at)
        log.warning("X API %s rate limited; waiting %.1fs (reset at %s)", endpoint, delay, reset_at)
        await self._sleep(delay)

    def _record_rate_limit(self, endpoint: str, response: httpx.Response) -> RateLimit | None:
        try:
            limit = int(response.headers["x-rate-limit-limit"])
            remaining = int(response.headers["x-rate-limit-remaining"])
            reset_epoch = int(response.headers["x-rate-limit-reset"])
        except (KeyError, ValueError):
            return None
        rate_limit = RateLimit(limit, remaining, datetime.fromtimestamp(reset_epoch, UTC))
        self.rate_limits[endpoint] = rate_limit
        X_RATE_LIMIT_REMAINING.labels(endpoint).set(remaining)
        return rate_limit

    @staticmethod
    def _request_error(endpoint: str, path: str, status: int, problem: dict[str, Any], body: Any) -> XRequestError:
        title = str(problem.get("title") or f"HTTP {status}")
        detail = str(problem.get("detail") or "")
        messages = [str(e["message"]) for e in problem.get("errors") or [] if isinstance(e, dict) and "message" in e]
        if messages:
            detail = f"{detail} {'; '.join(messages)}".strip()
        log.error("X API %s (GET %s) failed: HTTP %d %s: %s", endpoint, path, status, title, detail or "no detail")
        return XRequestError(endpoint, status, title, detail, problem_type=problem.get("type"), body=body)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
