"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.field = field
        self.headers = headers


def not_found(what: str) -> ProblemError:
    return ProblemError(404, "Not found", f"{what} not found", slug="not-found")


def invalid(field: str, reason: str) -> ProblemError:
    return ProblemError(422, "Request is invalid", f"{field}: {reason}", slug="validation", field=field)


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


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        params = [{"name": exc.field, "reason": exc.detail or exc.title}] if exc.field else None
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
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, "Request body too large", f"the body exceeds {self.max_bytes} bytes", "body-too-large"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
