"""The dispatcher: claims due outbox rows, fires each at its due time, sends, records results in batches.

Rows are claimed up to `dispatcher_lookahead_seconds` early under a lease and fired by an
in-process timer at their due time; the lease is the safety net if this process dies. No database
transaction is ever open across a send: claim (one statement), send, then record a whole batch of
results (one statement for the rows, one for the attempt log).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.context import AppContext
from app.delivery import dispatch_metrics as m
from app.delivery.email import SmtpSender, render_confirmation_email, render_reminder_email
from app.delivery.models import NotificationKind, NotificationState
from app.delivery.outbox import (
    AttemptRecord,
    ClaimedRow,
    Completion,
    EndpointOutcome,
    ReminderOutbox,
    SendContext,
    outbox_for,
    space_json_of,
    webhook_body,
    webhook_body_head,
)
from app.delivery.wake import OutboxListener, asyncpg_dsn, notify
from app.delivery.webhooks import WebhookSender

log = logging.getLogger(__name__)

S = NotificationState
FLUSH_DELAY_SECONDS = 0.1  # gather results up to this long into one write (a batching delay, not a due-time wait)
STOP_GRACE_SECONDS = 10.0
UnsubscribeUrl = Callable[[str, str | None], str]


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class DispatchReport:
    """What one `run_once` did, by final state of each claimed row."""

    fanned_out: int = 0
    claimed: int = 0
    sent: int = 0
    results: Counter[str] = field(default_factory=Counter)

    @property
    def delivered(self) -> int:
        return self.results[S.delivered]


@dataclass(slots=True)
class _Results:
    """Results taken from the buffers for one write, and what the write found."""

    completions: list[Completion]
    attempts: list[AttemptRecord]
    outcomes: list[EndpointOutcome]
    refused: list[Completion] = field(default_factory=list)
    disabled: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Job:
    row: ClaimedRow
    context: SendContext
    claim_no: int
    body: bytes | None = None


class Dispatcher:
    """A Component: `start()` runs the claim loop, the due-time timer and the result recorder."""

    name = "dispatcher"

    def __init__(
        self,
        ctx: AppContext,
        *,
        outbox: ReminderOutbox | None = None,
        webhook_sender: WebhookSender | None = None,
        smtp_sender: SmtpSender | None = None,
        owner: str | None = None,
        unsubscribe_url: UnsubscribeUrl | None = None,
    ) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.clock = ctx.clock
        self.outbox = outbox or outbox_for(ctx)
        self.owner = owner or default_owner()
        self.batch_size = settings.dispatcher_batch_size
        self.lookahead = timedelta(seconds=settings.dispatcher_lookahead_seconds)
        self.idle = timedelta(seconds=settings.dispatcher_idle_seconds)
        self.capacity = max(2 * self.batch_size, 2 * settings.dispatcher_concurrency)
        self.webhooks = webhook_sender or WebhookSender(
            timeout_seconds=settings.webhook_timeout_seconds,
            max_in_flight=settings.dispatcher_concurrency,
            max_response_bytes=settings.webhook_max_response_bytes,
            allow_http=settings.webhook_allow_http,
            allowed_networks=settings.webhook_allowed_networks,
        )
        self.smtp = smtp_sender or SmtpSender(
            settings.smtp_host,
            settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            tls=str(settings.smtp_tls),
            timeout=settings.smtp_timeout_seconds,
            max_connections=settings.dispatcher_email_concurrency,
        )
        self._unsubscribe_url = unsubscribe_url
        self._from = settings.smtp_from
        self._mail_domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2].lower() or "spacebell.local"

        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._timer_changed = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._timers: list[tuple[datetime, int, _Job]] = []
        self._seq = itertools.count()
        self._in_hand: dict[str, _Job] = {}  # claimed, not finished
        # A fixed pool of workers per channel takes fired rows from its queue: as many webhook
        # workers as requests allowed in flight, as many mail workers as SMTP connections.
        self._queues: dict[str, asyncio.Queue[tuple[_Job, datetime]]] = {
            "webhook": asyncio.Queue(),
            "email": asyncio.Queue(),
        }
        self._pool_sizes = {"webhook": settings.dispatcher_concurrency, "email": settings.dispatcher_email_concurrency}
        self._workers: list[asyncio.Task[None]] = []
        self._sending = 0  # fired rows not yet finished
        self._sends_done = asyncio.Event()
        self._sends_done.set()
        self._completions: list[Completion] = []
        self._attempts: list[AttemptRecord] = []
        self._endpoint_outcomes: dict[str, EndpointOutcome] = {}
        self._throttled: dict[str, datetime] = {}
        # Endpoint disabled by a result -> (reason, first claim number whose context read it from the
        # database; None until recorded). Rows claimed earlier carry stale endpoint facts.
        self._disabled: dict[str, tuple[str, int | None]] = {}
        self._claims = 0
        self._failing: set[str] = set()  # endpoints whose last result here was a failure
        self.totals: Counter[str] = Counter()  # final state (or retry/deferred) of every claimed row
        self._sent = 0
        self._result_metric: dict[tuple[str, str], Any] = {}
        self._tally: dict[tuple[str, str], int] = {}
        self._lateness_metric = {channel: m.lateness.labels(channel=channel) for channel in ("webhook", "email")}
        self._next_reclaim: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._senders_ready = False
        self._stopping = False
        self._fan_out_requested = True
        self._next_fan_out: datetime | None = None
        self._next_housekeeping: datetime | None = None
        self._flushing = 0  # result batches being written
        self._listen = settings.dispatcher_listen and not ctx.db.is_sqlite
        self.listener: OutboxListener | None = None
        self.last_cycle_at: datetime | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        await self._prepare()
        self.ctx.components[self.name] = self
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="dispatcher-claim"),
            asyncio.create_task(self._timer_loop(), name="dispatcher-timer"),
            asyncio.create_task(self._flush_loop(), name="dispatcher-flush"),
        ]
        if self._listen:
            # A NOTIFY only says "look now": the sender has fanned out its events or had none.
            self.listener = OutboxListener(asyncpg_dsn(self.ctx.db.url), self._wake.set)
            self.listener.start()

    async def stop(self) -> None:
        """Stop claiming; hand back rows not yet fired; let sends in flight finish; record; close."""
        self._stopping = True
        self._wake.set()
        if self.listener is not None:
            await self.listener.stop()
            self.listener = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        unfired = [job.row for _at, _seq, job in self._timers]
        self._timers.clear()
        for row in unfired:
            self._in_hand.pop(row.id, None)
        if unfired:
            try:
                async with self._write() as session:
                    await self.outbox.release(session, unfired, self.clock.now())
                    await notify(session, self.ctx)  # they are due within the lookahead: let other workers take them
            except Exception:
                log.exception("handing back %d claimed rows failed; their leases will expire", len(unfired))
        try:
            await asyncio.wait_for(self._sends_done.wait(), timeout=STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning("sends still in flight after %gs; their leases will expire", STOP_GRACE_SECONDS)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self._flush_all()
        if self.ctx.components.get(self.name) is self:
            del self.ctx.components[self.name]
        await self.webhooks.close()
        await self.smtp.close()
        self._senders_ready = False

    async def __aenter__(self) -> Dispatcher:
        await self._prepare()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def readiness(self) -> dict[str, Any]:
        alive = bool(self._tasks) and all(not t.done() for t in self._tasks)
        return {
            "ready": alive and self.last_error is None,
            "owner": self.owner,
            "in_hand": len(self._in_hand),
            "last_cycle_at": self.last_cycle_at.isoformat() if self.last_cycle_at else None,
            **({"listening": self.listener.connected.is_set()} if self.listener is not None else {}),
            **({"last_error": self.last_error} if self.last_error else {}),
        }

    def wake(self) -> None:
        """Look at the outbox (and fan out new Space events) now rather than at the next due time."""
        self._fan_out_requested = True
        self._wake.set()

    async def _prepare(self) -> None:
        if not self._senders_ready:
            await self.webhooks.start()
            if self._unsubscribe_url is None:
                self._unsubscribe_url = await _signed_unsubscribe_urls(self.ctx)
            self._senders_ready = True
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._send_worker(channel), name=f"dispatcher-{channel}-{i}")
                for channel, size in self._pool_sizes.items()
                for i in range(size)
            ]

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        # SQLite has one writer: queue our own transactions here instead of spinning in busy_timeout.
        if self.ctx.db.is_sqlite:
            async with self._write_lock, self.ctx.db.write() as session:
                yield session
        else:
            async with self.ctx.db.write() as session:
                yield session

    # ------------------------------------------------------------------------------------------
    # One pass, driven by the caller (tests, CLI)

    async def run_once(self, now: datetime | None = None) -> DispatchReport:
        """Fan out events, expire stale holds, then claim and send everything due at `now`; record it."""
        await self._prepare()
        now = now or self.clock.now()
        report = DispatchReport()
        totals_before, sent_before = Counter(self.totals), self._sent
        report.fanned_out = await self.fan_out(now)
        async with self._write() as session:
            await self.outbox.expire_held(session, now)
        reclaim = True
        while True:
            jobs = await self._claim(now, now, self.batch_size, reclaim=reclaim)
            reclaim = False
            report.claimed += len(jobs)
            for job in jobs:
                self._fire(job, now)
            await self._sends_done.wait()
            await self._flush_all(now)
            if len(jobs) < self.batch_size:
                break
        report.results = self.totals - totals_before
        report.sent = self._sent - sent_before
        return report

    async def fan_out(self, now: datetime | None = None) -> int:
        """Fan out every unprocessed Space event (in transactions of up to 200 events)."""
        now = now or self.clock.now()
        total = 0
        while True:
            async with self._write() as session:
                count = await self.outbox.fan_out_events(session, now)
                if count:
                    await notify(session, self.ctx)  # worker processes elsewhere share the new rows
            total += count
            if count < 200:
                return total

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every claimed row that is due has been sent and its result recorded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            now = self.clock.now()
            due_in_hand = any(at <= now for at, _s, _j in self._timers)
            if not (due_in_hand or self._sending or self._completions or self._flushing):
                return
            if loop.time() > deadline:
                raise TimeoutError("dispatcher did not settle")
            self._flush_needed.set()
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------------------------------
    # Background loops

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                now = self.clock.now()
                self.last_cycle_at = now
                await self._housekeeping(now)
                wake_at = now + self.idle
                if self.capacity - len(self._in_hand) >= self.batch_size:
                    reclaim = self._next_reclaim is None or now >= self._next_reclaim
                    if reclaim:
                        self._next_reclaim = now + min(self.idle, self.outbox.lease / 4)
                    jobs = await self._claim(
                        now, now + self.lookahead, self.batch_size, reclaim=reclaim, record=bool(self._completions)
                    )
                    for job in jobs:
                        self._schedule(job, now)
                    if len(jobs) == self.batch_size:
                        await asyncio.sleep(0)
                        continue
                    async with self.ctx.db.session() as session:
                        next_due = await self.outbox.next_due_at(session)
                    if next_due is not None:
                        wake_at = min(wake_at, max(now, next_due - self.lookahead))
                # else: hands are full; _finish() wakes us when a batch worth of room is free
                if self._in_hand and self._next_housekeeping is not None:
                    # Rows in hand need their leases renewed on time, however long the idle sleep.
                    wake_at = min(wake_at, max(now, self._next_housekeeping))
                self.last_error = None
                if wake_at > now:
                    await self.clock.sleep_until(wake_at, self._wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("dispatcher cycle failed")
                await asyncio.sleep(1.0)

    async def _housekeeping(self, now: datetime) -> None:
        if self._fan_out_requested or self._next_fan_out is None or now >= self._next_fan_out:
            self._fan_out_requested = False
            self._next_fan_out = now + self.idle
            await self.fan_out(now)
        if self._next_housekeeping is None or now >= self._next_housekeeping:
            self._next_housekeeping = now + min(self.idle, self.outbox.lease / 3)
            tokens = sorted({job.row.lease_token for job in self._in_hand.values()})
            async with self._write() as session:
                await self.outbox.expire_held(session, now)
                await self.outbox.extend_leases(session, tokens, now)
            async with self.ctx.db.session() as session:
                for state, count in (await self.outbox.depth(session)).items():
                    m.outbox_depth.labels(state=state).set(count)

    async def _timer_loop(self) -> None:
        """Fire claimed rows at their due time: one task sleeping until the earliest one."""
        while True:
            if not self._timers:
                self._timer_changed.clear()
                await self._timer_changed.wait()
                continue
            now = self.clock.now()
            first = self._timers[0][0]
            if first > now:
                self._timer_changed.clear()
                await self.clock.sleep_until(first, self._timer_changed)
                continue
            while self._timers and self._timers[0][0] <= now:
                _at, _seq, job = heapq.heappop(self._timers)
                self._fire(job, now)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_needed.wait()
            self._flush_needed.clear()
            if len(self._completions) < self.batch_size:
                await asyncio.sleep(FLUSH_DELAY_SECONDS)
            try:
                # One write of what has gathered; results that arrive during it set _flush_needed and
                # gather for the next one (writing until the buffers are empty would chase a busy
                # dispatcher with a transaction for every few results).
                await self._flush_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"recording results failed: {type(exc).__name__}: {exc}"
                log.exception("recording delivery results failed; retrying")
                await asyncio.sleep(1.0)
                self._flush_needed.set()

    # ------------------------------------------------------------------------------------------
    # Claim, fire, send

    async def _claim(
        self, now: datetime, horizon: datetime, limit: int, *, reclaim: bool, record: bool = False
    ) -> list[_Job]:
        """Claim a batch and read what sending it needs; with `record`, write buffered results in the
        same transaction (a busy dispatcher then pays for one transaction per batch, not two)."""
        claim_no = self._claims
        self._claims += 1
        taken = self._take_results() if record else None
        try:
            async with self._write() as session:
                if taken is not None:
                    await self._write_results(session, taken, now)
                batch = await self.outbox.claim_due(session, now, limit, self.owner, horizon=horizon, reclaim=reclaim)
                context = await self.outbox.load_context(session, batch.rows, batch.context) if batch.rows else None
        except BaseException:
            if taken is not None:
                self._restore_results(taken)
            raise
        if taken is not None:
            self._after_results(taken)
        if context is None:
            return []
        m.claimed.inc(len(batch.rows))
        space_json = {sid: space_json_of(facts) for sid, facts in context.spaces.items()}
        heads: dict[tuple[str, datetime, str | None], str] = {}
        jobs = []
        for row in batch.rows:
            job = _Job(row, context, claim_no)
            if row.channel == "webhook":
                key = (row.kind, row.due_at, row.space_id)
                head = heads.get(key)
                if head is None:
                    head = heads[key] = webhook_body_head(
                        row.kind, row.due_at, space_json.get(row.space_id or "") or _encode_id(row.space_id)
                    )
                job.body = webhook_body(row, head)
            self._in_hand[row.id] = job
            jobs.append(job)
        return jobs

    def _schedule(self, job: _Job, now: datetime) -> None:
        fire_at = job.row.next_attempt_at
        if fire_at <= now:
            self._fire(job, now)
            return
        first = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (fire_at, next(self._seq), job))
        if first is None or fire_at < first:
            self._timer_changed.set()

    def _fire(self, job: _Job, now: datetime) -> None:
        row = job.row
        endpoint_id = row.webhook_endpoint_id
        completion: Completion | None
        disabled = self._disabled.get(endpoint_id) if endpoint_id is not None else None
        if disabled is not None and (disabled[1] is None or job.claim_no < disabled[1]):
            completion = Completion(
                row.id, row.lease_token, S.failed, row.attempts - 1, f"webhook endpoint disabled: {disabled[0]}"
            )
        else:
            throttled = self._throttled.get(endpoint_id) if endpoint_id else None
            completion = self.outbox.check_before_send(row, job.context, now, throttled)
        if completion is not None:
            self._finish(job, completion)
            return
        self._sending += 1
        self._sends_done.clear()
        self._queues[row.channel].put_nowait((job, now))

    async def _send_worker(self, channel: str) -> None:
        queue = self._queues[channel]
        while True:
            job, fired_at = await queue.get()
            try:
                await self._send(job, fired_at)
            finally:
                self._sending -= 1
                if not self._sending:
                    self._sends_done.set()

    async def _send(self, job: _Job, sent_at: datetime) -> None:
        row = job.row
        self._lateness_metric[row.channel].observe(max(0.0, (sent_at - row.due_at).total_seconds()))
        try:
            if row.channel == "webhook":
                await self._send_webhook(job, sent_at)
            else:
                await self._send_email(job, sent_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not a delivery problem: keep the row, retry it later
            log.exception("sending notification %s failed unexpectedly", row.id, extra=_ids(row))
            error = f"internal error: {type(exc).__name__}: {exc}"
            self._finish(job, self.outbox.after_attempt(row, "retry", error, sent_at))

    async def _send_webhook(self, job: _Job, sent_at: datetime) -> None:
        row = job.row
        endpoint = job.context.endpoints[row.webhook_endpoint_id or ""]
        assert job.body is not None
        result = await self.webhooks.send(
            endpoint.url, endpoint.secret, msg_id=row.id, body=job.body, timestamp=sent_at
        )
        outcome = str(result.outcome)
        completion = self.outbox.after_attempt(row, outcome, result.error, sent_at, result.retry_after_seconds)
        attempt = AttemptRecord(
            row.id, row.attempts, sent_at, result.latency_ms, outcome, result.status_code, result.error,
            result.response_excerpt,
        )
        throttled_until = None
        if result.retry_after_seconds:
            throttled_until = sent_at + timedelta(seconds=result.retry_after_seconds)
            self._throttled[endpoint.id] = max(throttled_until, self._throttled.get(endpoint.id, throttled_until))
        disable_reason = result.error if result.disable_endpoint else None
        if disable_reason:
            self._disabled[endpoint.id] = (disable_reason, None)
        delivered = result.delivered
        if not delivered:
            m.endpoint_failures.labels(outcome=outcome).inc()
            log.info(
                "webhook attempt %d of %s: %s", row.attempts, row.id, result.error or outcome,
                extra=_ids(row) | {"endpoint_id": endpoint.id},
            )
        elif self._throttled and self._throttled.get(endpoint.id, sent_at) < sent_at:
            self._throttled.pop(endpoint.id, None)
        # A success only needs writing when it ends a failure streak or a throttle.
        was_failing = (
            endpoint.failing_since or endpoint.throttled_until or (self._failing and self._failed_recently(endpoint.id))
        )
        if not delivered or was_failing:
            self._endpoint_outcomes[endpoint.id] = EndpointOutcome(
                endpoint.id, sent_at, delivered, throttled_until, disable_reason
            )
            if not delivered:
                self._failing.add(endpoint.id)
        self._finish(job, completion, attempt)

    def _failed_recently(self, endpoint_id: str) -> bool:
        if endpoint_id in self._failing:
            self._failing.discard(endpoint_id)
            return True
        return False

    async def _send_email(self, job: _Job, sent_at: datetime) -> None:
        row, context = job.row, job.context
        recipient = context.recipients[row.email_recipient_id or ""]
        try:
            if row.kind == NotificationKind.confirmation:
                message = render_confirmation_email(
                    notification_id=row.id, to=recipient.address, from_addr=self._from,
                    confirm_url=str((row.payload or {})["confirm_url"]), list_id_domain=self._mail_domain, now=sent_at,
                )
            else:
                space = context.spaces.get(row.space_id or "")
                space_fields: dict[str, Any] = {"id": row.space_id}
                if space is not None:
                    space_fields.update(
                        title=space.title, scheduled_start=space.scheduled_start, started_at=space.started_at
                    )
                space_fields.update(row.payload or {})
                assert self._unsubscribe_url is not None
                message = render_reminder_email(
                    notification_id=row.id, to=recipient.address, from_addr=self._from, kind=row.kind,
                    space=space_fields, creator_username=(space.creator_username if space else None) or "",
                    lead_time_minutes=row.lead_time_minutes, reason=self._why(row, context),
                    unsubscribe_url=self._unsubscribe_url(recipient.id, row.subscription_id),
                    recipient_timezone=recipient.timezone, list_id_domain=self._mail_domain, now=sent_at,
                )
        except (KeyError, ValueError) as exc:
            error = f"message cannot be built: {exc}"
            log.warning("notification %s: %s", row.id, error, extra=_ids(row))
            attempt = AttemptRecord(row.id, row.attempts, sent_at, None, "failed", None, error)
            self._finish(job, self.outbox.after_attempt(row, "failed", error, sent_at), attempt)
            return
        result = await self.smtp.send(message)
        outcome = str(result.outcome)
        if not result.delivered:
            log.info("email attempt %d of %s: %s", row.attempts, row.id, result.error, extra=_ids(row))
        attempt = AttemptRecord(
            row.id, row.attempts, sent_at, result.latency_ms, outcome, result.code, result.error, result.response
        )
        self._finish(job, self.outbox.after_attempt(row, outcome, result.error, sent_at), attempt)

    @staticmethod
    def _why(row: ClaimedRow, context: SendContext) -> str:
        sub = context.subscriptions.get(row.subscription_id or "")
        if sub is None:
            return "you subscribed to reminders on Spacebell"
        if sub.keyword:
            return f"you asked Spacebell about Spaces matching \u201c{sub.keyword}\u201d"
        if sub.creator_username:
            return f"you follow @{sub.creator_username} on Spacebell"
        return "you follow this creator on Spacebell"

    def _finish(self, job: _Job, completion: Completion, attempt: AttemptRecord | None = None) -> None:
        row = job.row
        self._in_hand.pop(row.id, None)
        self._completions.append(completion)
        if attempt is not None:
            self._attempts.append(attempt)
            self._sent += 1
        result = completion.state
        if result == S.pending:
            result = "retry" if attempt is not None else "deferred"
        self.totals[result] += 1
        # Tallied here, added to the Prometheus counter once per batch of results (_take_results):
        # a counter increment takes a lock and checks, several times the cost of a dict update.
        key = (row.channel, result)
        self._tally[key] = self._tally.get(key, 0) + 1
        if completion.state in (S.failed, S.expired) and completion.reason:
            log.info("notification %s %s: %s", row.id, completion.state, completion.reason, extra=_ids(row))
        self._flush_needed.set()
        if len(self._in_hand) == self.capacity - self.batch_size:
            self._wake.set()

    def _count_results(self) -> None:
        tally, self._tally = self._tally, {}
        for (channel, result), count in tally.items():
            metric = self._result_metric.get((channel, result))
            if metric is None:
                metric = self._result_metric[(channel, result)] = m.deliveries.labels(channel=channel, result=result)
            metric.inc(count)

    def _take_results(self) -> _Results:
        self._count_results()
        taken = _Results(self._completions, self._attempts, list(self._endpoint_outcomes.values()))
        self._completions, self._attempts, self._endpoint_outcomes = [], [], {}
        self._flushing += 1
        return taken

    def _restore_results(self, taken: _Results) -> None:
        self._completions[:0] = taken.completions
        self._attempts[:0] = taken.attempts
        for outcome in taken.outcomes:
            self._endpoint_outcomes.setdefault(outcome.endpoint_id, outcome)
        self._flushing -= 1

    async def _write_results(self, session: AsyncSession, taken: _Results, now: datetime) -> None:
        done = await self.outbox.complete_and_log(session, taken.completions, taken.attempts, now)
        taken.disabled = await self.outbox.record_endpoint_outcomes(session, taken.outcomes, now)
        taken.refused = [c for c in taken.completions if c.id not in done]

    def _after_results(self, taken: _Results) -> None:
        self._flushing -= 1
        refused = taken.refused
        if refused:
            m.deliveries.labels(channel="any", result="refused").inc(len(refused))
            log.warning(
                "%d results refused: their lease had passed to another worker (e.g. %s)", len(refused), refused[0].id
            )
        for outcome in taken.outcomes:
            entry = self._disabled.get(outcome.endpoint_id)
            if outcome.disable_reason and entry is not None and entry[1] is None:
                self._disabled[outcome.endpoint_id] = (entry[0], self._claims)
        for endpoint_id, reason in taken.disabled:
            m.endpoints_disabled.inc()
            self._disabled[endpoint_id] = (reason, self._claims)
            log.warning("webhook endpoint disabled: %s", reason, extra={"endpoint_id": endpoint_id})

    async def _flush_all(self, now: datetime | None = None) -> None:
        while await self._flush_once(now):
            pass

    async def _flush_once(self, now: datetime | None = None) -> bool:
        """Write the buffered results in one transaction; False when there was nothing to write."""
        if not (self._completions or self._attempts or self._endpoint_outcomes):
            return False
        taken = self._take_results()
        try:
            async with self._write() as session:
                await self._write_results(session, taken, now or self.clock.now())
        except BaseException:
            self._restore_results(taken)
            raise
        self._after_results(taken)
        return True


def _encode_id(space_id: str | None) -> str:
    return json.dumps({"id": space_id})


def _ids(row: ClaimedRow) -> dict[str, Any]:
    return {
        "notification_id": row.id,
        "space_id": row.space_id,
        "endpoint_id": row.webhook_endpoint_id,
        "subscription_id": row.subscription_id,
        "account_id": row.account_id,
    }


async def _signed_unsubscribe_urls(ctx: AppContext) -> UnsubscribeUrl:
    """`{public_base_url}/v1/email/unsubscribe/<signed token>` for a recipient and subscription."""
    from app.core.secrets import link_signing_key
    from app.delivery.links import LinkClaim, sign_link

    key = await link_signing_key(ctx)
    base = ctx.settings.public_base_url

    def url(recipient_id: str, subscription_id: str | None) -> str:
        token = sign_link(key, LinkClaim("unsubscribe", recipient_id, subscription_id or "all"))
        return f"{base}/v1/email/unsubscribe/{token}"

    return url


def fan_out_hook(ctx: AppContext) -> Callable[[datetime], Any]:
    """For discovery's `after_cycle`: fan out the cycle's events at once, then poke a local dispatcher (or,
    on PostgreSQL, those of worker processes)."""

    async def after_cycle(now: datetime) -> None:
        dispatcher = ctx.components.get("dispatcher")
        if isinstance(dispatcher, Dispatcher):
            await dispatcher.fan_out(now)
            dispatcher.wake()
            return
        outbox = outbox_for(ctx)
        while True:
            async with ctx.db.write() as session:
                count = await outbox.fan_out_events(session, now)
                if count:
                    await notify(session, ctx)  # workers elsewhere: sent with this commit
            if count < 200:
                return

    return after_cycle
