"""JSON responses serialized once, in pydantic-core's Rust encoder.

A route that returns one of these skips FastAPI's second pass (validating the returned object
against `response_model`, then `jsonable_encoder`), which cost more than the rest of a list request.
`response_model` stays on the route for the OpenAPI document; tests check the bodies against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic_core
from fastapi import Response


def json_bytes(content: Any) -> bytes:
    return pydantic_core.to_json(content)


def json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json_bytes(content), status_code=status_code, headers=headers, media_type="application/json")
