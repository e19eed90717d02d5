"""Reminder mail content and SmtpSender against a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from app.core.settings import load_settings
from app.delivery.email import (
    EmailOutcome,
    domain_of,
    SmtpSender,
    format_time,
    humanize_minutes,
    one_line,
    render_confirmation_email,
    render_reminder_email,
)
from tests.support.receivers import (
    SmtpCapture,
    client_ssl_context,
    free_port,
    make_tls_files,
    server_ssl_context,
)

START = datetime(2026, 1, 6, 18, 0, tzinfo=UTC)
FROM = "Spacebell <reminders@spacebell.example>"
UNSUBSCRIBE = "https://spacebell.example/u/opaque-token-123"


def reminder(**overrides: Any) -> EmailMessage:
    space = {"id": "1DXxyRYNejbKM", "title": "Rust & coffee ☕", "scheduled_start": START}
    space.update(overrides.pop("space", {}))
    arguments: dict[str, Any] = {
        "notification_id": "ntf_01jabc",
        "to": "listener@example.com",
        "from_addr": FROM,
        "kind": "space.reminder",
        "space": space,
        "creator_username": "jack",
        "lead_time_minutes": 15,
        "reason": "you follow @jack on Spacebell",
        "unsubscribe_url": UNSUBSCRIBE,
        "recipient_timezone": None,
        "list_id_domain": "spacebell.example",
    }
    arguments.update(overrides)
    return render_reminder_email(**arguments)


def parts(message: EmailMessage) -> tuple[str, str]:
    """The text and HTML bodies, after a full serialise/parse round trip."""
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    text = parsed.get_body(("plain",))
    rich = parsed.get_body(("html",))
    assert text is not None and rich is not None
    return text.get_content(), rich.get_content()


# --- content ------------------------------------------------------------------------------------------


def test_reminder_is_multipart_alternative_text_then_html() -> None:
    message = reminder()
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    text, rich = parts(message)
    for body in (text, rich):
        assert "Rust &" in body and "@jack" in body
        assert "https://x.com/i/spaces/1DXxyRYNejbKM" in body
        assert "Tue 6 Jan 2026, 18:00 UTC" in body
        assert "you follow @jack on Spacebell" in body
        assert UNSUBSCRIBE in body
    assert "Starts in 15 minutes" in text


def test_reminder_headers() -> None:
    message = reminder(now=datetime(2026, 1, 6, 17, 45, tzinfo=UTC))
    assert message["Subject"] == "Starts in 15 minutes: Rust & coffee ☕"
    assert message["From"] == FROM and message["To"] == "listener@example.com"
    assert message["Message-ID"] == "<ntf_01jabc@spacebell.example>"
    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["List-Id"] == "Spacebell reminders <reminders.spacebell.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Date"] == "Tue, 06 Jan 2026 17:45:00 +0000"


def test_message_id_is_stable_across_retries_and_differs_per_notification() -> None:
    first = reminder(now=START - timedelta(minutes=15))
    retry = reminder(now=START - timedelta(minutes=14))
    other = reminder(notification_id="ntf_01jother")
    assert first["Message-ID"] == retry["Message-ID"] == "<ntf_01jabc@spacebell.example>"
    assert other["Message-ID"] == "<ntf_01jother@spacebell.example>"
    with pytest.raises(ValueError, match="Message-ID"):
        reminder(notification_id="bad id>")


def test_html_escapes_everything_from_x() -> None:
    message = reminder(space={"title": '<script>alert("x")</script> & <img src=x onerror=1>'}, creator_username="<b>jack")
    text, rich = parts(message)
    assert "<script>" not in rich and "<img" not in rich
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=1&gt;" in rich
    assert '<script>alert("x")</script>' in text  # plain text shows it literally, harmlessly
    assert "@bjack" in rich and "<b>" not in rich.replace("<br>", "")


def test_title_cannot_inject_headers_or_spoof_direction() -> None:
    message = reminder(space={"title": "Hi\r\nBcc: victim@example.com\u202egnp.exe"})
    assert message["Bcc"] is None
    assert message["Subject"] == "Starts in 15 minutes: Hi Bcc: victim@example.comgnp.exe"
    assert one_line("a\x00b\u2028c  d") == "a b c d"
    assert one_line("x" * 100, 10) == "x" * 9 + "…"
    assert one_line("👨\u200d👩\u200d👧") == "👨\u200d👩\u200d👧"  # ZWJ sequences survive


def test_missing_title_and_lead_time_wording() -> None:
    assert reminder(space={"title": None})["Subject"] == "Starts in 15 minutes: Untitled Space"
    assert reminder(lead_time_minutes=60)["Subject"].startswith("Starts in 1 hour:")
    assert reminder(lead_time_minutes=0)["Subject"].startswith("Starts now:")
    assert [humanize_minutes(m) for m in (1, 15, 90, 1440, 1501)] == [
        "1 minute", "15 minutes", "1 hour 30 minutes", "1 day", "1 day 1 hour 1 minute",
    ]


def test_start_time_in_the_recipients_time_zone() -> None:
    text, rich = parts(reminder(recipient_timezone="America/New_York"))
    for body in (text, rich):
        assert "Tue 6 Jan 2026, 18:00 UTC" in body
        assert "Tue 6 Jan 2026, 13:00 EST (America/New_York)" in body
    text, _ = parts(reminder(recipient_timezone="Asia/Kolkata", space={"scheduled_start": "2026-07-01T18:00:00Z"}))
    assert "Wed 1 Jul 2026, 23:30 IST (Asia/Kolkata)" in text
    text, _ = parts(reminder(recipient_timezone="Mars/Olympus_Mons"))
    assert "18:00 UTC" in text and "(Mars" not in text


def test_format_time_crosses_the_date_line() -> None:
    from zoneinfo import ZoneInfo

    assert format_time(START, ZoneInfo("Pacific/Auckland")) == "Wed 7 Jan 2026, 07:00 NZDT (Pacific/Auckland)"


@pytest.mark.parametrize(
    ("kind", "subject", "has_join_link"),
    [
        ("space.reminder", "Starts in 15 minutes: Rust & coffee ☕", True),
        ("space.scheduled", "Scheduled by @jack: Rust & coffee ☕", True),
        ("space.rescheduled", "Rescheduled: Rust & coffee ☕", True),
        ("space.canceled", "Canceled: Rust & coffee ☕", False),
        ("space.started", "Live now: Rust & coffee ☕", True),
    ],
)
def test_each_kind(kind: str, subject: str, has_join_link: bool) -> None:
    message = reminder(kind=kind)
    text, rich = parts(message)
    assert message["Subject"] == subject
    assert ("https://x.com/i/spaces/1DXxyRYNejbKM" in text) is has_join_link
    assert ("https://x.com/i/spaces/1DXxyRYNejbKM" in rich) is has_join_link
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_rescheduled_shows_old_and_new_time() -> None:
    text, _ = parts(
        reminder(kind="space.rescheduled", space={"previous_scheduled_start": START - timedelta(hours=2)})
    )
    assert "Now starts: Tue 6 Jan 2026, 18:00 UTC" in text
    assert "Was: Tue 6 Jan 2026, 16:00 UTC" in text


def test_started_shows_when_it_started() -> None:
    text, _ = parts(reminder(kind="space.started", space={"started_at": START + timedelta(minutes=3)}))
    assert "Started: Tue 6 Jan 2026, 18:03 UTC" in text and "Join now" in text


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        reminder(kind="space.exploded")


def test_plain_http_unsubscribe_keeps_the_link_but_not_one_click() -> None:
    message = reminder(unsubscribe_url="http://127.0.0.1:8000/u/token")
    assert message["List-Unsubscribe"] == "<http://127.0.0.1:8000/u/token>"
    assert message["List-Unsubscribe-Post"] is None  # RFC 8058 requires an https URI
    with pytest.raises(ValueError, match="unsubscribe_url"):
        reminder(unsubscribe_url="https://x.example/u>\r\nBcc: a@b.c")


def test_confirmation_carries_only_our_text_and_the_link() -> None:
    confirm_url = "https://spacebell.example/confirm/opaque-token"
    message = render_confirmation_email(
        notification_id="ntf_01jconf",
        to="new@example.com",
        from_addr=FROM,
        confirm_url=confirm_url,
        list_id_domain="spacebell.example",
    )
    text, rich = parts(message)
    assert message["Subject"] == "Please confirm your email address for Spacebell reminders"
    assert message["Message-ID"] == "<ntf_01jconf@spacebell.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["List-Unsubscribe"] is None and message["List-Unsubscribe-Post"] is None
    assert confirm_url in text and f'href="{confirm_url}"' in rich
    assert "If you did not ask for this, ignore this message" in text
    # Nothing but fixed text: the body is the template with only the link filled in.
    template = (Path(__file__).parents[2] / "app/delivery/templates/confirmation.txt").read_text()
    assert text == template.replace("$confirm_url", confirm_url)


# --- sending ------------------------------------------------------------------------------------------


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpCapture]:
    async with SmtpCapture() as running:
        yield running


@pytest.fixture
async def sender(smtp: SmtpCapture) -> AsyncIterator[SmtpSender]:
    async with SmtpSender(smtp.host, smtp.port, timeout=2.0, local_hostname="spacebell.test") as running:
        yield running


async def test_delivered_mail_parses_back_with_its_headers(sender: SmtpSender, smtp: SmtpCapture) -> None:
    title = "Launch party 🚀🎉 — «ünïcödé»"
    result = await sender.send(reminder(space={"title": title}, recipient_timezone="Europe/Berlin"))

    assert result.outcome == EmailOutcome.delivered == "delivered"
    assert result.code == 250 and result.error is None and result.latency_ms > 0
    [got] = await smtp.wait_for(1)
    assert smtp.mails[0].mail_from == "reminders@spacebell.example"
    assert smtp.mails[0].rcpt_tos == ["listener@example.com"]
    assert got.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in got.iter_parts()] == ["text/plain", "text/html"]
    assert got["Subject"] == f"Starts in 15 minutes: {title}"
    assert got["Message-ID"] == "<ntf_01jabc@spacebell.example>"
    assert got["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert got["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got["List-Id"] and got["Date"] and got["Auto-Submitted"] == "auto-generated"
    text = got.get_body(("plain",)).get_content()
    rich = got.get_body(("html",)).get_content()
    assert title in text and "«ünïcödé»" in rich and "🚀🎉" in rich
    assert "19:00 CET (Europe/Berlin)" in text


async def test_connection_is_reused_across_sends(sender: SmtpSender, smtp: SmtpCapture) -> None:
    for i in range(3):
        assert (await sender.send(reminder(notification_id=f"ntf_{i}"))).delivered
    await smtp.wait_for(3)
    assert smtp.connection_count == 1
    assert sender.connections_opened == 1


async def test_smtp_down_is_retry_and_back_up_is_delivered(sender: SmtpSender, smtp: SmtpCapture) -> None:
    assert (await sender.send(reminder(notification_id="ntf_a"))).delivered  # leaves a pooled connection
    await smtp.stop()

    down = await sender.send(reminder(notification_id="ntf_b"))
    assert down.outcome == "retry" and down.code is None
    assert "SMTP connection failed" in (down.error or "")

    await smtp.start()
    up = await sender.send(reminder(notification_id="ntf_b"))
    assert up.delivered
    messages = await smtp.wait_for(2)  # the capture keeps what it got before going down
    assert [m["Message-ID"] for m in messages] == ["<ntf_a@spacebell.example>", "<ntf_b@spacebell.example>"]


async def test_server_restart_between_sends_is_survived_by_the_pool(sender: SmtpSender, smtp: SmtpCapture) -> None:
    assert (await sender.send(reminder(notification_id="ntf_a"))).delivered
    await smtp.stop()
    await smtp.start()  # the pooled connection is now dead; the sender must notice and reconnect
    result = await sender.send(reminder(notification_id="ntf_b"))
    assert result.delivered, result.error
    assert sender.connections_opened == 2


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
async def test_451_is_retry(sender: SmtpSender, smtp: SmtpCapture, stage: str) -> None:
    smtp.fail_with(451, stage=stage, times=1)
    first = await sender.send(reminder())
    assert first.outcome == "retry" and first.code == 451 and "451" in (first.error or "")
    second = await sender.send(reminder())
    assert second.delivered
    assert smtp.refused == [(stage, 451)] and len(smtp.messages) == 1
    assert smtp.connection_count == 1  # the session survives a refusal (aiosmtplib sends RSET)


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
async def test_550_is_failed(sender: SmtpSender, smtp: SmtpCapture, stage: str) -> None:
    smtp.fail_with(550, stage=stage, times=None)
    result = await sender.send(reminder())
    assert result.outcome == "failed" and result.code == 550
    assert smtp.messages == []


async def test_connection_refused_is_retry() -> None:
    async with SmtpSender("127.0.0.1", free_port(), timeout=2.0, local_hostname="spacebell.test") as sender:
        result = await sender.send(reminder())
    assert result.outcome == "retry" and "SMTP connection failed" in (result.error or "")


async def test_authentication(smtp_auth: SmtpCapture) -> None:
    async with SmtpSender(
        smtp_auth.host, smtp_auth.port, username="bell", password="s3cret", local_hostname="spacebell.test"
    ) as good:
        assert (await good.send(reminder())).delivered
    async with SmtpSender(
        smtp_auth.host, smtp_auth.port, username="bell", password="wrong", local_hostname="spacebell.test"
    ) as bad:
        result = await bad.send(reminder())
    assert result.outcome == "retry" and "authentication failed" in (result.error or "")
    async with SmtpSender(smtp_auth.host, smtp_auth.port, local_hostname="spacebell.test") as anonymous:
        refused = await anonymous.send(reminder())
    assert refused.outcome == "retry" and refused.code == 530  # our settings, not the message
    assert len(smtp_auth.messages) == 1


@pytest.fixture
async def smtp_auth() -> AsyncIterator[SmtpCapture]:
    async with SmtpCapture(auth=("bell", "s3cret")) as running:
        yield running


async def test_starttls(tmp_path: Path) -> None:
    cert, key = make_tls_files(tmp_path)
    async with SmtpCapture(tls="starttls", ssl_context=server_ssl_context(cert, key)) as smtp:
        async with SmtpSender(
            smtp.host, smtp.port, tls="starttls", tls_context=client_ssl_context(cert), local_hostname="spacebell.test"
        ) as tls_sender:
            assert (await tls_sender.send(reminder())).delivered
        async with SmtpSender(smtp.host, smtp.port, tls="none", local_hostname="spacebell.test") as plain_sender:
            plain = await plain_sender.send(reminder())
        assert len(smtp.messages) == 1
    # The server insists on STARTTLS: a settings problem, so the message is kept for a retry.
    assert plain.outcome == "retry" and plain.code == 530


async def test_implicit_tls(tmp_path: Path) -> None:
    cert, key = make_tls_files(tmp_path)
    async with SmtpCapture(tls="implicit", ssl_context=server_ssl_context(cert, key)) as smtp:
        async with SmtpSender(
            smtp.host, smtp.port, tls="implicit", tls_context=client_ssl_context(cert), local_hostname="spacebell.test"
        ) as tls_sender:
            assert (await tls_sender.send(reminder())).delivered
            assert (await tls_sender.send(reminder())).delivered
        assert len(smtp.messages) == 2 and smtp.connection_count == 1


async def test_closed_sender_refuses_to_send(smtp: SmtpCapture) -> None:
    sender = SmtpSender(smtp.host, smtp.port, local_hostname="spacebell.test")
    assert (await sender.send(reminder())).delivered
    await sender.close()
    with pytest.raises(RuntimeError, match="closed"):
        await sender.send(reminder())


def test_from_settings_and_mail_domain() -> None:
    settings = load_settings(
        smtp_host="mail.internal", smtp_port=587, smtp_username="bell", smtp_password="pw",
        smtp_tls="starttls", smtp_timeout_seconds=12, dispatcher_email_concurrency=3,
    )
    sender = SmtpSender.from_settings(settings)
    assert (sender.host, sender.port, sender.tls, sender.timeout, sender.max_connections) == (
        "mail.internal", 587, "starttls", 12, 3,
    )
    assert domain_of("Spacebell <Reminders@Spacebell.Example>") == "spacebell.example"
    with pytest.raises(ValueError):
        domain_of("no address here")
