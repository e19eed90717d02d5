"""Background roles (discovery, dispatcher) share one small lifecycle so any process can host any of them."""

from __future__ import annotations

from typing import Any, Protocol


class Component(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def readiness(self) -> dict[str, Any]:
        """`{"ready": bool, ...details}` shown by /readyz."""
        ...
