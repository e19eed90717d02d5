"""The event types a subscription or a webhook endpoint can ask for."""

from typing import Literal, get_args

EventType = Literal[
    "space.reminder",
    "space.scheduled",
    "space.rescheduled",
    "space.canceled",
    "space.started",
    "space.ended",
]
ALL_EVENT_TYPES: list[str] = list(get_args(EventType))
DEFAULT_SUBSCRIPTION_EVENT_TYPES: list[str] = ["space.reminder", "space.rescheduled", "space.canceled"]
