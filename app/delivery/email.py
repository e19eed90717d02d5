"""Reminder and confirmation mail: content built from templates, sent through pooled aiosmtplib connections.

Everything that comes from X (titles, usernames) is treated as hostile: HTML-escaped in the HTML
part and flattened to one line wherever it lands in a header or a heading.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import ssl
import time
import unicodedata
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosmtplib

from app.delivery import metrics

if TYPE_CHECKING:
    from app.core.settings import Settings

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("templates")
X_SPACE_URL = "https://x.com/i/spaces/{id}"
MAX_TITLE_IN_SUBJECT = 80
UNTITLED = "Untitled Space"

_MESSAGE_ID_LEFT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$")
_USERNAME = re.compile(r"[^A-Za-z0-9_]")
# Bidi overrides/isolates can make a title render as something else; they never carry meaning here.
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"))


class ReminderKind(StrEnum):
    reminder = "space.reminder"
    scheduled = "space.scheduled"
    rescheduled = "space.rescheduled"
    canceled = "space.canceled"
    started = "space.started"


# ---------------------------------------------------------------------------------------------
# Content


@lru_cache
def _template(name: str) -> Template:
    return Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def one_line(text: str | None, max_chars: int | None = None) -> str:
    """Text safe for a header or heading: no control or bidi characters, whitespace collapsed."""
    if not text:
        return ""
    text = text.translate(_BIDI_CONTROLS)
    # Control characters go; format characters stay (ZWJ joins emoji sequences).
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    text = " ".join(text.split())
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text


def _as_datetime(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value)
    else:
        raise TypeError(f"expected a datetime or ISO 8601 string, got {type(value).__name__}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.info("unknown recipient time zone %r; showing UTC only", name)
        return None
    return None if name in ("UTC", "Etc/UTC", "Etc/GMT", "GMT", "Zulu", "Etc/Zulu") else zone


def format_time(moment: datetime, zone: ZoneInfo | None = None) -> str:
    """`Tue 6 Jan 2026, 18:00 UTC`, or in `zone`: `Tue 6 Jan 2026, 13:00 EST (America/New_York)`."""
    if zone is None:
        moment = moment.astimezone(UTC)
        return f"{moment:%a} {moment.day} {moment:%b %Y, %H:%M} UTC"
    local = moment.astimezone(zone)
    return f"{local:%a} {local.day} {local:%b %Y, %H:%M} {local.tzname()} ({zone.key})"


def humanize_minutes(minutes: int) -> str:
    """15 -> '15 minutes', 60 -> '1 hour', 90 -> '1 hour 30 minutes', 1440 -> '1 day'."""
    days, rest = divmod(max(0, int(minutes)), 1440)
    hours, mins = divmod(rest, 60)
    parts = [f"{n} {unit}{'' if n == 1 else 's'}" for n, unit in ((days, "day"), (hours, "hour"), (mins, "minute")) if n]
    return " ".join(parts) or "0 minutes"


def domain_of(address: str) -> str:
    """`Spacebell <reminders@spacebell.example>` -> `spacebell.example` (for list_id_domain)."""
    _name, addr = parseaddr(address)
    local, at, domain = addr.rpartition("@")
    domain = domain.lower()
    if not (local and at and _DOMAIN.match(domain)):
        raise ValueError(f"no domain in {address!r}")
    return domain


def _check_message_id_parts(notification_id: str, domain: str) -> None:
    if not _MESSAGE_ID_LEFT.match(notification_id):
        raise ValueError(f"notification id {notification_id!r} cannot be used in a Message-ID")
    if not _DOMAIN.match(domain):
        raise ValueError(f"{domain!r} is not a domain name")


def _check_link(url: str, what: str) -> None:
    if not url.startswith(("https://", "http://")) or any(ch.isspace() or ch in '<>"' for ch in url):
        raise ValueError(f"{what} must be an http(s) URL without spaces, quotes or angle brackets")


def _base_message(
    *, notification_id: str, to: str, from_addr: str, subject: str, domain: str, now: datetime | None
) -> EmailMessage:
    _check_message_id_parts(notification_id, domain)
    message = EmailMessage()
    message["From"] = from_addr
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime((now or datetime.now(UTC)).astimezone(UTC))
    # Stable across retries, so a resend after a lost "250" reply is recognisably the same mail.
    message["Message-ID"] = f"<{notification_id}@{domain}>"
    message["Auto-Submitted"] = "auto-generated"
    return message


@dataclass(frozen=True, slots=True)
class _KindText:
    subject: str
    headline: str
    time_label: str
    link_label: str | None  # None: no join link (a canceled Space has nothing to join)


def _kind_text(kind: ReminderKind, title: str, creator: str, lead_time_minutes: int) -> _KindText:
    short_title = one_line(title, MAX_TITLE_IN_SUBJECT)
    if kind is ReminderKind.reminder:
        when = f"in {humanize_minutes(lead_time_minutes)}" if lead_time_minutes > 0 else "now"
        return _KindText(f"Starts {when}: {short_title}", f"Starts {when}", "Starts", "Join the Space")
    if kind is ReminderKind.scheduled:
        return _KindText(
            f"Scheduled by @{creator}: {short_title}", f"@{creator} scheduled a Space", "Starts", "Open the Space"
        )
    if kind is ReminderKind.rescheduled:
        return _KindText(
            f"Rescheduled: {short_title}", f"@{creator} moved a Space to a new time", "Now starts", "Open the Space"
        )
    if kind is ReminderKind.canceled:
        return _KindText(f"Canceled: {short_title}", f"@{creator} canceled a Space", "Was scheduled for", None)
    return _KindText(f"Live now: {short_title}", f"@{creator} is live now", "Started", "Join now")


def _time_entries(kind: ReminderKind, space: dict[str, Any], label: str) -> list[tuple[str, datetime]]:
    scheduled = _as_datetime(space.get("scheduled_start"))
    started = _as_datetime(space.get("started_at"))
    previous = _as_datetime(space.get("previous_scheduled_start"))
    main = (started or scheduled) if kind is ReminderKind.started else scheduled
    entries: list[tuple[str, datetime]] = []
    if main is not None:
        entries.append((label, main))
    if kind is ReminderKind.rescheduled and previous is not None:
        entries.append(("Was", previous))
    return entries


def render_reminder_email(
    *,
    notification_id: str,
    to: str,
    from_addr: str,
    kind: str,
    space: dict[str, Any],
    creator_username: str,
    lead_time_minutes: int,
    reason: str,
    unsubscribe_url: str,
    recipient_timezone: str | None,
    list_id_domain: str,
    now: datetime | None = None,
) -> EmailMessage:
    """A reminder or Space-change mail: text part, then HTML part, with RFC 8058 one-click unsubscribe.

    `space` holds `id` and optionally `title`, `scheduled_start`, `started_at` and (for
    reschedules) `previous_scheduled_start`; times are aware datetimes or ISO 8601 strings.
    `reason` finishes the sentence "Why you got this: …" (e.g. "you follow @jack on Spacebell").
    `list_id_domain` is our mail domain, used in List-Id and Message-ID.
    """
    reminder_kind = ReminderKind(kind)
    _check_link(unsubscribe_url, "unsubscribe_url")
    space_id = str(space["id"])
    title = one_line(space.get("title")) or UNTITLED
    creator = _USERNAME.sub("", creator_username or "")[:15] or "unknown"
    text = _kind_text(reminder_kind, title, creator, lead_time_minutes)
    join_url = X_SPACE_URL.format(id=quote(space_id, safe=""))
    zone = _zone(recipient_timezone)
    reason_text = one_line(reason).rstrip(".") or "you subscribed to reminders on Spacebell"

    time_text_lines: list[str] = []
    time_html_rows: list[str] = []
    for label, moment in _time_entries(reminder_kind, space, text.time_label):
        shown = [format_time(moment)] + ([format_time(moment, zone)] if zone else [])
        time_text_lines.append(f"{label}: {shown[0]}")
        time_text_lines.extend(" " * (len(label) + 2) + extra for extra in shown[1:])
        time_html_rows.append(
            f'<tr><td style="padding:2px 12px 2px 0;color:#536471;vertical-align:top;">{html.escape(label)}</td>'
            f'<td style="padding:2px 0;">{"<br>".join(html.escape(t) for t in shown)}</td></tr>'
        )

    if text.link_label:
        link_line = f"{text.link_label}: {join_url}"
        link_block = (
            f'<p style="margin:0;"><a href="{html.escape(join_url)}" style="display:inline-block;background:#1d9bf0;'
            f'color:#ffffff;text-decoration:none;padding:10px 20px;border-radius:18px;font-weight:bold;">'
            f"{html.escape(text.link_label)}</a></p>"
        )
    else:
        link_line = ""
        link_block = ""

    plain = _template("reminder.txt").substitute(
        headline=text.headline,
        title=title,
        creator_username=creator,
        time_lines="\n".join(time_text_lines),
        link_line=link_line,
        reason=reason_text,
        unsubscribe_url=unsubscribe_url,
    )
    rich = _template("reminder.html").substitute(
        subject=html.escape(text.subject),
        headline=html.escape(text.headline),
        title=html.escape(title),
        creator_username=html.escape(creator),
        time_rows="\n".join(time_html_rows),
        link_block=link_block,
        reason=html.escape(reason_text),
        unsubscribe_url=html.escape(unsubscribe_url),
    )

    message = _base_message(
        notification_id=notification_id,
        to=to,
        from_addr=from_addr,
        subject=text.subject,
        domain=list_id_domain,
        now=now,
    )
    message["List-Id"] = f"Spacebell reminders <reminders.{list_id_domain}>"
    message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
    if unsubscribe_url.startswith("https://"):
        # RFC 8058 one-click needs an HTTPS URI; plain-http (local demo) keeps the link only.
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(_collapse_blank_lines(plain))
    message.add_alternative(rich, subtype="html")
    return message


def render_confirmation_email(
    *,
    notification_id: str,
    to: str,
    from_addr: str,
    confirm_url: str,
    list_id_domain: str,
    now: datetime | None = None,
) -> EmailMessage:
    """The double-opt-in mail. It carries only our fixed text and the link: nothing a requester typed."""
    _check_link(confirm_url, "confirm_url")
    plain = _template("confirmation.txt").substitute(confirm_url=confirm_url)
    rich = _template("confirmation.html").substitute(confirm_url=html.escape(confirm_url))
    message = _base_message(
        notification_id=notification_id,
        to=to,
        from_addr=from_addr,
        subject="Please confirm your email address for Spacebell reminders",
        domain=list_id_domain,
        now=now,
    )
    message.set_content(plain)
    message.add_alternative(rich, subtype="html")
    return message


def _collapse_blank_lines(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text)


# ---------------------------------------------------------------------------------------------
# Sending


class EmailOutcome(StrEnum):
    delivered = "delivered"
    retry = "retry"
    failed = "failed"


@dataclass(frozen=True, slots=True)
class EmailResult:
    outcome: EmailOutcome
    code: int | None
    error: str | None
    latency_ms: float
    response: str | None = None  # the server's final reply on success (often carries a queue id)

    @property
    def delivered(self) -> bool:
        return self.outcome is EmailOutcome.delivered


@dataclass(slots=True)
class _Connection:
    client: aiosmtplib.SMTP
    last_used: float


def classify_smtp_error(exc: BaseException) -> tuple[EmailOutcome, int | None, str]:
    """Map an aiosmtplib/OS error to (outcome, SMTP code, message): 5xx about the message is final."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        permanent = bool(codes) and all(code >= 500 for code in codes)
        code = codes[0] if codes else None
        return (EmailOutcome.failed if permanent else EmailOutcome.retry), code, f"recipient refused: {detail}"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        # Our credentials, not this message: keep it for when the operator fixes the setting.
        return EmailOutcome.retry, exc.code, f"SMTP authentication failed: {exc.code} {exc.message}"
    if isinstance(exc, (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError)):
        return EmailOutcome.retry, exc.code, f"SMTP server refused the session: {exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 530:
        # "Authentication required" / "Must issue STARTTLS first": our settings, not this message.
        return EmailOutcome.retry, exc.code, f"SMTP server requires authentication or TLS: {exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        stage = {
            aiosmtplib.SMTPSenderRefused: "sender refused",
            aiosmtplib.SMTPDataError: "message refused",
        }.get(type(exc), "SMTP error")
        outcome = EmailOutcome.failed if exc.code >= 500 else EmailOutcome.retry
        return outcome, exc.code, f"{stage}: {exc.code} {exc.message}"
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return EmailOutcome.retry, None, f"SMTP timed out: {exc}"
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected)):
        return EmailOutcome.retry, None, f"SMTP connection failed: {exc}"
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return EmailOutcome.retry, None, f"SMTP server lacks a needed feature: {exc}"
    if isinstance(exc, OSError):
        return EmailOutcome.retry, None, f"SMTP connection failed: {exc}"
    if isinstance(exc, aiosmtplib.SMTPException):
        return EmailOutcome.retry, None, f"SMTP error: {exc}"
    if isinstance(exc, ValueError):  # aiosmtplib refuses addresses it cannot send safely
        return EmailOutcome.failed, None, f"message cannot be sent: {exc}"
    return EmailOutcome.retry, None, f"unexpected error: {exc!r}"


def _connection_survives(exc: BaseException) -> bool:
    """After a reply error aiosmtplib has RSET the envelope; the session is fine unless the server said 421."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code != 421 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421


class SmtpSender:
    """Sends mail over a small pool of connected aiosmtplib clients, reusing them between messages."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: str = "none",
        timeout: float = 30.0,
        max_connections: int = 4,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        idle_check_seconds: float = 10.0,
    ) -> None:
        """`tls`: "none" (plain, even if STARTTLS is offered), "starttls" (required) or "implicit" (port 465).
        A connection idle longer than `idle_check_seconds` is probed with NOOP before reuse."""
        tls = str(tls)
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError("tls must be none, starttls or implicit")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = host
        self.port = port
        self.tls = tls
        self.timeout = timeout
        self.max_connections = max_connections
        self._username = username
        self._password = password
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._idle_check_seconds = idle_check_seconds
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False
        self.connections_opened = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SmtpSender:
        options: dict[str, Any] = {
            "username": settings.smtp_username,
            "password": settings.smtp_password,
            "tls": str(settings.smtp_tls),
            "timeout": settings.smtp_timeout_seconds,
            "max_connections": settings.dispatcher_email_concurrency,
        }
        return cls(settings.smtp_host, settings.smtp_port, **(options | overrides))

    async def start(self) -> None:
        """Nothing to do: connections open on first use. Present so both senders start the same way."""
        if self._closed:
            raise RuntimeError("SmtpSender is closed")

    async def send(self, message: EmailMessage) -> EmailResult:
        """Submit one message; never raises for delivery problems."""
        if self._closed:
            raise RuntimeError("SmtpSender is closed")
        async with self._slots:
            started = time.perf_counter()
            result = await self._send(message)
            result = replace(result, latency_ms=(time.perf_counter() - started) * 1000.0)
        metrics.record_email_attempt(result.outcome, result.latency_ms)
        return result

    async def _send(self, message: EmailMessage) -> EmailResult:
        connection: _Connection | None = None
        try:
            connection, reused = await self._checkout()
            try:
                errors, response = await connection.client.send_message(message)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                if not reused:
                    raise
                # The pooled connection died while idle (server timeout or restart): one fresh try.
                self._discard(connection)
                connection = await self._open()
                errors, response = await connection.client.send_message(message)
        except asyncio.CancelledError:
            if connection is not None:
                self._discard(connection)  # mid-conversation: the session state is unknown
            raise
        except Exception as exc:  # noqa: BLE001 — every failure becomes an outcome
            outcome, code, error = classify_smtp_error(exc)
            if connection is not None:
                if _connection_survives(exc) and connection.client.is_connected:
                    self._checkin(connection)
                else:
                    self._discard(connection)
            log.info("smtp send %s: %s", outcome, error)
            return EmailResult(outcome, code, error, 0.0)
        self._checkin(connection)
        refused = "; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in errors.items())
        return EmailResult(
            EmailOutcome.delivered, 250, f"some recipients refused: {refused}" if refused else None, 0.0, response
        )

    async def _checkout(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if not connection.client.is_connected:
                self._discard(connection)
                continue
            if time.monotonic() - connection.last_used > self._idle_check_seconds:
                try:
                    await connection.client.noop()
                except (aiosmtplib.SMTPException, OSError):
                    self._discard(connection)
                    continue
            return connection, True
        return await self._open(), False

    async def _open(self) -> _Connection:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            use_tls=self.tls == "implicit",
            start_tls=self.tls == "starttls",
            tls_context=self._tls_context,
            timeout=self.timeout,
            local_hostname=self._local_hostname,
        )
        await client.connect()
        self.connections_opened += 1
        metrics.smtp_connections_opened.inc()
        return _Connection(client, time.monotonic())

    def _checkin(self, connection: _Connection) -> None:
        if self._closed or not connection.client.is_connected:
            self._discard(connection)
            return
        connection.last_used = time.monotonic()
        self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.client.close()

    async def close(self) -> None:
        """QUIT every idle connection; connections in use close when their send finishes."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            try:
                await asyncio.wait_for(connection.client.quit(), timeout=min(self.timeout, 5.0))
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                connection.client.close()

    async def __aenter__(self) -> SmtpSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
