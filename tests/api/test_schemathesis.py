"""Schemathesis over the app's own OpenAPI document, authenticated, against the real app over HTTP.

Every operation is fuzzed with schema-valid (positive) and schema-invalid (negative) requests; some
of the cases target objects that exist (a webhook endpoint, a subscription, a notification
and a Space this account sees) so the success paths run too. Any 5xx, a response outside its
declared status codes, media types or schema fails the test, on SQLite and on PostgreSQL.

Generation is bounded and deterministic (`derandomize`, no example database): the same schema
gives the same requests on every run.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.context import AppContext
from app.delivery import egress
from app.delivery import router as endpoints_router
from tests.conftest import RunningServer, create_account
from tests.delivery.test_outbox import CREATOR, SPACE, add_space

MAX_EXAMPLES = 40
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


async def offline_url_check(url: str, *, allow_http: bool = False, allowed_networks: Any = (), **_: Any) -> None:
    """The registration check without DNS: generated host names never leave the machine.

    Syntax and IP literals are judged by the real policy; any other host is taken to resolve to a
    public address, so schema-valid URLs reach the success path.
    """
    egress.check_webhook_url(url, allow_http=allow_http, allowed_networks=allowed_networks)


def seed(http: requests.Session, base_url: str) -> dict[str, str]:
    """Fresh real objects for path parameters: an endpoint, a subscription to the stored Space's
    creator, the reminder it planned. Made again before each operation, as the last one may have
    deleted them."""
    r = http.post(f"{base_url}/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 201, r.text
    endpoint = r.json()["id"]
    r = http.post(f"{base_url}/v1/subscriptions", json={"creator_id": CREATOR, "webhook_endpoint_id": endpoint})
    assert r.status_code == 201, r.text
    subscription = r.json()["id"]
    r = http.get(f"{base_url}/v1/notifications", params={"subscription_id": subscription})
    [notification] = r.json()["data"]
    return {
        "endpoint_id": endpoint,
        "subscription_id": subscription,
        "notification_id": notification["id"],
        "space_id": SPACE,
    }


def valid_subscription_bodies(endpoint_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies that satisfy the rules the schema cannot say (exactly one target, one channel)."""
    target = st.one_of(
        st.fixed_dictionaries({"keyword": st.text(min_size=1, max_size=40)}),
        st.fixed_dictionaries({"creator_id": st.from_regex(r"\A[0-9]{1,19}\Z")}),
        st.fixed_dictionaries({"creator_username": st.from_regex(r"\A@?[A-Za-z0-9_]{1,15}\Z")}),
    )
    channel = st.one_of(st.just({"webhook_endpoint_id": endpoint_id}), st.just({"email": "fuzz@example.com"}))
    extra = st.fixed_dictionaries(
        {},
        optional={
            "lead_times": st.lists(st.integers(-10, 30000), max_size=6),
            "event_types": st.lists(st.sampled_from(["space.reminder", "space.started", "space.nope"]), max_size=3),
        },
    )
    return st.tuples(target, channel, extra).map(lambda parts: {k: v for part in parts for k, v in part.items()})


def fuzz(schema: schemathesis.BaseSchema, base_url: str, api_key: str) -> list[str]:
    """Run every operation's strategy; return one report per failing operation (empty when all pass)."""
    failures: list[str] = []
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment
    headers = {"Authorization": f"Bearer {api_key}"}
    session.headers.update(headers)
    for result in schema.get_all_operations():
        operation = result.ok()
        real_ids = seed(session, base_url)
        path_names = [p.name for p in operation.path_parameters]
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        ]
        if path_names:
            real = {name: real_ids[name] for name in path_names}
            strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
        if operation.label == "POST /v1/subscriptions":
            strategies.append(
                valid_subscription_bodies(real_ids["endpoint_id"]).flatmap(lambda body: operation.as_strategy(body=body))
            )

        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @given(case=st.one_of(strategies))
        def check_operation(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=30)

        try:
            check_operation()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - report every operation's failures at once
            failures.append(f"{operation.label}:\n{exc}")
    session.close()
    return failures


async def test_schemathesis_finds_no_server_errors_or_schema_violations(
    api: RunningServer, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoints_router, "check_webhook_url_async", offline_url_check)
    ctx.settings.max_webhook_endpoints_per_account = 10_000  # every operation seeds its own
    await add_space(ctx, ctx.clock.now() + timedelta(hours=2))
    key = await create_account(ctx, "fuzzed")
    async with httpx.AsyncClient(base_url=api.url) as http:
        spec = (await http.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(spec)
    assert urlsplit(api.url).hostname == "127.0.0.1"
    # Blocking HTTP in a worker thread; the server keeps serving on this test's event loop.
    failures = await asyncio.to_thread(fuzz, schema, api.url, key)
    assert not failures, "\n\n".join(failures)
