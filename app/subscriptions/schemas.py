from __future__ import annotations

import re
import unicodedata
import zoneinfo
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator, model_validator

from app.core.events import DEFAULT_SUBSCRIPTION_EVENT_TYPES, EventType

USERNAME_RE = re.compile(r"^[A-Za-z0-9_]{1,15}$")
MAX_LEAD_MINUTES = 20160  # X schedules Spaces up to 14 days ahead

UserId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,19}$")]
LeadTime = Annotated[int, Field(ge=1, le=MAX_LEAD_MINUTES)]
LeadTimes = Annotated[list[LeadTime], Field(min_length=1, max_length=5)]


def normalize_keyword(keyword: str) -> str:
    """Case-insensitive, Unicode-aware form used for matching titles (NFKC, casefold, single spaces)."""
    return " ".join(unicodedata.normalize("NFKC", keyword).casefold().split())


def _dedupe_sorted(values: list[int]) -> list[int]:
    return sorted(set(values), reverse=True)


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"keyword": "python", "webhook_endpoint_id": "we_01jexample", "lead_times": [60, 15]},
                {"creator_username": "XDevelopers", "email": "ada@example.com", "lead_times": [15]},
            ]
        },
    )

    creator_id: UserId | None = Field(None, description="X user id of the Space creator.")
    creator_username: str | None = Field(None, description="X @username of the creator, resolved through X.")
    keyword: str | None = Field(None, description="Text matched in Space titles, case-insensitively (1–512 chars).")
    include_hosts: bool = Field(False, description="Creator subscriptions also match Spaces the user co-hosts.")
    webhook_endpoint_id: str | None = Field(None, max_length=40)
    email: EmailStr | None = Field(None, description="Address to mail; it must confirm before reminders go out.")
    email_timezone: str | None = Field(None, max_length=64, description="IANA zone for times in mail.")
    lead_times: LeadTimes = Field(default_factory=lambda: [15], description="Minutes before the start, 1–5 values.")
    event_types: list[EventType] = Field(
        default_factory=lambda: list(DEFAULT_SUBSCRIPTION_EVENT_TYPES), min_length=1, max_length=6
    )

    @field_validator("creator_username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().removeprefix("@")
        if not USERNAME_RE.match(value):
            raise ValueError("must match ^[A-Za-z0-9_]{1,15}$ (an optional leading @ is removed)")
        return value

    @field_validator("keyword")
    @classmethod
    def _keyword(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = " ".join(value.split())
        if not 1 <= len(value) <= 512:
            raise ValueError("must be 1 to 512 characters after trimming")
        return value

    @field_validator("email_timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None and value not in zoneinfo.available_timezones():
            raise ValueError("must be an IANA time zone such as Europe/Paris")
        return value

    @field_validator("lead_times")
    @classmethod
    def _leads(cls, value: list[int]) -> list[int]:
        return _dedupe_sorted(value)

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _exactly_one(self) -> SubscriptionCreate:
        targets = [n for n in ("creator_id", "creator_username", "keyword") if getattr(self, n) is not None]
        if len(targets) != 1:
            raise ValueError("give exactly one of creator_id, creator_username, keyword")
        channels = [n for n in ("webhook_endpoint_id", "email") if getattr(self, n) is not None]
        if len(channels) != 1:
            raise ValueError("give exactly one of webhook_endpoint_id, email")
        if self.include_hosts and self.keyword is not None:
            raise ValueError("include_hosts applies to creator subscriptions only")
        return self


class SubscriptionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"paused": True}, {"lead_times": [30]}]})

    lead_times: LeadTimes | None = None
    paused: bool | None = None
    event_types: list[EventType] | None = Field(None, min_length=1, max_length=6)
    include_hosts: bool | None = None

    @field_validator("lead_times")
    @classmethod
    def _leads(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else _dedupe_sorted(value)

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


class SubscriptionTarget(BaseModel):
    kind: Literal["creator", "keyword"]
    creator_id: str | None
    creator_username: str | None
    keyword: str | None
    include_hosts: bool
    status: str = Field(description="active, resolving, unknown_username or suspended.")
    status_detail: str | None


class SubscriptionDelivery(BaseModel):
    channel: Literal["webhook", "email"]
    webhook_endpoint_id: str | None
    email: str | None
    email_confirmed: bool | None


class SubscriptionOut(BaseModel):
    id: str
    target: SubscriptionTarget
    delivery: SubscriptionDelivery
    lead_times: list[int]
    event_types: list[str]
    paused: bool
    created_at: datetime
    updated_at: datetime
