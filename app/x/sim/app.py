"""ASGI app of the X API simulator: X's Spaces and user-lookup routes, plus an admin API under /_sim."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.x.sim.params import (
    SPACE_EXPANSIONS,
    SPACE_FIELDS,
    SPACE_ID_PATTERN,
    SPACE_PARAMS,
    TOPIC_FIELDS,
    TWEET_FIELDS,
    USER_EXPANSIONS,
    USER_FIELDS,
    USER_ID_PATTERN,
    USER_PARAMS,
    USERNAME_PATTERN,
    InvalidRequest,
    QueryParams,
)
from app.x.sim.state import (
    ENDPOINTS,
    GONE_STATES,
    VISIBLE_STATES,
    GoneMode,
    SimError,
    SimSpace,
    SimState,
    SimUser,
    to_json_dict,
    x_timestamp,
)

PROBLEM_JSON = "application/problem+json"


# --- X's response bodies ----------------------------------------------------------------------


def _plain_problem(status: int) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase
    return {"title": phrase, "detail": phrase, "type": "about:blank", "status": status}


def default_error_body(sim: SimState, status: int) -> dict[str, Any]:
    """X's body for an error status, as seen in the wild."""
    if status == 400:
        return _invalid_request_body(sim, [{"parameters": {}, "message": "Invalid request"}])
    if status == 401:
        return {"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"}
    if status == 402:
        return _credits_body(sim, 1234567890)
    if status == 403:
        return {
            "client_id": "1234567",
            "detail": "When authenticating requests to the Twitter API v2 endpoints, you must use keys and tokens "
            "from a Twitter developer App that is attached to a Project. You can create a project via the "
            "developer portal.",
            "registration_url": "https://developer.twitter.com/en/docs/projects/overview",
            "title": "Client Forbidden",
            "required_enrollment": "Appropriate Level of API Access",
            "reason": "client-not-enrolled",
            "type": sim.problem_base + "client-forbidden",
        }
    if status == 404:
        return {"title": "Not Found Error", "detail": "Not Found", "type": "about:blank", "status": 404}
    return _plain_problem(status)


def _invalid_request_body(sim: SimState, problems: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "errors": problems,
        "title": "Invalid Request",
        "detail": "One or more parameters to your request was invalid.",
        "type": sim.problem_base + "invalid-request",
    }


def _credits_body(sim: SimState, account_id: int) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "title": "CreditsDepleted",
        "detail": f"Your enrolled account [{account_id}] does not have any credits to fulfill this request.",
        "type": sim.problem_base + "credits",
    }


def _terminal_response(sim: SimState, headers: dict[str, str]) -> JSONResponse:
    terminal = sim.terminal or {}
    if terminal.get("kind") == "credits":
        return JSONResponse(_credits_body(sim, terminal["account_id"]), 402, headers, media_type=PROBLEM_JSON)
    body = {
        "title": "UsageCapExceeded",
        "detail": f"Usage cap exceeded: {terminal['period']} product cap",
        "type": sim.problem_base + "usage-capped",
        "period": terminal["period"],
        "scope": terminal["scope"],
    }
    return JSONResponse(body, 429, headers, media_type=PROBLEM_JSON)


def _not_found(sim: SimState, resource_type: str, parameter: str, value: str) -> dict[str, Any]:
    return {
        "value": value,
        "detail": f"Could not find {resource_type} with {parameter}: [{value}].",
        "title": "Not Found Error",
        "resource_type": resource_type,
        "parameter": parameter,
        "resource_id": value,
        "type": sim.problem_base + "resource-not-found",
    }


def _suspended(sim: SimState, parameter: str, value: str) -> dict[str, Any]:
    return {
        "value": value,
        "detail": f"User has been suspended: [{value}].",
        "title": "Forbidden",
        "resource_type": "user",
        "parameter": parameter,
        "resource_id": value,
        "type": sim.problem_base + "resource-not-found",
    }


def _user_object(user: SimUser, fields: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": user.id, "name": user.name, "username": user.username}
    if "created_at" in fields and user.created_at:
        out["created_at"] = x_timestamp(user.created_at)
    if "protected" in fields:
        out["protected"] = False
    return out


@dataclass
class SpaceView:
    """What the request asked to see of each Space: fields, expansions and the expanded users' fields."""

    fields: list[str]
    expansions: list[str]
    user_fields: list[str]

    @classmethod
    def read(cls, query: QueryParams) -> SpaceView:
        view = cls(
            query.enum_list("space.fields", SPACE_FIELDS),
            query.enum_list("expansions", SPACE_EXPANSIONS),
            query.enum_list("user.fields", USER_FIELDS),
        )
        query.enum_list("topic.fields", TOPIC_FIELDS)  # validated; the simulator has no topics
        return view

    def space(self, space: SimSpace) -> dict[str, Any]:
        values: dict[str, Any] = {
            "created_at": space.created_at,
            "creator_id": space.creator_id,
            "ended_at": space.ended_at,
            "host_ids": space.host_ids,
            "invited_user_ids": space.invited_user_ids,
            "is_ticketed": space.is_ticketed,
            "lang": space.lang,
            "participant_count": space.participant_count,
            "scheduled_start": space.scheduled_start,
            "speaker_ids": space.speaker_ids,
            "started_at": space.started_at,
            "title": space.title,
            "topic_ids": space.topic_ids,
            "updated_at": space.updated_at,
        }
        out: dict[str, Any] = {"id": space.id, "state": space.state}
        for name in self.fields:
            value = values.get(name)  # subscriber_count needs the creator's user token: never sent here
            if value is None or value == [] or value == "":
                continue  # X omits absent and empty fields rather than sending null
            out[name] = x_timestamp(value) if isinstance(value, datetime) else value
        return out

    def expanded_users(self, sim: SimState, spaces: list[SimSpace]) -> list[dict[str, Any]]:
        user_ids: list[str] = []
        for space in spaces:
            if "creator_id" in self.expansions:
                user_ids.append(space.creator_id)
            for name in ("host_ids", "speaker_ids", "invited_user_ids"):
                if name in self.expansions:
                    user_ids.extend(getattr(space, name))
        users = [sim.users.get(user_id) for user_id in dict.fromkeys(user_ids)]
        return [_user_object(u, self.user_fields) for u in users if u is not None and not u.suspended]

    def envelope(
        self,
        sim: SimState,
        spaces: list[SimSpace],
        errors: list[dict[str, Any]] | None = None,
        *,
        single: bool = False,
        meta: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if spaces:
            objects = [self.space(s) for s in spaces]
            body["data"] = objects[0] if single else objects
            users = self.expanded_users(sim, spaces)
            if users:
                body["includes"] = {"users": users}
        if errors:
            body["errors"] = errors
        if meta:
            body["meta"] = {"result_count": len(spaces)}
        return body


def _creator_active(sim: SimState, space: SimSpace) -> bool:
    creator = sim.users.get(space.creator_id)
    return creator is not None and not creator.suspended


def _lookup_spaces(sim: SimState, ids: list[str], parameter: str) -> tuple[list[SimSpace], list[dict[str, Any]]]:
    found: list[SimSpace] = []
    errors: list[dict[str, Any]] = []
    for space_id in ids:
        space = sim.spaces.get(space_id)
        gone = space is not None and space.state in GONE_STATES and sim.gone_mode == "not_found"
        if space is None or gone or not _creator_active(sim, space):
            errors.append(_not_found(sim, "space", parameter, space_id))
        else:
            found.append(space)
    return found, errors


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


# --- X routes ---------------------------------------------------------------------------------

BodyBuilder = Callable[[SimState, Request, QueryParams], dict[str, Any]]


def _space_by_id(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    space_id = request.path_params["id"]
    query.matches("id", space_id, SPACE_ID_PATTERN)
    view = SpaceView.read(query)
    query.done()
    found, errors = _lookup_spaces(sim, [space_id], "id")
    return view.envelope(sim, found, errors, single=True)


def _spaces_lookup(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    ids = query.required_list("ids", SPACE_ID_PATTERN)
    view = SpaceView.read(query)
    query.done()
    found, errors = _lookup_spaces(sim, ids, "ids")
    return view.envelope(sim, found, errors)


def _spaces_by_creator(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    creators = set(query.required_list("user_ids", USER_ID_PATTERN))
    view = SpaceView.read(query)
    query.done()
    spaces = [
        s
        for s in sim.spaces.values()
        if s.creator_id in creators and s.state in VISIBLE_STATES and _creator_active(sim, s)
    ]
    return view.envelope(sim, spaces, meta=True)


def _spaces_search(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    text = query.text("query", 1, 2048)
    state = query.enum("state", ["live", "scheduled", "all"], "all")
    max_results = query.integer("max_results", 1, 100, 100)
    view = SpaceView.read(query)
    query.done()
    states = VISIBLE_STATES if state == "all" else (state,)
    needle = _fold(text)
    matches = [
        s
        for s in sim.spaces.values()
        if s.state in states and s.title and needle in _fold(s.title) and _creator_active(sim, s)
    ]
    matches.sort(key=lambda s: (s.state != "live", s.scheduled_start or s.started_at or s.created_at))
    return view.envelope(sim, matches[:max_results], meta=True)


def _read_user_params(query: QueryParams) -> list[str]:
    fields = query.enum_list("user.fields", USER_FIELDS)
    query.enum_list("expansions", USER_EXPANSIONS)
    query.enum_list("tweet.fields", TWEET_FIELDS)
    return fields


def _lookup_users(
    sim: SimState, usernames: list[str], parameter: str, fields: list[str], *, single: bool
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for username in usernames:
        user = sim.user_by_username(username, include_suspended=True)
        if user is None:
            errors.append(_not_found(sim, "user", parameter, username))
        elif user.suspended:
            errors.append(_suspended(sim, parameter, username))
        else:
            found.append(_user_object(user, fields))
    body: dict[str, Any] = {}
    if found:
        body["data"] = found[0] if single else found
    if errors:
        body["errors"] = errors
    return body


def _users_by(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    usernames = query.required_list("usernames", USERNAME_PATTERN)
    fields = _read_user_params(query)
    query.done()
    return _lookup_users(sim, usernames, "usernames", fields, single=False)


def _user_by_username(sim: SimState, request: Request, query: QueryParams) -> dict[str, Any]:
    username = request.path_params["username"]
    query.matches("username", username, USERNAME_PATTERN)
    fields = _read_user_params(query)
    query.done()
    return _lookup_users(sim, [username], "username", fields, single=True)


async def _answer(request: Request, endpoint: str, allowed: list[str], build: BodyBuilder) -> Response:
    sim: SimState = request.app.state.sim
    if request.headers.get("authorization") != f"Bearer {request.app.state.bearer_token}":
        headers = sim.peek_rate_limit(endpoint).headers()
        return JSONResponse(default_error_body(sim, 401), 401, headers, media_type=PROBLEM_JSON)
    if sim.terminal:
        return _terminal_response(sim, sim.peek_rate_limit(endpoint).headers())
    if endpoint == "spaces_by_creator" and not sim.hit_per_second_limit():
        headers = sim.peek_rate_limit(endpoint).headers()
        return JSONResponse(_plain_problem(429), 429, headers, media_type=PROBLEM_JSON)
    rate = sim.hit_rate_limit(endpoint)
    headers = rate.headers()
    if not rate.allowed:
        return JSONResponse(_plain_problem(429), 429, headers, media_type=PROBLEM_JSON)
    delay = sim.take_delay(endpoint)
    if delay > 0:
        await asyncio.sleep(delay)
    fault = sim.take_response_fault(endpoint)
    if fault is not None:
        body = fault.body if fault.body is not None else default_error_body(sim, fault.status)
        return JSONResponse(body, fault.status, headers, media_type=None if fault.status < 300 else PROBLEM_JSON)
    query = QueryParams(list(request.query_params.multi_items()), allowed)
    try:
        body = build(sim, request, query)
    except InvalidRequest as exc:
        return JSONResponse(_invalid_request_body(sim, exc.problems), 400, headers)
    return JSONResponse(body, 200, headers)


def _x_route(app: FastAPI, path: str, endpoint: str, allowed: list[str], build: BodyBuilder) -> None:
    async def route(request: Request) -> Response:
        response = await _answer(request, endpoint, allowed, build)
        request.app.state.sim.record(endpoint, list(request.query_params.multi_items()), response.status_code)
        return response

    app.add_api_route(path, route, methods=["GET"], include_in_schema=False, name=endpoint)


# --- admin API --------------------------------------------------------------------------------


class UserIn(BaseModel):
    username: str
    id: str | None = None
    name: str | None = None
    suspended: bool = False


class SuspendIn(BaseModel):
    suspended: bool = True


class SpaceIn(BaseModel):
    creator_id: str
    title: str | None = None
    scheduled_start: datetime | None = None
    state: Literal["scheduled", "live"] = "scheduled"
    id: str | None = Field(None, description="Generated in X's format (13 letters and digits) when absent.")
    lang: str | None = "en"
    host_ids: list[str] = []
    speaker_ids: list[str] = []
    invited_user_ids: list[str] = []
    is_ticketed: bool = False
    participant_count: int = 0


class SpaceUpdate(BaseModel):
    title: str | None = None
    lang: str | None = None
    host_ids: list[str] | None = None
    participant_count: int | None = None


class RescheduleIn(BaseModel):
    scheduled_start: datetime


class TimeIn(BaseModel):
    now: datetime | None = Field(None, description="Fix the simulated time here.")
    advance_seconds: float | None = Field(None, description="Move the simulated time (and fix it).")
    real: bool = Field(False, description="Follow real time again.")


class FaultIn(BaseModel):
    kind: Literal["response", "delay", "usage_capped", "credits"]
    endpoint: str = Field("*", description="* or one of " + ", ".join(ENDPOINTS))
    status: int = Field(503, description="kind=response: the status to answer.")
    body: dict[str, Any] | None = Field(None, description="kind=response: the body (default: X's for the status).")
    count: int | None = Field(1, description="How many responses; null: until cleared.")
    seconds: float = Field(0.0, description="kind=delay: seconds before answering.")
    period: str = Field("Monthly", description="kind=usage_capped: the cap's period.")


class ConfigIn(BaseModel):
    requests_per_window: int | None = Field(None, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    by_creator_per_second: int | None = Field(None, ge=1)
    gone_mode: Literal["state", "not_found"] | None = None
    problem_base: str | None = None


class PopulateIn(BaseModel):
    seed: int | None = None
    creators: int = Field(10, ge=0, le=10000)
    spaces_per_creator: int = Field(3, ge=0, le=100)
    soon: int = Field(0, ge=0, description="Spaces starting within soon_within_minutes.")
    soon_within_minutes: float = Field(30.0, gt=0)
    live_fraction: float = Field(0.1, ge=0, le=1)


def _space_json(space: SimSpace) -> dict[str, Any]:
    return to_json_dict(asdict(space))


def _add_admin_routes(app: FastAPI) -> None:
    def sim_of(request: Request) -> SimState:
        return request.app.state.sim

    @app.get("/_sim/state", tags=["sim"])
    async def dump(request: Request) -> dict[str, Any]:
        return sim_of(request).dump()

    @app.get("/_sim/requests", tags=["sim"])
    async def requests(request: Request) -> list[dict[str, Any]]:
        return [asdict(r) for r in sim_of(request).requests]

    @app.post("/_sim/reset", tags=["sim"])
    async def reset(request: Request) -> dict[str, Any]:
        sim_of(request).reset()
        return sim_of(request).dump()

    @app.post("/_sim/config", tags=["sim"])
    async def configure(request: Request, body: ConfigIn) -> dict[str, Any]:
        sim_of(request).configure(**body.model_dump())
        return sim_of(request).dump()["config"]

    @app.get("/_sim/time", tags=["sim"])
    async def get_time(request: Request) -> dict[str, Any]:
        return {"now": x_timestamp(sim_of(request).now())}

    @app.post("/_sim/time", tags=["sim"])
    async def set_time(request: Request, body: TimeIn) -> dict[str, Any]:
        sim = sim_of(request)
        if body.real:
            sim.use_real_time()
        if body.now is not None:
            sim.set_time(body.now)
        if body.advance_seconds is not None:
            sim.advance_time(body.advance_seconds)
        return {"now": x_timestamp(sim.now())}

    @app.post("/_sim/users", status_code=201, tags=["sim"])
    async def add_user(request: Request, body: UserIn) -> dict[str, Any]:
        user = sim_of(request).add_user(body.username, id=body.id, name=body.name, suspended=body.suspended)
        return to_json_dict(asdict(user))

    @app.post("/_sim/users/{user_id}/suspend", tags=["sim"])
    async def suspend_user(request: Request, user_id: str, body: SuspendIn) -> dict[str, Any]:
        return to_json_dict(asdict(sim_of(request).suspend_user(user_id, body.suspended)))

    @app.post("/_sim/spaces", status_code=201, tags=["sim"])
    async def add_space(request: Request, body: SpaceIn) -> dict[str, Any]:
        return _space_json(sim_of(request).add_space(**body.model_dump()))

    @app.patch("/_sim/spaces/{space_id}", tags=["sim"])
    async def update_space(request: Request, space_id: str, body: SpaceUpdate) -> dict[str, Any]:
        return _space_json(sim_of(request).update_space(space_id, **body.model_dump()))

    @app.post("/_sim/spaces/{space_id}/reschedule", tags=["sim"])
    async def reschedule(request: Request, space_id: str, body: RescheduleIn) -> dict[str, Any]:
        return _space_json(sim_of(request).reschedule(space_id, body.scheduled_start))

    @app.post("/_sim/spaces/{space_id}/{action}", tags=["sim"])
    async def transition(request: Request, space_id: str, action: Literal["cancel", "start", "end"]) -> dict[str, Any]:
        sim = sim_of(request)
        operation = {"cancel": sim.cancel, "start": sim.start, "end": sim.end}[action]
        return _space_json(operation(space_id))

    @app.delete("/_sim/spaces/{space_id}", status_code=204, tags=["sim"])
    async def delete_space(request: Request, space_id: str) -> Response:
        sim_of(request).delete(space_id)
        return Response(status_code=204)

    @app.post("/_sim/faults", tags=["sim"])
    async def set_fault(request: Request, body: FaultIn) -> dict[str, Any]:
        sim = sim_of(request)
        if body.kind == "response":
            if body.status < 300 and body.body is None:
                raise SimError("a 2xx response fault needs a body")
            sim.set_fault(body.status, count=body.count, endpoint=body.endpoint, body=body.body)
        elif body.kind == "delay":
            sim.set_delay(body.seconds, count=body.count, endpoint=body.endpoint)
        elif body.kind == "usage_capped":
            sim.set_usage_capped(body.period)
        else:
            sim.set_credits_depleted()
        return sim.dump()["faults"]

    @app.delete("/_sim/faults", tags=["sim"])
    async def clear_faults(request: Request) -> dict[str, Any]:
        sim_of(request).clear_faults()
        return sim_of(request).dump()["faults"]

    @app.post("/_sim/rate-limits/reset", tags=["sim"])
    async def reset_rate_limits(request: Request) -> dict[str, Any]:
        sim_of(request).reset_rate_limits()
        return {"ok": True}

    @app.post("/_sim/populate", tags=["sim"])
    async def populate(request: Request, body: PopulateIn) -> dict[str, Any]:
        users, spaces = sim_of(request).populate(**body.model_dump())
        return {"users": len(users), "spaces": len(spaces)}


# --- the app ----------------------------------------------------------------------------------


def create_sim_app(
    state: SimState | None = None,
    *,
    bearer_token: str = "sim-token",
    requests_per_window: int | None = None,
    window_seconds: float | None = None,
    by_creator_per_second: int | None = None,
    gone_mode: GoneMode | None = None,
    seed: int | None = None,
    seed_creators: int = 0,
    spaces_per_creator: int = 3,
    soon: int = 0,
    soon_within_minutes: float = 30.0,
) -> FastAPI:
    """The simulator as an ASGI app.

    Limits and gone_mode left as None keep the state's values (300 per 900 s, 1/s on by_creator, "state"
    for a new state). `seed_creators` > 0 fills the world with generated creators and their Spaces.
    """
    sim = state or SimState(seed=seed)
    sim.configure(
        requests_per_window=requests_per_window,
        window_seconds=window_seconds,
        by_creator_per_second=by_creator_per_second,
        gone_mode=gone_mode,
    )
    if seed_creators > 0:
        sim.populate(
            seed=seed,
            creators=seed_creators,
            spaces_per_creator=spaces_per_creator,
            soon=soon,
            soon_within_minutes=soon_within_minutes,
        )

    app = FastAPI(
        title="Spacebell X API simulator",
        docs_url="/_sim/docs",
        openapi_url="/_sim/openapi.json",
        redoc_url=None,
    )
    app.state.sim = sim
    app.state.bearer_token = bearer_token

    # /2/spaces/search must precede /2/spaces/{id}: "search" is a valid Space id.
    _x_route(app, "/2/spaces/search", "spaces_search", ["query", "state", "max_results", *SPACE_PARAMS], _spaces_search)
    _x_route(app, "/2/spaces/by/creator_ids", "spaces_by_creator", ["user_ids", *SPACE_PARAMS], _spaces_by_creator)
    _x_route(app, "/2/spaces", "spaces_lookup", ["ids", *SPACE_PARAMS], _spaces_lookup)
    _x_route(app, "/2/spaces/{id}", "space_by_id", SPACE_PARAMS, _space_by_id)
    _x_route(app, "/2/users/by", "users_by", ["usernames", *USER_PARAMS], _users_by)
    _x_route(app, "/2/users/by/username/{username}", "user_by_username", USER_PARAMS, _user_by_username)
    _add_admin_routes(app)

    @app.exception_handler(SimError)
    async def sim_error(request: Request, exc: SimError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/2/") and exc.status_code == 404:
            return JSONResponse({"errors": [{"message": "Sorry, that page does not exist", "code": 34}]}, 404)
        return JSONResponse({"detail": exc.detail}, exc.status_code, getattr(exc, "headers", None))

    return app
