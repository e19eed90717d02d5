"""Discovery as a hosted component: APScheduler 3 ticks, the leader lease decides who polls X.

APScheduler is only the clock tick (memory job store, one interval job, `max_instances=1`,
`coalesce=True`); what to poll and what changed lives in the database, so any number of processes may
tick and only the lease holder does the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from app.core.clock import Clock
from app.core.context import AppContext
from app.core.settings import Settings
from app.discovery import metrics
from app.discovery.job import CycleReport, LeaseLost, run_discovery_cycle
from app.discovery.lease import DISCOVERY_LEASE, acquire_lease, release_lease
from app.discovery.state import PollingStop, load_stop, spend_today
from app.x.client import XClient

log = logging.getLogger(__name__)

AfterCycle = Callable[[datetime], Awaitable[object]]


def x_client_from_settings(settings: Settings, clock: Clock) -> XClient:
    """The XClient discovery uses: X's 1/s by_creator spacing, and rate-limit waits kept short enough
    that a cycle never outlives the leader lease (the next cycle retries instead)."""
    if not settings.x_bearer_token:
        raise RuntimeError("SPACEBELL_X_BEARER_TOKEN is not set")
    return XClient(
        settings.x_api_base_url,
        settings.x_bearer_token,
        clock=clock,
        by_creator_min_interval=settings.x_by_creator_min_interval_seconds,
        max_rate_limit_wait=min(settings.discovery_interval_seconds, settings.leader_lease_seconds / 4),
    )


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class DiscoveryComponent:
    """Polls X on the leader; on every node, keeps the shared polling status fresh for /readyz.

    `client_factory=None` makes a watch-only component (for processes that serve the API but do not
    discover): it never takes the lease and only reports the status the leader saved.
    """

    name = "discovery"

    def __init__(
        self,
        ctx: AppContext,
        client_factory: Callable[[], XClient] | None,
        *,
        after_cycle: AfterCycle | None = None,
        owner: str | None = None,
        schedule: bool = True,
    ) -> None:
        self.ctx = ctx
        self.client_factory = client_factory
        self.after_cycle = after_cycle
        self.owner = owner or default_owner()
        self.schedule = schedule
        self.client: XClient | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.is_leader = False
        self.last_report: CycleReport | None = None
        self.last_tick_at: datetime | None = None
        self.last_error: str | None = None
        self.polling_stop: PollingStop | None = None
        self.spend_usd: float | None = None
        self._lock = asyncio.Lock()
        self._running: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        if self.client_factory is not None:
            self.client = self.client_factory()
        if not self.schedule:
            return
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=self.ctx.settings.discovery_interval_seconds, timezone=UTC),
            id="discovery",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()

    async def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        running = self._running
        if running is not None and not running.done():
            try:
                await asyncio.wait_for(asyncio.shield(running), timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                running.cancel()
            except Exception:
                pass
        if self.is_leader:
            try:
                async with self.ctx.db.write() as session:
                    await release_lease(session, DISCOVERY_LEASE, self.owner)
            except Exception:
                log.exception("releasing the discovery lease failed; it expires by itself")
            self.is_leader = False
            metrics.IS_LEADER.set(0)
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def tick(self) -> CycleReport | None:
        """One scheduler tick: take or renew the lease, run a cycle when leader, refresh the status."""
        async with self._lock:
            self._running = asyncio.current_task()
            now = self.ctx.clock.now()
            self.last_tick_at = now
            report: CycleReport | None = None
            try:
                if self.client is not None:
                    async with self.ctx.db.write() as session:
                        self.is_leader = await acquire_lease(
                            session, DISCOVERY_LEASE, self.owner, now, self.ctx.settings.leader_lease_seconds
                        )
                    if self.is_leader:
                        report = await run_discovery_cycle(self.ctx, self.client, now, lease_owner=self.owner)
                        self.last_report = report
                        await self._after_cycle(now)
                await self._refresh_status(now)
                self.last_error = None
            except LeaseLost as exc:
                log.warning("%s", exc)
                self.is_leader = False
            except Exception as exc:
                log.exception("discovery tick failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                metrics.IS_LEADER.set(1 if self.is_leader else 0)
                self._running = None
            return report

    async def _after_cycle(self, now: datetime) -> None:
        if self.after_cycle is None:
            return
        try:
            await self.after_cycle(now)
        except Exception:
            # The events are stored; the outbox picks them up on its next run.
            log.exception("after_cycle hook failed")

    async def _refresh_status(self, now: datetime) -> None:
        async with self.ctx.db.session() as session:
            self.polling_stop = await load_stop(session)
            self.spend_usd = await spend_today(session, self.ctx.settings, now)
        metrics.DAILY_SPEND.set(self.spend_usd)
        metrics.SPEND_CAP.set(self.ctx.settings.x_daily_spend_cap_usd)
        active = self.polling_stop is not None and now < self.polling_stop.resume_at
        metrics.set_polling_stopped(self.polling_stop.reason if active and self.polling_stop else None)

    def readiness(self) -> dict[str, Any]:
        stop = self.polling_stop
        state: dict[str, Any] = {
            "ready": not (stop is not None and stop.blocks_readiness),
            "leader": self.is_leader,
            "polling": "stopped" if stop is not None else "running",
            "spend_usd": self.spend_usd,
            "spend_cap_usd": self.ctx.settings.x_daily_spend_cap_usd,
            "last_tick_at": self.last_tick_at.isoformat() if self.last_tick_at else None,
        }
        if stop is not None:
            state["stopped_reason"] = stop.reason
            state["stopped_detail"] = stop.detail
            state["stopped_since"] = stop.since.isoformat()
            state["resumes_at"] = stop.resume_at.isoformat()
        report = self.last_report
        if report is not None:
            state["last_cycle_at"] = report.started_at.isoformat()
            state["last_cycle_errors"] = report.errors[:3]
            state["max_staleness_seconds"] = report.max_staleness_seconds
            state["staleness_bound_seconds"] = report.staleness_bound_seconds
        if self.last_error:
            state["last_error"] = self.last_error
        return state
