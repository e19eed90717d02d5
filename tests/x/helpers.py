"""Shared constants and helpers of the X client and simulator tests."""

from __future__ import annotations

from datetime import UTC, datetime

from app.core.clock import ManualClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TOKEN = "sim-token"


class RecordingSleep:
    """Records each requested wait and moves the shared clock by it instead of sleeping."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)
