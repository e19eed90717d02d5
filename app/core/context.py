"""What a running process shares: settings, database, clock. Built once, passed everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.core.clock import Clock, SystemClock
from app.core.db import Database
from app.core.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    db: Database
    clock: Clock = field(default_factory=SystemClock)
    # Role components register here (discovery, dispatcher, ...) so the API can report on them.
    components: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock | None = None) -> AppContext:
        db = Database(settings.database_url, pool_size=settings.database_pool_size)
        return cls(settings=settings, db=db, clock=clock or SystemClock())
