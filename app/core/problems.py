"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://spacebell.dev/problems/"


class InvalidParam(BaseModel):
    name: str = Field(description="The field, as a dotted path (`body.lead_times.0`, `query.limit`).")
    reason: str


class Problem(BaseModel):
    type: str = Field(examples=[TYPE_BASE + "validation"])
    title: str = Field(examples=["Request body is invalid"])
    status: int = Field(examples=[422])
    detail: str | None = Field(None, examples=["body.keyword: String should have at most 512 characters"])
    instance: str | None = None
    invalid_params: list[InvalidParam] | None = None


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": title}
    for code, title in [
        (401, "Missing or invalid API key"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Request body too large"),
        (422, "Invalid request"),
        (429, "Too many requests"),
    ]
}


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        field: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.field = field
        self.reason = reason or detail or title
        self.headers = headers


def not_found(what: str) -> ProblemError:
    return ProblemError(404, "Not found", f"{what} not found", slug="not-found")


def invalid(field: str, reason: str) -> ProblemError:
    return ProblemError(422, "Request is invalid", f"{field}: {reason}", slug="validation", field=field, reason=reason)


def problem_response(
    status: int,
    title: str,
    detail: str | None,
    slug: str,
    *,
    instance: str | None = None,
    invalid_params: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": TYPE_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if invalid_params:
        body["invalid_params"] = invalid_params
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_BODY_PARSE_ERROR = "There was an error parsing the body"
_BODY_PARSE_REASONS: dict[type, str] = {
    UnicodeDecodeError: "is not valid UTF-8",
    RecursionError: "is nested too deeply",
}
NUL_REASON = "must not contain NUL (U+0000) characters"
SURROGATE_REASON = "must be valid Unicode text (it holds a lone surrogate code point)"


async def reject_unstorable_text(request: Request) -> None:
    """422 naming the field when a path, query or JSON body string holds text no database takes.

    PostgreSQL cannot store or compare text holding U+0000, and nobody means one. A lone surrogate
    (`"\\ud800"`, which JSON allows, or its UTF-8-like bytes, which Python's JSON reader lets
    through) cannot even be encoded as UTF-8 for either database. Refused here, the same on both
    databases, instead of failing in the driver with a 500.
    """
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            raise invalid(f"path.{name}", NUL_REASON)
    for name, value in request.query_params.multi_items():  # percent-decoding already replaced bad bytes
        if "\x00" in name or "\x00" in value:
            raise invalid("query" if "\x00" in name else f"query.{name}", NUL_REASON)
    body = await request.body()
    # Only an escape (`\u0000`, `\ud800`) or a 0xED byte (what encodes a surrogate) can carry either.
    if b"\\u" not in body and b"\xed" not in body:
        return
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: FastAPI reports that
    if (found := _bad_text(parsed)) is not None:
        raise invalid(*found)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return NUL_REASON
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_REASON
    return None


def _bad_text(document: Any) -> tuple[str, str] | None:
    """(dotted path such as `body.lead_times.0`, reason) of a string or key no database takes, or None.
    Iterative, as JSON may nest as deep as the parser allowed."""
    stack: list[tuple[str, Any]] = [("body", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if (reason := _text_problem(value)) is not None:
                return path, reason
        elif isinstance(value, dict):
            for key, item in value.items():
                if (reason := _text_problem(key)) is not None:
                    return path, f"field names {reason}"
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
    return None


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        params = [{"name": exc.field, "reason": exc.reason}] if exc.field else None
        return problem_response(
            exc.status, exc.title, exc.detail, exc.slug,
            instance=request.url.path, invalid_params=params, headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        params = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid"))
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            params.append({"name": _loc(err.get("loc", ())), "reason": msg})
        detail = "; ".join(f"{p['name']}: {p['reason']}" for p in params[:5])
        return problem_response(
            422, "Request is invalid", detail, "validation", instance=request.url.path, invalid_params=params
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
            # FastAPI's answer to a body json.loads fails on other than by JSONDecodeError (which it
            # reports as a 422): bytes that are not UTF-8, nesting deeper than the parser recurses.
            reason = _BODY_PARSE_REASONS.get(type(exc.__cause__), "could not be parsed as JSON")
            return problem_response(
                422, "Request is invalid", f"body: {reason}", "validation", instance=request.url.path,
                invalid_params=[{"name": "body", "reason": reason}],
            )
        title = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized"}.get(exc.status_code, "Error")
        return problem_response(
            exc.status_code, title, str(exc.detail), title.lower().replace(" ", "-"),
            instance=request.url.path, headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error", "The server failed; the error was logged.", "internal")


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413: by Content-Length, or, for a body sent without one
    (chunked), by reading it up to the limit before the app sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and not chunked:
            if length > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            # The HTTP server holds the client to its Content-Length.
            await self.app(scope, receive, send)
            return
        # No length: read the body up to the limit before the app runs. (Raising from receive() while
        # the app reads would not do: FastAPI turns any error during body parsing into a 400.)
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        buffered: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, "Request body too large", f"the body exceeds {self.max_bytes} bytes", "body-too-large"
        )
        await response(scope, receive, send)
