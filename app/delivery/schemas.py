from __future__ import annotations

from datetime import datetime

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from app.core.events import ALL_EVENT_TYPES, EventType


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://hooks.example.com/spacebell", "event_types": ["space.reminder"]}]},
    )

    url: AnyHttpUrl = Field(description="Where to POST. https only unless the operator allows http.")
    event_types: list[EventType] = Field(
        default_factory=lambda: list(ALL_EVENT_TYPES), min_length=1, max_length=len(ALL_EVENT_TYPES),
        description="Event types this endpoint receives.",
    )
    description: str | None = Field(None, max_length=500)

    @field_validator("url")
    @classmethod
    def _url_length(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if len(str(value)) > 2048:
            raise ValueError("URL must be at most 2048 characters")
        return value

    _dedupe = field_validator("event_types")(classmethod(lambda cls, v: _unique(v)))


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_types: list[EventType] | None = Field(None, min_length=1, max_length=len(ALL_EVENT_TYPES))
    enabled: bool | None = Field(None, description="true re-enables an endpoint that was disabled.")

    _dedupe = field_validator("event_types")(classmethod(lambda cls, v: None if v is None else _unique(v)))


class WebhookEndpointOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpointOut):
    secret: str = Field(description="`whsec_…` signing secret. Shown only on creation and rotation.")
