"""The simulator runs for real under uvicorn on 127.0.0.1; tests talk to it with the real XClient.

The simulator and the client share one ManualClock, and the client's injected sleep advances that
clock instead of sleeping, so rate-limit waits and backoff cost no real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from app.core.clock import ManualClock
from app.x.client import XClient
from app.x.sim import RunningSim, SimState, create_sim_app, running_sim

from .helpers import START, TOKEN, RecordingSleep


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sleep(clock: ManualClock) -> RecordingSleep:
    return RecordingSleep(clock)


@pytest.fixture
def sim_state(clock: ManualClock) -> SimState:
    return SimState(clock=clock, seed=7)


@pytest.fixture
async def start_sim(sim_state: SimState) -> AsyncIterator[Callable[..., Awaitable[RunningSim]]]:
    """Start a simulator with create_sim_app(sim_state, **kwargs); stopped after the test."""
    stack: list[Any] = []

    async def start(**kwargs: Any) -> RunningSim:
        context = running_sim(create_sim_app(sim_state, **kwargs))
        stack.append(context)
        return await context.__aenter__()

    yield start
    for context in reversed(stack):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def sim(start_sim: Callable[..., Awaitable[RunningSim]]) -> RunningSim:
    return await start_sim()


@pytest.fixture
async def make_client(clock: ManualClock, sleep: RecordingSleep) -> AsyncIterator[Callable[..., XClient]]:
    clients: list[XClient] = []

    def make(base_url: str, token: str = TOKEN, **kwargs: Any) -> XClient:
        kwargs.setdefault("sleep", sleep)
        client = XClient(base_url, token, clock=clock, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def client(sim: RunningSim, make_client: Callable[..., XClient]) -> XClient:
    return make_client(sim.base_url)
