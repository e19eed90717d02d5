"""The simulator's world: users, Spaces, simulated time, rate-limit windows and injected faults.

Every admin operation is a plain method here, so in-process tests can drive the simulator directly;
the admin HTTP API in `app.x.sim.app` only translates JSON to these calls.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

GoneMode = Literal["state", "not_found"]
GONE_MODES: tuple[str, ...] = ("state", "not_found")
VISIBLE_STATES = ("live", "scheduled")
GONE_STATES = ("ended", "canceled")

# Names of the simulated endpoints, for rate limits, faults and call counts ("*" means every endpoint).
ENDPOINTS = ("space_by_id", "spaces_lookup", "spaces_by_creator", "spaces_search", "users_by", "user_by_username")
ALL_ENDPOINTS = "*"

DEFAULT_PROBLEM_BASE = "https://api.twitter.com/2/problems/"
SPACE_ID_RE = re.compile(r"^[a-zA-Z0-9]{1,13}$")
USER_ID_RE = re.compile(r"^[0-9]{1,19}$")
USERNAME_RE = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_SPACE_ID_ALPHABET = string.ascii_letters + string.digits


class SimError(Exception):
    """An admin operation that cannot be done; `status` is the HTTP status the admin API answers."""

    status = 422


class SimNotFound(SimError):
    status = 404


class SimConflict(SimError):
    status = 409


class SettableClock(Protocol):
    def now(self) -> datetime: ...

    def set(self, when: datetime) -> None: ...

    def advance(self, delta: timedelta | float) -> datetime: ...


class SimClock:
    """Real time until set; from then on fixed, moving only when set or advanced."""

    def __init__(self, fixed: datetime | None = None) -> None:
        self._fixed = _aware(fixed) if fixed else None

    @property
    def is_fixed(self) -> bool:
        return self._fixed is not None

    def now(self) -> datetime:
        return self._fixed or datetime.now(UTC)

    def set(self, when: datetime) -> None:
        self._fixed = _aware(when)

    def advance(self, delta: timedelta | float) -> datetime:
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        self._fixed = self.now() + delta
        return self._fixed

    def use_real_time(self) -> None:
        self._fixed = None


@dataclass
class SimUser:
    id: str
    username: str
    name: str
    suspended: bool = False
    created_at: datetime | None = None


@dataclass
class SimSpace:
    id: str
    creator_id: str
    state: str
    created_at: datetime
    updated_at: datetime
    title: str | None = None
    lang: str | None = None
    host_ids: list[str] = field(default_factory=list)
    speaker_ids: list[str] = field(default_factory=list)
    invited_user_ids: list[str] = field(default_factory=list)
    topic_ids: list[str] = field(default_factory=list)
    is_ticketed: bool = False
    participant_count: int = 0
    scheduled_start: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


@dataclass
class ResponseFault:
    """Answer `status` (with `body`, or X's body for that status) instead of the real response."""

    status: int
    body: dict[str, Any] | None = None
    remaining: int | None = 1  # None: until cleared


@dataclass
class DelayFault:
    seconds: float
    remaining: int | None = None


@dataclass(frozen=True)
class RateStatus:
    limit: int
    remaining: int
    reset_epoch: int
    allowed: bool

    def headers(self) -> dict[str, str]:
        return {
            "x-rate-limit-limit": str(self.limit),
            "x-rate-limit-remaining": str(self.remaining),
            "x-rate-limit-reset": str(self.reset_epoch),
        }


@dataclass
class _Window:
    started_at: datetime
    count: int = 0


@dataclass(frozen=True)
class SimRequest:
    endpoint: str
    params: list[tuple[str, str]]
    status: int


class SimState:
    def __init__(
        self,
        *,
        clock: SettableClock | None = None,
        requests_per_window: int = 300,
        window_seconds: float = 900,
        by_creator_per_second: int = 1,
        gone_mode: GoneMode = "state",
        problem_base: str = DEFAULT_PROBLEM_BASE,
        seed: int | None = None,
    ) -> None:
        self.clock: SettableClock = clock or SimClock()
        self.requests_per_window = requests_per_window
        self.window_seconds = window_seconds
        self.by_creator_per_second = by_creator_per_second
        self.gone_mode: GoneMode = gone_mode
        self.problem_base = problem_base
        self.random = random.Random(seed)
        self.users: dict[str, SimUser] = {}
        self.spaces: dict[str, SimSpace] = {}
        self.response_faults: dict[str, ResponseFault] = {}
        self.delay_faults: dict[str, DelayFault] = {}
        self.terminal: dict[str, Any] | None = None  # usage cap or no credits, until cleared
        self.calls: Counter[str] = Counter()
        self.requests: deque[SimRequest] = deque(maxlen=1000)
        self._windows: dict[str, _Window] = {}
        self._by_creator_times: deque[datetime] = deque()
        self.configure(gone_mode=gone_mode)

    # --- configuration and time -------------------------------------------------------------

    def configure(
        self,
        *,
        requests_per_window: int | None = None,
        window_seconds: float | None = None,
        by_creator_per_second: int | None = None,
        gone_mode: GoneMode | None = None,
        problem_base: str | None = None,
    ) -> None:
        if gone_mode is not None:
            if gone_mode not in GONE_MODES:
                raise SimError(f"gone_mode must be one of {', '.join(GONE_MODES)}")
            self.gone_mode = gone_mode
        if requests_per_window is not None:
            self.requests_per_window = requests_per_window
        if window_seconds is not None:
            self.window_seconds = window_seconds
        if by_creator_per_second is not None:
            self.by_creator_per_second = by_creator_per_second
        if problem_base is not None:
            self.problem_base = problem_base if problem_base.endswith("/") else problem_base + "/"

    def now(self) -> datetime:
        return self.clock.now()

    def set_time(self, when: datetime) -> datetime:
        self.clock.set(_aware(when))
        return self.now()

    def advance_time(self, seconds: float) -> datetime:
        return self.clock.advance(timedelta(seconds=seconds))

    def use_real_time(self) -> None:
        if not isinstance(self.clock, SimClock):
            raise SimError("this simulator runs on an injected clock, which cannot follow real time")
        self.clock.use_real_time()

    # --- users ---------------------------------------------------------------------------------

    def add_user(
        self, username: str, *, id: str | None = None, name: str | None = None, suspended: bool = False
    ) -> SimUser:
        if not USERNAME_RE.match(username):
            raise SimError(f"username {username!r} does not match {USERNAME_RE.pattern}")
        if self.user_by_username(username, include_suspended=True):
            raise SimConflict(f"username {username} is taken")
        user_id = id or self._new_user_id()
        if not USER_ID_RE.match(user_id):
            raise SimError(f"user id {user_id!r} does not match {USER_ID_RE.pattern}")
        if user_id in self.users:
            raise SimConflict(f"user {user_id} exists")
        user = SimUser(user_id, username, name or username, suspended, self.now())
        self.users[user_id] = user
        return user

    def suspend_user(self, user_id: str, suspended: bool = True) -> SimUser:
        user = self._user(user_id)
        user.suspended = suspended
        return user

    def user_by_username(self, username: str, *, include_suspended: bool = False) -> SimUser | None:
        wanted = username.lower()  # X usernames are case-insensitive
        for user in self.users.values():
            if user.username.lower() == wanted and (include_suspended or not user.suspended):
                return user
        return None

    # --- Spaces and their lifecycle ------------------------------------------------------------

    def add_space(
        self,
        creator_id: str,
        title: str | None,
        *,
        scheduled_start: datetime | None = None,
        state: Literal["scheduled", "live"] = "scheduled",
        id: str | None = None,
        lang: str | None = "en",
        host_ids: list[str] | None = None,
        speaker_ids: list[str] | None = None,
        invited_user_ids: list[str] | None = None,
        is_ticketed: bool = False,
        participant_count: int = 0,
        created_at: datetime | None = None,
        started_at: datetime | None = None,
    ) -> SimSpace:
        self._user(creator_id)
        for user_id in [*(host_ids or []), *(speaker_ids or []), *(invited_user_ids or [])]:
            self._user(user_id)
        if state not in VISIBLE_STATES:
            raise SimError("a new Space is scheduled or live")
        if state == "scheduled" and scheduled_start is None:
            raise SimError("a scheduled Space needs scheduled_start")
        space_id = id or self._new_space_id()
        if not SPACE_ID_RE.match(space_id):
            raise SimError(f"space id {space_id!r} does not match {SPACE_ID_RE.pattern}")
        if space_id in self.spaces:
            raise SimConflict(f"space {space_id} exists")
        now = self.now()
        created = _aware(created_at) if created_at else now
        space = SimSpace(
            id=space_id,
            creator_id=creator_id,
            state=state,
            created_at=created,
            updated_at=created,
            title=title,
            lang=lang,
            host_ids=list(dict.fromkeys([creator_id, *(host_ids or [])])),
            speaker_ids=list(speaker_ids or []),
            invited_user_ids=list(invited_user_ids or []),
            is_ticketed=is_ticketed,
            participant_count=participant_count,
            scheduled_start=_aware(scheduled_start) if scheduled_start else None,
            started_at=(_aware(started_at) if started_at else now) if state == "live" else None,
        )
        self.spaces[space_id] = space
        return space

    def update_space(
        self,
        space_id: str,
        *,
        title: str | None = None,
        lang: str | None = None,
        host_ids: list[str] | None = None,
        participant_count: int | None = None,
    ) -> SimSpace:
        space = self._space(space_id)
        if title is not None:
            space.title = title
        if lang is not None:
            space.lang = lang
        if host_ids is not None:
            for user_id in host_ids:
                self._user(user_id)
            space.host_ids = list(dict.fromkeys([space.creator_id, *host_ids]))
        if participant_count is not None:
            space.participant_count = participant_count
        space.updated_at = self.now()
        return space

    def reschedule(self, space_id: str, scheduled_start: datetime) -> SimSpace:
        space = self._space(space_id, expect_state="scheduled")
        space.scheduled_start = _aware(scheduled_start)
        space.updated_at = self.now()
        return space

    def cancel(self, space_id: str) -> SimSpace:
        space = self._space(space_id, expect_state="scheduled")
        space.state = "canceled"
        space.updated_at = self.now()
        return space

    def start(self, space_id: str) -> SimSpace:
        space = self._space(space_id, expect_state="scheduled")
        space.state = "live"
        space.started_at = space.updated_at = self.now()
        return space

    def end(self, space_id: str) -> SimSpace:
        space = self._space(space_id, expect_state="live")
        space.state = "ended"
        space.ended_at = space.updated_at = self.now()
        return space

    def delete(self, space_id: str) -> None:
        self._space(space_id)
        del self.spaces[space_id]

    def populate(
        self,
        *,
        seed: int | None = None,
        creators: int = 10,
        spaces_per_creator: int = 3,
        soon: int = 0,
        soon_within_minutes: float = 30.0,
        live_fraction: float = 0.1,
    ) -> tuple[list[SimUser], list[SimSpace]]:
        """Add generated creators and their Spaces (see app.x.sim.generator)."""
        from app.x.sim.generator import SpaceGenerator

        world = SpaceGenerator(seed).world(
            self.now(),
            creators=creators,
            spaces_per_creator=spaces_per_creator,
            soon=soon,
            soon_within_minutes=soon_within_minutes,
            live_fraction=live_fraction,
            taken_user_ids=set(self.users),
            taken_usernames={u.username.lower() for u in self.users.values()},
            taken_space_ids=set(self.spaces),
        )
        users = [self.add_user(c.username, id=c.id, name=c.name) for c in world.creators]
        spaces = [
            self.add_space(
                s.creator_id,
                s.title,
                id=s.id,
                state=s.state,  # type: ignore[arg-type]
                scheduled_start=s.scheduled_start,
                started_at=s.started_at,
                created_at=s.created_at,
                lang=s.lang,
                host_ids=s.host_ids,
                is_ticketed=s.is_ticketed,
                participant_count=s.participant_count,
            )
            for s in world.spaces
        ]
        return users, spaces

    def reset(self) -> None:
        """Forget every user, Space, fault, call count and rate-limit window."""
        self.users.clear()
        self.spaces.clear()
        self.clear_faults()
        self.reset_rate_limits()
        self.calls.clear()
        self.requests.clear()

    # --- faults --------------------------------------------------------------------------------

    def set_fault(
        self, status: int, *, count: int | None = 1, endpoint: str = ALL_ENDPOINTS, body: dict[str, Any] | None = None
    ) -> None:
        """The next `count` responses of `endpoint` (None: all until cleared) answer `status`."""
        _check_endpoint(endpoint)
        if not 200 <= status <= 599:
            raise SimError("status must be 200-599")
        self.response_faults[endpoint] = ResponseFault(status, body, count)

    def set_delay(self, seconds: float, *, count: int | None = None, endpoint: str = ALL_ENDPOINTS) -> None:
        _check_endpoint(endpoint)
        self.delay_faults[endpoint] = DelayFault(seconds, count)

    def set_usage_capped(self, period: str = "Monthly", scope: str = "Product") -> None:
        self.terminal = {"kind": "usage-capped", "period": period, "scope": scope}

    def set_credits_depleted(self, account_id: int = 1234567890) -> None:
        self.terminal = {"kind": "credits", "account_id": account_id}

    def clear_faults(self) -> None:
        self.response_faults.clear()
        self.delay_faults.clear()
        self.terminal = None

    def take_response_fault(self, endpoint: str) -> ResponseFault | None:
        return _take(self.response_faults, endpoint)

    def take_delay(self, endpoint: str) -> float:
        fault = _take(self.delay_faults, endpoint)
        return fault.seconds if fault else 0.0

    # --- rate limits ---------------------------------------------------------------------------

    def peek_rate_limit(self, endpoint: str) -> RateStatus:
        window = self._current_window(endpoint)
        return self._status(window, allowed=window.count < self.requests_per_window)

    def hit_rate_limit(self, endpoint: str) -> RateStatus:
        """Count one request against the endpoint's window, unless the window is used up."""
        window = self._current_window(endpoint)
        if window.count >= self.requests_per_window:
            return self._status(window, allowed=False)
        window.count += 1
        self._windows[endpoint] = window
        return self._status(window, allowed=True)

    def hit_per_second_limit(self) -> bool:
        """by_creator's app-wide N per second. True when this request is within it."""
        now = self.now()
        while self._by_creator_times and self._by_creator_times[0] <= now - timedelta(seconds=1):
            self._by_creator_times.popleft()
        if len(self._by_creator_times) >= self.by_creator_per_second:
            return False
        self._by_creator_times.append(now)
        return True

    def reset_rate_limits(self) -> None:
        self._windows.clear()
        self._by_creator_times.clear()

    def _current_window(self, endpoint: str) -> _Window:
        now = self.now()
        window = self._windows.get(endpoint)
        if window is None or now >= window.started_at + timedelta(seconds=self.window_seconds):
            window = _Window(now)
        return window

    def _status(self, window: _Window, *, allowed: bool) -> RateStatus:
        reset = window.started_at + timedelta(seconds=self.window_seconds)
        remaining = max(0, self.requests_per_window - window.count)
        return RateStatus(self.requests_per_window, remaining, math.ceil(reset.timestamp()), allowed)

    # --- bookkeeping and dump ------------------------------------------------------------------

    def record(self, endpoint: str, params: list[tuple[str, str]], status: int) -> None:
        self.calls[endpoint] += 1
        self.requests.append(SimRequest(endpoint, params, status))

    def dump(self) -> dict[str, Any]:
        return {
            "now": _iso(self.now()),
            "clock": "fixed" if getattr(self.clock, "is_fixed", True) else "real",
            "config": {
                "requests_per_window": self.requests_per_window,
                "window_seconds": self.window_seconds,
                "by_creator_per_second": self.by_creator_per_second,
                "gone_mode": self.gone_mode,
                "problem_base": self.problem_base,
            },
            "users": [to_json_dict(asdict(u)) for u in self.users.values()],
            "spaces": [to_json_dict(asdict(s)) for s in self.spaces.values()],
            "faults": {
                "responses": {k: asdict(v) for k, v in self.response_faults.items()},
                "delays": {k: asdict(v) for k, v in self.delay_faults.items()},
                "terminal": self.terminal,
            },
            "rate_limits": {
                name: {"count": w.count, "window_started_at": _iso(w.started_at)} for name, w in self._windows.items()
            },
            "calls": dict(self.calls),
        }

    # --- helpers -------------------------------------------------------------------------------

    def _user(self, user_id: str) -> SimUser:
        user = self.users.get(user_id)
        if user is None:
            raise SimNotFound(f"no user {user_id}")
        return user

    def _space(self, space_id: str, *, expect_state: str | None = None) -> SimSpace:
        space = self.spaces.get(space_id)
        if space is None:
            raise SimNotFound(f"no space {space_id}")
        if expect_state is not None and space.state != expect_state:
            raise SimConflict(f"space {space_id} is {space.state}, not {expect_state}")
        return space

    def _new_space_id(self) -> str:
        while True:
            space_id = "1" + "".join(self.random.choices(_SPACE_ID_ALPHABET, k=12))
            if space_id not in self.spaces:
                return space_id

    def _new_user_id(self) -> str:
        while True:
            user_id = str(self.random.randint(10**17, 19 * 10**17))
            if user_id not in self.users:
                return user_id


_Fault = TypeVar("_Fault", ResponseFault, DelayFault)


def _take(faults: dict[str, _Fault], endpoint: str) -> _Fault | None:
    for key in (endpoint, ALL_ENDPOINTS):
        fault = faults.get(key)
        if fault is None:
            continue
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del faults[key]
        return fault
    return None


def _check_endpoint(endpoint: str) -> None:
    if endpoint != ALL_ENDPOINTS and endpoint not in ENDPOINTS:
        raise SimError(f"endpoint must be * or one of {', '.join(ENDPOINTS)}")


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def x_timestamp(dt: datetime) -> str:
    """X's format: UTC, milliseconds, `Z` (tweepy cannot parse it without the fraction)."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _iso(dt: datetime | None) -> str | None:
    return x_timestamp(dt) if dt else None


def to_json_dict(record: dict[str, Any]) -> dict[str, Any]:
    return {k: x_timestamp(v) if isinstance(v, datetime) else v for k, v in record.items()}
