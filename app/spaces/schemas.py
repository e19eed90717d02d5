from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

SPACE_URL = "https://x.com/i/spaces/{id}"


class SpaceOut(BaseModel):
    id: str = Field(examples=["1DXxyRYNejbKM"])
    title: str | None
    state: str = Field(description="scheduled, live, ended or canceled (X may add others).")
    scheduled_start: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    creator_id: str
    creator_username: str | None = Field(description="As last seen from X; null until X has named the creator.")
    lang: str | None
    host_ids: list[str]
    url: str = Field(examples=["https://x.com/i/spaces/1DXxyRYNejbKM"])
    revision: int = Field(description="Rises each time the start time or the state changes.")
    first_seen_at: datetime
    last_seen_at: datetime
    matched_subscription_ids: list[str] = Field(description="Your subscriptions that want this Space.")


class SpaceEventOut(BaseModel):
    id: int
    space_id: str
    kind: str = Field(examples=["space.rescheduled"])
    revision: int
    occurred_at: datetime
    scheduled_start: datetime | None
    previous_scheduled_start: datetime | None = Field(description="For space.rescheduled: the start it moved from.")
