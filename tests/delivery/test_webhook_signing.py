"""The sender's fast paths give the same answers as the slow ones they replace.

* `WebhookSigner` (HMAC keyed once, copied per message) signs exactly as `standardwebhooks.Webhook.sign`;
* the egress verdict the sender caches per URL is the verdict `check_webhook_url` gives.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from app.delivery.egress import EgressPolicyError, check_webhook_url
from app.delivery.webhooks import WebhookSender, WebhookSigner, generate_webhook_secret, secret_key, sign_webhook

SECRETS = [
    generate_webhook_secret(24),
    generate_webhook_secret(32),
    generate_webhook_secret(64),
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # the spec's example
    "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # no prefix
    "whsec_" + base64.b64encode(os.urandom(31)).decode().rstrip("="),  # unpadded base64
]
MOMENTS = [
    datetime(2026, 1, 6, 17, 45, tzinfo=UTC),
    datetime(2026, 1, 6, 17, 45, 59, 999_999, tzinfo=UTC),
    datetime(2026, 1, 6, 19, 45, 1, tzinfo=timezone(timedelta(hours=2))),  # aware, not UTC
    datetime(2026, 1, 6, 17, 45, 1),  # naive: UTC for both
    datetime.fromtimestamp(1614265330, tz=UTC),
]
BODIES = [
    b"",
    b'{"test": 2432232314}',
    '{"type":"space.reminder","data":{"space":{"title":"Launch 🚀 <b>party</b> — ünïcödé"}}}'.encode(),
    os.urandom(300),  # not UTF-8 at all: signed byte for byte
]


@pytest.mark.parametrize("secret", SECRETS)
def test_signer_matches_standardwebhooks(secret: str) -> None:
    reference = Webhook(secret)
    signer = WebhookSigner(secret)
    for moment in MOMENTS:
        stamp = str(int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()))
        for i, body in enumerate(BODIES):
            msg_id = f"ntf_01jexample{i}"
            expected = reference.sign(msg_id, moment, body)
            assert signer.sign(msg_id, stamp, body) == expected
            assert sign_webhook(secret, msg_id, moment, body) == expected


def test_rotation_signs_with_every_secret_in_order() -> None:
    first, second = SECRETS[0], SECRETS[1]
    moment, body = MOMENTS[0], BODIES[2]
    expected = f"{Webhook(first).sign('ntf_x', moment, body)} {Webhook(second).sign('ntf_x', moment, body)}"
    assert sign_webhook([first, second], "ntf_x", moment, body) == expected
    assert sign_webhook((first, second), "ntf_x", moment, body) == expected


@pytest.mark.parametrize("secret", ["whsec_", "", "whsec_===", "whsec_!!!!"])
def test_invalid_secrets_fail_like_standardwebhooks(secret: str) -> None:
    with pytest.raises((ValueError, EmptyWebhookSecretError)) as ours:
        secret_key(secret)
    with pytest.raises((ValueError, EmptyWebhookSecretError)) as theirs:
        Webhook(secret)
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("secret", SECRETS)
def test_secret_key_is_the_key_standardwebhooks_uses(secret: str) -> None:
    assert secret_key(secret) == Webhook(secret)._whsecret


URLS = [
    "https://hooks.example.com/spacebell?token=abc",
    "http://hooks.example.com/x",
    "https://127.0.0.1:8443/hook",
    "https://10.1.2.3/hook",
    "https://[::1]/hook",
    "https://2130706433/hook",
    "https://user:pw@hooks.example.com/",
    "ftp://hooks.example.com/",
    "https://localhost/x",
    "https://hooks.example.com:99999/",
]


@pytest.mark.parametrize("allow_http", [False, True])
@pytest.mark.parametrize("networks", [(), ("127.0.0.0/8", "10.0.0.0/8")])
async def test_cached_egress_verdicts_are_check_webhook_url_verdicts(
    allow_http: bool, networks: tuple[str, ...]
) -> None:
    sender = WebhookSender(allow_http=allow_http, allowed_networks=networks)
    for _round in range(2):  # the second round answers from the cache
        for url in URLS:
            try:
                check_webhook_url(url, allow_http=allow_http, allowed_networks=networks)
                expected = None
            except EgressPolicyError as exc:
                expected = exc.reason
            try:
                target = sender._check_target(url)
                got = None
                assert str(target) == str(type(target)(url))
            except EgressPolicyError as exc:
                got = exc.reason
            assert got == expected, url


def test_changing_the_senders_policy_drops_cached_verdicts() -> None:
    sender = WebhookSender(allow_http=False, allowed_networks=())
    url = "http://127.0.0.1:8080/hook"
    with pytest.raises(EgressPolicyError):
        sender._check_target(url)
    sender.allow_http = True
    with pytest.raises(EgressPolicyError, match="loopback"):
        sender._check_target(url)
    sender.allowed_networks = WebhookSender(allowed_networks=["127.0.0.0/8"]).allowed_networks
    assert str(sender._check_target(url)) == url


async def test_in_flight_gauge_counts_requests_being_sent() -> None:
    import asyncio

    from prometheus_client import REGISTRY

    from tests.support.receivers import Reply, WebhookReceiver

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("spacebell_webhook_in_flight")

    secret = generate_webhook_secret()
    async with WebhookReceiver(secret) as receiver:
        receiver.default_reply = Reply(200, delay=0.3)
        async with WebhookSender(allow_http=True, allowed_networks=["127.0.0.0/8"]) as sender:
            before = gauge()
            sends = [
                asyncio.create_task(
                    sender.send(receiver.url, secret, msg_id=f"ntf_g{i}", body=b"{}", timestamp=datetime.now(UTC))
                )
                for i in range(3)
            ]
            await receiver.wait_for(3)
            assert gauge() == (before or 0) + 3
            assert all(r.delivered for r in await asyncio.gather(*sends))
            assert gauge() == before
