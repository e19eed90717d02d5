"""WebhookSender against a real local receiver: signing, status semantics, timeouts, reuse, egress."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from app.core.settings import load_settings
from app.delivery.webhooks import (
    WebhookOutcome,
    WebhookResult,
    WebhookSender,
    build_webhook_body,
    classify_status,
    generate_webhook_secret,
    parse_retry_after,
    sign_webhook,
)
from tests.support.receivers import (
    Reply,
    WebhookReceiver,
    client_ssl_context,
    free_port,
    make_tls_files,
    server_ssl_context,
)

LOOPBACK = ["127.0.0.0/8"]


@pytest.fixture
def secret() -> str:
    return generate_webhook_secret()


@pytest.fixture
async def receiver(secret: str) -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(secret) as running:
        yield running


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    async with WebhookSender(timeout_seconds=2.0, allow_http=True, allowed_networks=LOOPBACK) as running:
        yield running


def body_for(space_id: str = "1DXxyRYNejbKM") -> bytes:
    return build_webhook_body(
        "space.reminder",
        datetime(2026, 1, 6, 17, 45, tzinfo=UTC),
        {"space": {"id": space_id, "title": "Launch 🚀 <b>party</b>"}, "lead_time_minutes": 15},
    )


async def send(sender: WebhookSender, url: str, secret: str, msg_id: str = "ntf_01", **kw: object) -> WebhookResult:
    return await sender.send(
        url, secret, msg_id=msg_id, body=kw.pop("body", body_for()), timestamp=kw.pop("timestamp", datetime.now(UTC))
    )


# --- signing and the request --------------------------------------------------------------------


async def test_delivered_request_verifies_with_standardwebhooks(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    attempt_time = datetime.now(UTC).replace(microsecond=0)
    result = await send(sender, receiver.url, secret, msg_id="ntf_abc", timestamp=attempt_time)

    assert result.outcome == WebhookOutcome.delivered == "delivered"
    assert result.status_code == 200 and result.error is None and result.response_excerpt == "ok"
    assert result.latency_ms > 0 and result.retry_after_seconds is None and not result.disable_endpoint
    [got] = receiver.received
    assert got.verified, got.verify_error
    assert got.webhook_id == "ntf_abc"
    assert got.timestamp == int(attempt_time.timestamp())
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == "Spacebell/0.1"
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.body == body_for()
    assert got.json["data"]["space"]["title"] == "Launch 🚀 <b>party</b>"


async def test_retry_keeps_the_webhook_id_and_signs_the_new_timestamp(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    first_time = datetime.now(UTC) - timedelta(seconds=30)
    await send(sender, receiver.url, secret, msg_id="ntf_same", timestamp=first_time)
    await send(sender, receiver.url, secret, msg_id="ntf_same", timestamp=first_time + timedelta(seconds=20))

    first, second = receiver.received
    assert first.webhook_id == second.webhook_id == "ntf_same"
    assert second.timestamp == first.timestamp + 20
    assert first.verified and second.verified
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]


async def test_wrong_secret_does_not_verify(sender: WebhookSender, receiver: WebhookReceiver) -> None:
    await send(sender, receiver.url, generate_webhook_secret())
    [got] = receiver.received
    assert not got.verified and got.verify_error == "No matching signature found"


async def test_rotation_sends_one_signature_per_secret(sender: WebhookSender, secret: str) -> None:
    new_secret = generate_webhook_secret()
    async with WebhookReceiver(new_secret) as new_only:
        result = await sender.send(
            new_only.url, [secret, new_secret], msg_id="ntf_rot", body=body_for(), timestamp=datetime.now(UTC)
        )
    assert result.delivered
    [got] = new_only.received
    assert got.verified and len(got.headers["webhook-signature"].split(" ")) == 2


def test_signature_matches_the_spec_example() -> None:
    # The example in the Standard Webhooks spec and its reference library tests.
    signature = sign_webhook(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        datetime.fromtimestamp(1614265330, tz=UTC),
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_body_is_compact_json_with_a_utc_z_timestamp() -> None:
    body = build_webhook_body("space.canceled", datetime(2026, 1, 6, 12, 0, tzinfo=UTC), {"a": 1})
    assert body == b'{"type":"space.canceled","timestamp":"2026-01-06T12:00:00Z","data":{"a":1}}'
    local = datetime(2026, 1, 6, 7, 0, 0, 250000, tzinfo=ZoneInfo("America/New_York"))
    assert json.loads(build_webhook_body("x.y", local, {}))["timestamp"] == "2026-01-06T12:00:00.250Z"


async def test_invalid_msg_id_is_a_programming_error(sender: WebhookSender, receiver: WebhookReceiver) -> None:
    with pytest.raises(ValueError, match="msg_id"):
        await send(sender, receiver.url, "whsec_" + "A" * 32, msg_id="has.dot")


async def test_send_before_start_is_an_error(receiver: WebhookReceiver, secret: str) -> None:
    with pytest.raises(RuntimeError, match="start"):
        await send(WebhookSender(), receiver.url, secret)


# --- status semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "delivered"), (201, "delivered"), (204, "delivered"), (299, "delivered"),
        (301, "retry"), (302, "retry"), (307, "retry"),
        (400, "failed"), (401, "failed"), (403, "failed"), (404, "failed"), (413, "failed"), (422, "failed"),
        (408, "retry"), (409, "retry"), (425, "retry"), (429, "retry"),
        (410, "gone"),
        (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry"),
    ],
)
def test_status_classification(status: int, outcome: str) -> None:
    assert classify_status(status) == outcome


async def test_500_is_retry_without_throttle(sender: WebhookSender, receiver: WebhookReceiver, secret: str) -> None:
    receiver.respond_with([Reply(500, b"boom")])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.status_code == 500
    assert result.error == "HTTP 500 Internal Server Error" and result.response_excerpt == "boom"
    assert result.retry_after_seconds is None and not result.disable_endpoint


async def test_410_means_gone_and_disable(sender: WebhookSender, receiver: WebhookReceiver, secret: str) -> None:
    receiver.respond_with([410])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "gone" and result.disable_endpoint and result.status_code == 410


async def test_404_is_a_permanent_failure(sender: WebhookSender, receiver: WebhookReceiver, secret: str) -> None:
    receiver.respond_with([404])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "failed" and result.status_code == 404 and not result.disable_endpoint


async def test_redirect_is_not_followed_and_counts_as_failure(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.respond_with([302])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.status_code == 302
    assert "redirect not followed" in (result.error or "") and "/redirected" in (result.error or "")
    await receiver.assert_no_more(1, within=0.1)
    assert receiver.received[0].path == "/hook"


async def test_429_with_retry_after_seconds_throttles(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.respond_with([Reply(429, retry_after=7)])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.status_code == 429 and result.retry_after_seconds == 7.0


async def test_retry_after_http_date_is_relative_to_the_server_date(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    receiver.respond_with([Reply(503, headers={"Retry-After": format_datetime(later, usegmt=True)})])
    result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.retry_after_seconds is not None
    assert 115 <= result.retry_after_seconds <= 121


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_throttle_statuses_without_retry_after_get_the_default_pause(
    receiver: WebhookReceiver, secret: str, status: int
) -> None:
    receiver.respond_with([status])
    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK, default_throttle_seconds=45) as sender:
        result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.retry_after_seconds == 45


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 5 ", now) == 5
    assert parse_retry_after("Tue, 06 Jan 2026 12:01:30 GMT", now) == 90
    assert parse_retry_after("Tue, 06 Jan 2026 11:00:00 GMT", now) == 0  # in the past
    assert parse_retry_after("999999999", now) == 86400  # clamped
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_timeout_is_retry(receiver: WebhookReceiver, secret: str) -> None:
    receiver.respond_with([Reply(200, delay=5)])
    async with WebhookSender(timeout_seconds=0.3, allow_http=True, allowed_networks=LOOPBACK) as sender:
        result = await send(sender, receiver.url, secret)
    assert result.outcome == "retry" and result.status_code is None
    assert result.error == "timed out after 0.3s"
    assert 250 <= result.latency_ms < 2000


async def test_connection_refused_is_retry(sender: WebhookSender, secret: str) -> None:
    result = await send(sender, f"http://127.0.0.1:{free_port()}/hook", secret)
    assert result.outcome == "retry" and result.status_code is None
    assert (result.error or "").startswith("connection failed")


async def test_response_excerpt_is_capped(receiver: WebhookReceiver, secret: str) -> None:
    receiver.respond_with([Reply(500, b"x" * 100_000)])
    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK, max_response_bytes=100) as sender:
        result = await send(sender, receiver.url, secret)
    assert result.response_excerpt == "x" * 100


async def test_fail_every_other_mode_alternates(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.fail_every_other(503)
    outcomes = [(await send(sender, receiver.url, secret, msg_id=f"ntf_{i}")).outcome for i in range(4)]
    assert outcomes == ["retry", "delivered", "retry", "delivered"]


# --- connections ------------------------------------------------------------------------------------


async def test_sequential_sends_reuse_one_connection(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.respond_with([200, 500, Reply(200, b"y" * 10_000), 404, 200])  # a long body does not cost the connection
    for i in range(5):
        await send(sender, receiver.url, secret, msg_id=f"ntf_{i}")
    assert len(receiver.received) == 5
    assert receiver.connection_count == 1


async def test_in_flight_requests_are_bounded(receiver: WebhookReceiver, secret: str) -> None:
    receiver.default_reply = Reply(200, delay=0.3)
    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK, max_in_flight=2) as sender:
        sends = [asyncio.create_task(send(sender, receiver.url, secret, msg_id=f"ntf_{i}")) for i in range(4)]
        await receiver.wait_for(2)
        await asyncio.sleep(0.1)
        assert len(receiver.received) == 2  # the other two wait for a slot
        results = await asyncio.gather(*sends)
    assert [r.outcome for r in results] == ["delivered"] * 4
    assert receiver.connection_count == 2


async def test_https_with_a_trusted_certificate(tmp_path: Path, secret: str) -> None:
    cert, key = make_tls_files(tmp_path)
    async with WebhookReceiver(secret, ssl_context=server_ssl_context(cert, key)) as tls_receiver:
        assert tls_receiver.url.startswith("https://127.0.0.1:")
        async with WebhookSender(allowed_networks=LOOPBACK, ssl_context=client_ssl_context(cert)) as sender:
            trusted = await send(sender, tls_receiver.url, secret)
        async with WebhookSender(allowed_networks=LOOPBACK) as sender:
            untrusted = await send(sender, tls_receiver.url, secret)
    assert trusted.delivered and tls_receiver.received[0].verified
    assert untrusted.outcome == "retry" and "TLS certificate rejected" in (untrusted.error or "")
    assert len(tls_receiver.received) == 1


# --- egress policy at send time ---------------------------------------------------------------------


class SpyResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1 and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0)]

    async def close(self) -> None:
        pass


async def test_literal_ip_is_checked_by_the_sender_because_aiohttp_skips_the_resolver(
    receiver: WebhookReceiver, secret: str
) -> None:
    spy = SpyResolver()
    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK, resolver=spy) as allowed:
        assert (await send(allowed, receiver.url, secret)).delivered
    assert spy.calls == []  # aiohttp never asked the resolver about 127.0.0.1

    async with WebhookSender(allow_http=True, allowed_networks=(), resolver=spy) as strict:
        result = await send(strict, receiver.url, secret)
    assert result.outcome == "failed" and result.status_code is None
    assert result.error == "webhook URL points at 127.0.0.1 (loopback address) — refused by the egress policy"
    assert len(receiver.received) == 1


async def test_host_that_rebinds_to_a_forbidden_address_is_refused_at_connect_time(
    receiver: WebhookReceiver, secret: str
) -> None:
    """The name passed registration, but now DNS answers 127.0.0.1: the resolver refuses it."""
    url = f"http://hooks.example.test:{receiver.port}/hook"
    spy = SpyResolver()
    async with WebhookSender(allow_http=True, allowed_networks=(), resolver=spy) as strict:
        result = await send(strict, url, secret)
    assert spy.calls == ["hooks.example.test"]
    assert result.outcome == "failed"
    assert result.error == (
        "webhook host hooks.example.test resolves to 127.0.0.1 (loopback address) — refused by the egress policy"
    )
    assert receiver.received == []

    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK, resolver=SpyResolver()) as exempt:
        assert (await send(exempt, url, secret)).delivered
    assert receiver.received[0].headers["host"] == f"hooks.example.test:{receiver.port}"


async def test_http_is_refused_at_send_time_unless_allowed(receiver: WebhookReceiver, secret: str) -> None:
    async with WebhookSender(allow_http=False, allowed_networks=LOOPBACK) as sender:
        result = await send(sender, receiver.url, secret)
    assert result.outcome == "failed" and result.error == "webhook URL must use https"
    assert receiver.received == []


async def test_secret_never_appears_in_logs_or_results(
    receiver: WebhookReceiver, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.respond_with([500])
    async with WebhookSender(allow_http=True, allowed_networks=LOOPBACK) as sender:
        results = [await send(sender, receiver.url, secret)]
    async with WebhookSender(allow_http=True, allowed_networks=(), resolver=SpyResolver()) as strict:
        results.append(await send(strict, f"http://rebound.test:{receiver.port}/", secret))
    assert [r.outcome for r in results] == ["retry", "failed"]
    assert "rebound.test" in caplog.text  # the refusal was logged, without the secret
    secret_b64 = secret.removeprefix("whsec_")
    assert secret_b64 not in caplog.text
    assert all(secret_b64 not in repr(r) for r in results)


async def test_naive_attempt_time_is_taken_as_utc(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # make local time differ from UTC
    time.tzset()
    try:
        naive = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        result = await send(sender, receiver.url, secret, timestamp=naive)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert result.delivered
    [got] = receiver.received
    assert got.verified and got.timestamp == int(naive.replace(tzinfo=UTC).timestamp())


async def test_invalid_secret_is_a_failed_outcome(sender: WebhookSender, receiver: WebhookReceiver) -> None:
    result = await send(sender, receiver.url, "whsec_")
    assert result.outcome == "failed" and result.error == "the endpoint's webhook secret is invalid"
    assert receiver.received == []


def test_from_settings_maps_the_webhook_settings() -> None:
    settings = load_settings(
        webhook_timeout_seconds=7, dispatcher_concurrency=9, webhook_max_response_bytes=123,
        webhook_allow_http=True, webhook_allowed_networks="127.0.0.0/8,10.1.0.0/16",
    )
    sender = WebhookSender.from_settings(settings, user_agent="Spacebell/test")
    assert (sender.timeout_seconds, sender.max_in_flight, sender.max_response_bytes, sender.allow_http) == (
        7, 9, 123, True,
    )
    assert [str(n) for n in sender.allowed_networks] == ["127.0.0.0/8", "10.1.0.0/16"]
    assert sender.user_agent == "Spacebell/test"


async def test_connection_dropped_without_answer_is_tried_once_more_then_retry(
    sender: WebhookSender, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.respond_with([Reply(drop=True)])
    recovered = await send(sender, receiver.url, secret, msg_id="ntf_once")
    assert recovered.delivered
    assert receiver.webhook_ids == ["ntf_once", "ntf_once"]

    receiver.respond_with([Reply(drop=True), Reply(drop=True)])
    lost = await send(sender, receiver.url, secret, msg_id="ntf_twice")
    assert lost.outcome == "retry" and lost.status_code is None
    assert lost.error == "connection failed: Server disconnected"
    assert receiver.webhook_ids[2:] == ["ntf_twice", "ntf_twice"]


# --- the receiver helper itself ---------------------------------------------------------------------


async def test_receiver_can_ignore_the_timestamp_window_for_manual_clocks(sender: WebhookSender, secret: str) -> None:
    long_ago = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # what a ManualClock would say
    async with WebhookReceiver(secret) as strict, WebhookReceiver(secret, check_timestamp=False) as lenient:
        await send(sender, strict.url, secret, timestamp=long_ago)
        await send(sender, lenient.url, secret, timestamp=long_ago)
        await send(sender, lenient.url, generate_webhook_secret(), timestamp=long_ago)
    assert not strict.received[0].verified and strict.received[0].verify_error == "Message timestamp too old"
    assert [r.verified for r in lenient.received] == [True, False]


async def test_receiver_rejects_unverified_requests_when_asked(sender: WebhookSender, secret: str) -> None:
    async with WebhookReceiver(secret, secrets={"/other": generate_webhook_secret()}, reject_unverified=True) as rx:
        good = await send(sender, rx.url, secret)
        bad = await send(sender, rx.url_for("/other"), secret)
    assert good.delivered
    assert bad.outcome == "failed" and bad.status_code == 401
    assert [r.status for r in rx.received] == [200, 401]
    assert len(rx.received_on("/other")) == 1
