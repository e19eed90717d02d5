"""What the drills share: a world of real rows, `spacebell` OS processes, and the checks of the outcome.

A drill seeds real Account / WebhookEndpoint / Subscription / Creator / Space / SpaceEvent rows and lets
the outbox fan them out into `notification` rows, exactly as discovery and the API would; then it runs
the dispatcher (in process, or as `spacebell worker` / `spacebell serve` processes) against a real
`WebhookReceiver` and checks, from the receiver's side and the database's side, that nothing was lost
and that every duplicate is recognisable as one (same `webhook-id`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from app.accounts.service import create_account
from app.core.db import Database
from app.core.events import ALL_EVENT_TYPES
from app.core.ids import new_id
from app.delivery.models import EmailRecipient, WebhookEndpoint
from app.delivery.outbox import ReminderOutbox
from app.delivery.service import new_webhook_secret
from app.spaces.models import Creator, Space, SpaceEvent
from app.subscriptions.models import Subscription
from tests.support.receivers import ReceivedWebhook, WebhookReceiver

CREATOR = "2244994945"
LEAD_MINUTES = 60


# ---------------------------------------------------------------------------------------------
# Waiting


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The world


@dataclass
class World:
    """What was seeded: the notification ids, and how to tell which notification a webhook body is for."""

    account_id: str
    notification_ids: set[str]
    # (subscription id, Space id) -> notification id: one reminder per pair (one lead time, revision 1)
    by_target: dict[tuple[str, str], str]
    endpoints: dict[str, WebhookEndpoint] = field(default_factory=dict)  # path -> endpoint
    recipients: list[EmailRecipient] = field(default_factory=list)
    due_at: datetime | None = None
    start: datetime | None = None
    space_ids: list[str] = field(default_factory=list)


async def seed_world(
    db: Database,
    now: datetime,
    *,
    spaces: int,
    subscriptions: int,
    receiver: WebhookReceiver | None = None,
    endpoints: int = 4,
    emails: Sequence[str] = (),
    confirmed: bool = True,
    due_in: timedelta = timedelta(seconds=-2),
    space_prefix: str = "1Drill",
    creator: str = CREATOR,
) -> World:
    """`spaces` Spaces of `creator`, `subscriptions` creator subscriptions spread over `endpoints`
    webhook endpoints of `receiver` (one path and secret each) and over the `emails` recipients;
    fanned out at `now` into one reminder per (subscription, Space), due at `now + due_in`.

    The Spaces start LEAD_MINUTES after the due time, so every reminder stays valid (not expired,
    not late) for the whole drill.
    """
    # Whole seconds: X (and its simulator) report start times to the second; discovery in a `serve`
    # process must see the same time, not a reschedule.
    start = (now + due_in + timedelta(minutes=LEAD_MINUTES)).replace(microsecond=0)
    async with db.write() as session:
        account_id = (await create_account(session, "drill", now)).account_id
        made_endpoints: dict[str, WebhookEndpoint] = {}
        if receiver is not None:
            for i in range(endpoints):
                path = f"/hook/{i}"
                endpoint = WebhookEndpoint(
                    id=new_id("we"), account_id=account_id, url=receiver.url_for(path), secret=new_webhook_secret(),
                    event_types=list(ALL_EVENT_TYPES), enabled=True, created_at=now, updated_at=now,
                )
                made_endpoints[path] = endpoint
                receiver.secrets[path] = endpoint.secret
            session.add_all(made_endpoints.values())
        recipients = [
            EmailRecipient(
                id=new_id("er"), account_id=account_id, address=address, timezone="UTC",
                confirmed_at=now if confirmed else None, created_at=now,
            )
            for address in emails
        ]
        session.add_all(recipients)
        targets: list[tuple[str | None, str | None]] = [(e.id, None) for e in made_endpoints.values()]
        targets += [(None, r.id) for r in recipients]
        assert targets, "a world needs webhook endpoints or email recipients"
        await session.flush()
        subs = []
        for i in range(subscriptions):
            endpoint_id, recipient_id = targets[i % len(targets)]
            subs.append(
                Subscription(
                    id=new_id("sub"), account_id=account_id, target_kind="creator", creator_id=creator,
                    include_hosts=False, target_status="active", webhook_endpoint_id=endpoint_id,
                    email_recipient_id=recipient_id, lead_times=[LEAD_MINUTES], event_types=["space.reminder"],
                    paused=False, created_at=now, updated_at=now,
                )
            )
        session.add_all(subs)
        if await session.get(Creator, creator) is None:
            name = f"Drill{creator[-6:]}"
            session.add(Creator(id=creator, username=name, username_lower=name.lower(), resolved_at=now))
        digits = 13 - len(space_prefix)  # X's Space ids: 13 letters and digits
        space_ids = [f"{space_prefix}{i:0{digits}d}" for i in range(spaces)]
        assert len(set(space_ids)) == spaces and all(len(sid) == 13 for sid in space_ids)
        session.add_all(
            Space(
                id=sid, creator_id=creator, title=f"Drill {i}", state="scheduled", scheduled_start=start,
                host_ids=[creator], first_seen_at=now, last_seen_at=now, revision=1, is_ticketed=False,
            )
            for i, sid in enumerate(space_ids)
        )
        await session.flush()
        session.add_all(
            SpaceEvent(space_id=sid, kind="space.scheduled", revision=1, occurred_at=now, scheduled_start=start)
            for sid in space_ids
        )
    outbox = ReminderOutbox()
    while True:
        async with db.write() as session:
            if await outbox.fan_out_events(session, now, limit=50) == 0:
                break
    by_target: dict[tuple[str, str], str] = {}
    async with db.session() as session:
        result = await session.execute(
            text("SELECT id, subscription_id, space_id, state, kind FROM notification WHERE account_id = :a"),
            {"a": account_id},
        )
        for nid, sub_id, space_id, state, kind in result:
            assert (state, kind) == ("pending", "space.reminder"), (nid, state, kind)
            by_target[(sub_id, space_id)] = nid
    assert len(by_target) == spaces * subscriptions, (len(by_target), spaces * subscriptions)
    return World(
        account_id, set(by_target.values()), by_target, made_endpoints, recipients,
        start - timedelta(minutes=LEAD_MINUTES), start, space_ids,
    )


# ---------------------------------------------------------------------------------------------
# Reading the outcome


async def state_counts(db: Database) -> Counter[str]:
    async with db.session() as session:
        rows = await session.execute(text("SELECT state, count(*) FROM notification GROUP BY state"))
        return Counter({state: int(n) for state, n in rows})


async def notification_rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.session() as session:
        result = await session.execute(
            text("SELECT id, state, attempts, last_error, delivered_at, lease_token FROM notification")
        )
        return {r.id: dict(r._mapping) for r in result}


async def attempt_log(db: Database) -> dict[str, list[tuple[int, str, int | None, str | None]]]:
    """notification id -> [(attempt, outcome, status code, error)] in insertion order."""
    async with db.session() as session:
        result = await session.execute(
            text("SELECT notification_id, attempt, outcome, status_code, error FROM delivery_attempt ORDER BY id")
        )
        log: dict[str, list[tuple[int, str, int | None, str | None]]] = defaultdict(list)
        for nid, attempt, outcome, code, error in result:
            log[nid].append((int(attempt), outcome, code, error))
        return log


@dataclass
class WebhookTally:
    requests: int
    distinct: int
    duplicates: int  # requests beyond the first per notification (not counting failed answers)
    per_id: Counter[str]


def check_webhooks(world: World, received: Sequence[ReceivedWebhook], *, delivered_only: bool = True) -> WebhookTally:
    """Every request verified; its webhook-id is the notification its body is about (so a duplicate
    carries the id of its original); every notification reached the receiver (answered 2xx)."""
    unverified = [r for r in received if not r.verified]
    assert not unverified, f"{len(unverified)} signatures did not verify, e.g. {unverified[0].verify_error}"
    wrong = []
    for r in received:
        data = r.json["data"]
        expected = world.by_target.get((data["subscription_id"], data["space"]["id"]))
        if r.webhook_id != expected:
            wrong.append((r.webhook_id, expected))
    assert not wrong, f"{len(wrong)} requests carry a webhook-id other than their notification's: {wrong[:5]}"
    ok = [r for r in received if 200 <= r.status < 300] if delivered_only else list(received)
    per_id = Counter(r.webhook_id for r in ok)
    missing = world.notification_ids - set(per_id)
    assert not missing, f"{len(missing)} notifications never reached the receiver, e.g. {sorted(missing)[:5]}"
    assert set(per_id) <= world.notification_ids
    return WebhookTally(len(ok), len(per_id), sum(n - 1 for n in per_id.values()), per_id)


def check_after_crashes(
    world: World,
    received: Sequence[ReceivedWebhook],
    rows: dict[str, dict[str, Any]],
    log: dict[str, list[tuple[int, str, int | None, str | None]]],
    orphaned: Sequence[set[str]],
) -> WebhookTally:
    """What every crash drill ends with: each webhook arrived (duplicates with their original's id),
    the rows a killed process held were delivered, a row sent n times was claimed at least n times,
    and every delivery has a delivered attempt in the log."""
    tally = check_webhooks(world, received)
    undelivered = [nid for nid in set().union(*orphaned) if rows[nid]["state"] != "delivered"]
    assert not undelivered, f"{len(undelivered)} rows a killed process held were not delivered: {undelivered[:5]}"
    for nid, n in tally.per_id.items():
        if n > 1:
            assert rows[nid]["attempts"] >= n, (nid, n, rows[nid])
    no_log = [nid for nid in world.notification_ids if not any(o == "delivered" for _a, o, _c, _e in log[nid])]
    assert not no_log, f"{len(no_log)} delivered notifications have no delivered attempt logged"
    return tally


# ---------------------------------------------------------------------------------------------
# `spacebell` processes


def spacebell_command() -> list[str]:
    script = Path(sys.executable).with_name("spacebell")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "app.cli"]


def process_env(**settings: Any) -> dict[str, str]:
    """The test's environment without any SPACEBELL_* of its own, plus these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPACEBELL_")}
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"SPACEBELL_{name.upper()}"] = str(value)
    return env


class SpacebellProcess:
    """One `spacebell <args>` OS process, restartable; each incarnation logs to its own file."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env)
        self.workdir = workdir  # also the cwd, so no stray .env is read
        self.proc: asyncio.subprocess.Process | None = None
        self.incarnation = 0
        self.log_path: Path | None = None
        self.pids: list[int] = []

    async def start(self) -> SpacebellProcess:
        assert self.proc is None or self.proc.returncode is not None, "already running"
        self.incarnation += 1
        self.log_path = self.workdir / f"{self.name}-{self.incarnation}.log"
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *spacebell_command(), *self.args, env=self.env, cwd=self.workdir,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )
        self.pids.append(self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    async def wait_for_log(self, needle: str, timeout: float = 30.0) -> None:
        async def seen() -> bool:
            if needle in self.log():
                return True
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before logging {needle!r}:\n{self.log()[-3000:]}"
                )
            return False

        await wait_until(seen, timeout=timeout, what=f"{self.name} to log {needle!r}")

    async def wait_healthy(self, base_url: str, timeout: float = 30.0) -> None:
        """Wait for `GET /healthz` to answer 200; fail at once, with the log, if the process exits."""
        import httpx

        async def healthy() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
                    return (await http.get(f"{base_url}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            await wait_until(healthy, timeout=timeout, what=f"{self.name} to answer {base_url}/healthz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()[-3000:]}") from None

    async def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is handed back, leases stay behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError(
                    f"{self.name} did not stop within {timeout}s of SIGTERM\n{self.log()[-3000:]}"
                ) from None
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def run_to_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        """For a process expected to stop by itself: its exit status and output."""
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"{self.name} kept running; output:\n{self.log()[-3000:]}") from None
        assert self.proc.returncode is not None
        return self.proc.returncode, self.log()

    async def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def rows_leased_by(db: Database, pid: int) -> set[str]:
    """Rows claimed (state sending) by the process with this pid: the dispatcher's owner is host:pid:random."""
    async with db.session() as session:
        result = await session.execute(
            text("SELECT id FROM notification WHERE state = 'sending' AND lease_owner LIKE :owner"),
            {"owner": f"%:{pid}:%"},
        )
        return {r[0] for r in result}
