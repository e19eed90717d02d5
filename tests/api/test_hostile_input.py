"""Hostile input over real HTTP, on SQLite and PostgreSQL: every answer is a problem document with
a 4xx status naming what was wrong, never a 500, and the API keeps working afterwards.

PostgreSQL refuses U+0000 in text, so NUL characters are the sharpest case: they must come back as
a 422 naming the field on both databases rather than as a driver error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import unicodedata
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from app.core.context import AppContext
from tests.delivery.test_outbox import CREATOR, SPACE, add_space

PROBLEM = "application/problem+json"
MAX_BODY = 65536  # Settings.max_body_bytes default, as the tests' settings leave it


def problem(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, str(r.request.url)[:200], r.status_code, r.text[:500])
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"].startswith("https://spacebell.dev/problems/")
    if field is not None:
        assert field in [p["name"] for p in body.get("invalid_params", [])], body
    return body


async def still_works(client: httpx.AsyncClient) -> None:
    """The connection pool and the database are fine after the hostile request."""
    r = await client.post("/v1/subscriptions", json={"keyword": "still fine", "email": "ok@example.com"})
    assert r.status_code == 201, r.text
    assert (await client.delete(f"/v1/subscriptions/{r.json()['id']}")).status_code == 204


async def endpoint_id(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def post_raw(client: httpx.AsyncClient, path: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return await client.post(path, content=body, headers={"content-type": content_type})


# --------------------------------------------------------------------------------------------
# Body size


@pytest.mark.parametrize("path", ["/v1/subscriptions", "/v1/webhook-endpoints"])
async def test_oversized_body_with_content_length_is_413(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, json={"keyword": "x" * (MAX_BODY + 1), "email": "a@example.com"})
    body = problem(r, 413)
    assert body["type"].endswith("/body-too-large")
    await still_works(client)


async def _chunks(total: int, size: int = 4096) -> AsyncIterator[bytes]:
    yield b'{"keyword": "'
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size
    yield b'", "email": "a@example.com"}'


async def test_oversized_chunked_body_without_length_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/subscriptions", content=_chunks(MAX_BODY * 2), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    problem(r, 413)
    patch = await client.patch(
        "/v1/subscriptions/sub_x", content=_chunks(MAX_BODY + 10), headers={"content-type": "application/json"}
    )
    problem(patch, 413)
    await still_works(client)


async def test_chunked_body_under_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/subscriptions", content=_chunks(500), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 201, r.text
    assert r.json()["target"]["keyword"] == "x" * 500


async def test_a_huge_content_length_is_refused_before_the_body_arrives(client: httpx.AsyncClient) -> None:
    """Claiming 1 GB and sending nothing gets an immediate 413, not a server waiting for the body."""
    url = urlsplit(str(client.base_url))
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(
            b"POST /v1/subscriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: {client.headers['authorization']}\r\n".encode()
            + b"Content-Length: 1000000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"application/problem+json" in head.lower()


# --------------------------------------------------------------------------------------------
# Malformed JSON: nesting, huge arrays, bad bytes, huge numbers, duplicate keys


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b"[" * 60000, "body", id="unclosed-arrays-past-the-recursion-limit"),
        pytest.param(b'{"keyword": ' + b"[" * 30000 + b"]" * 30000 + b"}", "body", id="closed-arrays-past-the-limit"),
        pytest.param(b'{"a":' * 10000 + b"1" + b"}" * 10000, "body", id="nested-objects-past-the-limit"),
        pytest.param(
            b'{"keyword": "k", "email": "a@example.com", "lead_times": ' + b"[" * 500 + b"]" * 500 + b"}",
            "body.lead_times.0", id="nested-within-the-limit",
        ),
    ],
)
async def test_deeply_nested_json_is_422_not_500(client: httpx.AsyncClient, raw: bytes, field: str) -> None:
    assert len(raw) <= MAX_BODY
    problem(await post_raw(client, "/v1/subscriptions", raw), 422, field)
    await still_works(client)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"keyword": "k", "email": "a@example.com", "lead_times": [15] * 12000}, "body.lead_times"),
        ({"keyword": "k", "email": "a@example.com", "event_types": ["space.reminder"] * 3000}, "body.event_types"),
        ({"keyword": "k", "email": "a@example.com", "event_types": ["nope"] * 5000}, "body.event_types"),
        ({"keyword": ["k"] * 10000, "email": "a@example.com"}, "body.keyword"),
        ({"keyword": "k", "email": "a@example.com", "surprise": list(range(10000))}, "body.surprise"),
    ],
)
async def test_huge_arrays_are_422_naming_the_field(client: httpx.AsyncClient, body: dict, field: str) -> None:
    assert len(json.dumps(body)) <= MAX_BODY
    r = await client.post("/v1/subscriptions", json=body)
    problem(r, 422, field)
    assert len(r.content) < MAX_BODY  # the answer does not echo thousands of items back


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"keyword": "\xff\xfe\xfd", "email": "a@example.com"}', "body", id="not-utf8"),
        pytest.param('{"keyword": "café", "email": "a@example.com"}'.encode("latin-1"), "body", id="latin-1"),
        pytest.param(b"\xc0\xaf", "body", id="overlong-encoding"),
        # Python's JSON reader decodes with surrogatepass: these arrive as lone surrogates in a string.
        pytest.param(b'{"keyword": "\xed\xa0\x80", "email": "a@example.com"}', "body.keyword", id="encoded-surrogate"),
        pytest.param(b'{"keyword": "k", "email": "a@example.com", "event_types": ["\xed\xbf\xbf"]}',
                     "body.event_types.0", id="encoded-surrogate-in-list"),
    ],
)
async def test_invalid_utf8_is_422(client: httpx.AsyncClient, raw: bytes, field: str) -> None:
    problem(await post_raw(client, "/v1/subscriptions", raw), 422, field)
    await still_works(client)


async def test_escaped_lone_surrogates_are_422_naming_the_field(client: httpx.AsyncClient) -> None:
    """`"\\ud800"` is valid JSON but no text: it cannot be encoded for either database."""
    for raw, field in [
        (b'{"keyword": "a\\ud800b", "email": "a@example.com"}', "body.keyword"),
        (b'{"keyword": "k", "email": "a@example.com", "event_types": ["\\uDFFF"]}', "body.event_types.0"),
        (b'{"keyword": "k", "email": "a@example.com", "\\ud83d": 1}', "body"),
    ]:
        problem(await post_raw(client, "/v1/subscriptions", raw), 422, field)
    ep = await endpoint_id(client)
    r = await client.patch(
        f"/v1/webhook-endpoints/{ep}", content=b'{"event_types": ["\\ud800"]}', headers={"content-type": "application/json"}
    )
    problem(r, 422, "body.event_types.0")
    # A proper pair is one emoji, and fine.
    ok = await post_raw(client, "/v1/subscriptions", b'{"keyword": "\\ud83d\\udc0d", "email": "a@example.com"}')
    assert ok.status_code == 201 and ok.json()["target"]["keyword"] == "\U0001f40d"
    await still_works(client)


BAD_LEAD_TIMES = [
    b"-1", b"0", b"1.5", b"20161",
    b"1e3000", b"-1e3000",  # parse as infinities
    b"NaN", b"Infinity",  # Python's JSON reader accepts these literals
    b"null", b'"soon"', b"[15]", b"{}", b"9223372036854775808", b"1" + b"0" * 100,
]


async def test_bad_numbers_in_lead_times_are_422(client: httpx.AsyncClient) -> None:
    sub = (await client.post("/v1/subscriptions", json={"keyword": "k", "email": "a@example.com"})).json()
    for raw_lead_time, field in [*((v, "body.lead_times.0") for v in BAD_LEAD_TIMES), (b"9" * 5000, "body")]:
        # 5000 digits pass Python's int digit limit: the parser itself refuses them.
        raw = b'{"keyword": "k", "email": "a@example.com", "lead_times": [' + raw_lead_time + b"]}"
        problem(await post_raw(client, "/v1/subscriptions", raw), 422, field)
        r = await client.patch(
            f"/v1/subscriptions/{sub['id']}", content=b'{"lead_times": [' + raw_lead_time + b"]}",
            headers={"content-type": "application/json"},
        )
        problem(r, 422, field)
    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["lead_times"] == [15]
    assert len((await client.get("/v1/subscriptions")).json()["data"]) == 1


async def test_whole_numbers_written_as_floats_are_accepted(client: httpx.AsyncClient) -> None:
    raw = b'{"keyword": "k", "email": "a@example.com", "lead_times": [30.0, 1e1]}'
    r = await post_raw(client, "/v1/subscriptions", raw)
    assert r.status_code == 201, r.text
    assert r.json()["lead_times"] == [30, 10]


BAD_LIMITS = ["-1", "0", "101", "1.5", "1e2", "NaN", "inf", "0x10", "99999999999999999999999999999", "", "ten", "١٠"]


async def test_bad_limits_are_422_naming_query_limit(ctx: AppContext, client: httpx.AsyncClient) -> None:
    await add_space(ctx, ctx.clock.now() + timedelta(hours=1))
    await client.post("/v1/subscriptions", json={"creator_id": CREATOR, "email": "a@example.com"})
    for path in ["/v1/subscriptions", "/v1/webhook-endpoints", "/v1/notifications", "/v1/spaces",
                 f"/v1/spaces/{SPACE}/events"]:
        for limit in BAD_LIMITS:
            problem(await client.get(path, params={"limit": limit}), 422, "query.limit")
        for limit in ["1", "100"]:
            assert (await client.get(path, params={"limit": limit})).status_code == 200


async def test_duplicate_json_keys_take_the_last_value(client: httpx.AsyncClient) -> None:
    """RFC 8259 leaves duplicate names undefined; Spacebell reads the last one, always, and validates it."""
    raw = b'{"keyword": "first", "keyword": "second", "email": "a@example.com", "lead_times": [0], "lead_times": [30]}'
    r = await post_raw(client, "/v1/subscriptions", raw)
    assert r.status_code == 201, r.text
    assert r.json()["target"]["keyword"] == "second" and r.json()["lead_times"] == [30]
    sub = r.json()
    bad_last = await client.patch(
        f"/v1/subscriptions/{sub['id']}", content=b'{"paused": true, "paused": "perhaps"}',
        headers={"content-type": "application/json"},
    )
    problem(bad_last, 422, "body.paused")
    assert (await client.get(f"/v1/subscriptions/{sub['id']}")).json()["paused"] is False


# --------------------------------------------------------------------------------------------
# NUL characters


NUL_SUBSCRIPTION_BODIES = [
    ({"keyword": "bad\u0000word", "email": "a@example.com"}, "body.keyword"),
    ({"keyword": "\u0000", "email": "a@example.com"}, "body.keyword"),
    ({"keyword": "k", "email": "a\u0000@example.com"}, "body.email"),
    ({"keyword": "k", "email": "a@example.com", "email_timezone": "Europe/Paris\u0000"}, "body.email_timezone"),
    ({"keyword": "k", "webhook_endpoint_id": "we_\u0000"}, "body.webhook_endpoint_id"),
    ({"creator_username": "ada\u0000", "email": "a@example.com"}, "body.creator_username"),
    ({"creator_id": "12\u00003", "email": "a@example.com"}, "body.creator_id"),
    ({"keyword": "k", "email": "a@example.com", "event_types": ["space.reminder\u0000"]}, "body.event_types.0"),
    ({"keyword": "k", "email": "a@example.com", "nested": {"deeper": ["ok", "n\u0000"]}}, "body.nested.deeper.1"),
    ({"keyword": "k", "email": "a@example.com", "key\u0000": 1}, "body"),
]
NUL_ENDPOINT_BODIES = [
    ({"url": "http://127.0.0.1:9/ho\u0000ok"}, "body.url"),
    ({"url": "http://127.0.0.1:9/hook", "description": "my\u0000hook"}, "body.description"),
    ({"url": "http://127.0.0.1:9/hook", "event_types": ["\u0000"]}, "body.event_types.0"),
]


async def test_nul_in_bodies_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    for body, field in NUL_SUBSCRIPTION_BODIES:
        problem(await client.post("/v1/subscriptions", json=body), 422, field)
    for body, field in NUL_ENDPOINT_BODIES:
        problem(await client.post("/v1/webhook-endpoints", json=body), 422, field)
    ep = await endpoint_id(client)
    sub = (await client.post("/v1/subscriptions", json={"keyword": "k", "webhook_endpoint_id": ep})).json()
    problem(await client.patch(f"/v1/webhook-endpoints/{ep}", json={"event_types": ["space.reminder\u0000"]}),
            422, "body.event_types.0")
    problem(await client.patch(f"/v1/subscriptions/{sub['id']}", json={"event_types": ["\u0000"]}),
            422, "body.event_types.0")
    await still_works(client)
    assert [s["id"] for s in (await client.get("/v1/subscriptions")).json()["data"]] == [sub["id"]]
    assert [e["id"] for e in (await client.get("/v1/webhook-endpoints")).json()["data"]] == [ep]


def _cursor_of(value: str) -> str:
    return base64.urlsafe_b64encode(f"c1:{value}".encode()).decode().rstrip("=")


NUL_QUERIES = [
    ("/v1/subscriptions", {"keyword": "a\u0000b"}, "query.keyword"),
    ("/v1/subscriptions", {"webhook_endpoint_id": "we_\u0000"}, "query.webhook_endpoint_id"),
    ("/v1/subscriptions", {"creator_username": "ada\u0000"}, "query.creator_username"),
    ("/v1/subscriptions", {"cursor": "\u0000"}, "query.cursor"),
    ("/v1/subscriptions", {"cursor": _cursor_of("sub_\u0000")}, "query.cursor"),
    ("/v1/webhook-endpoints", {"cursor": _cursor_of("\u0000")}, "query.cursor"),
    ("/v1/notifications", {"subscription_id": "sub_\u0000"}, "query.subscription_id"),
    ("/v1/notifications", {"space_id": "\u0000"}, "query.space_id"),
    ("/v1/notifications", {"cursor": _cursor_of("ntf_\u0000")}, "query.cursor"),
    ("/v1/spaces", {"keyword": "\u0000"}, "query.keyword"),
    ("/v1/spaces", {"cursor": _cursor_of("2026-03-02T12:00:00+00:00|\u0000")}, "query.cursor"),
    ("/v1/spaces", {"unknown\u0000": "1"}, "query"),
    (f"/v1/spaces/{SPACE}/events", {"cursor": _cursor_of("\u0000")}, "query.cursor"),
]
NUL_PATHS = [
    ("GET", "/v1/subscriptions/sub_%00", "path.subscription_id"),
    ("PATCH", "/v1/subscriptions/%00", "path.subscription_id"),
    ("DELETE", "/v1/subscriptions/%00", "path.subscription_id"),
    ("GET", "/v1/webhook-endpoints/we_%00", "path.endpoint_id"),
    ("PATCH", "/v1/webhook-endpoints/%00", "path.endpoint_id"),
    ("DELETE", "/v1/webhook-endpoints/%00", "path.endpoint_id"),
    ("POST", "/v1/webhook-endpoints/%00/rotate-secret", "path.endpoint_id"),
    ("POST", "/v1/webhook-endpoints/%00/enable", "path.endpoint_id"),
    ("GET", "/v1/notifications/ntf_%00", "path.notification_id"),
    ("POST", "/v1/notifications/%00/replay", "path.notification_id"),
    ("GET", "/v1/spaces/%00", "path.space_id"),
    ("GET", "/v1/spaces/1%00/events", "path.space_id"),
]


async def test_nul_in_query_parameters_and_path_ids_is_422_naming_them(
    ctx: AppContext, client: httpx.AsyncClient
) -> None:
    await add_space(ctx, ctx.clock.now() + timedelta(hours=1))
    await client.post("/v1/subscriptions", json={"creator_id": CREATOR, "email": "a@example.com"})
    for path, params, field in NUL_QUERIES:
        problem(await client.get(path, params=params), 422, field)
    for method, path, field in NUL_PATHS:
        kwargs: dict[str, Any] = {"json": {"paused": True}} if method == "PATCH" else {}
        problem(await client.request(method, path, **kwargs), 422, field)
    await still_works(client)


async def test_nul_is_refused_only_after_the_api_key(api: Any) -> None:
    """Unauthenticated requests get the 401, whatever else is wrong with them."""
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        r = await anonymous.post("/v1/subscriptions", json={"keyword": "\u0000", "email": "a@example.com"})
        problem(r, 401)
        problem(await anonymous.get("/v1/subscriptions/%00"), 401)


# --------------------------------------------------------------------------------------------
# Long query strings and path ids, odd cursors and dates


ID_ROUTES = [
    ("GET", "/v1/subscriptions/{}"),
    ("PATCH", "/v1/subscriptions/{}"),
    ("DELETE", "/v1/subscriptions/{}"),
    ("GET", "/v1/webhook-endpoints/{}"),
    ("PATCH", "/v1/webhook-endpoints/{}"),
    ("POST", "/v1/webhook-endpoints/{}/rotate-secret"),
    ("POST", "/v1/webhook-endpoints/{}/enable"),
    ("DELETE", "/v1/webhook-endpoints/{}"),
    ("GET", "/v1/notifications/{}"),
    ("POST", "/v1/notifications/{}/replay"),
]
ODD_IDS = ["x" * 8000, "sub_" + "é" * 2000, "%E2%80%AE" * 500, "%FF%FE", "%ED%A0%80", "..%2F..%2Fetc", "%20", "🐍"]


async def test_long_and_odd_path_ids_are_404(client: httpx.AsyncClient) -> None:
    for method, template in ID_ROUTES:
        for path_id in ODD_IDS:
            patch = {"paused": True} if "subscriptions" in template else {"enabled": True}
            kwargs: dict[str, Any] = {"json": patch} if method == "PATCH" else {}
            problem(await client.request(method, template.format(path_id), **kwargs), 404)
    for space_id in ["x" * 8000, "1" * 14, "é", "%FF", "%ED%A0%80", "1-2"]:
        problem(await client.get(f"/v1/spaces/{space_id}"), 422, "path.space_id")
        problem(await client.get(f"/v1/spaces/{space_id}/events"), 422, "path.space_id")
    await still_works(client)


async def test_very_long_query_strings(client: httpx.AsyncClient) -> None:
    problem(await client.get("/v1/subscriptions", params={"keyword": "k" * 513}), 422, "query.keyword")
    problem(await client.get("/v1/spaces", params={"keyword": "k" * 20000}), 422, "query.keyword")
    problem(await client.get("/v1/subscriptions", params={"cursor": "c" * 20000}), 422, "query.cursor")
    problem(await client.get("/v1/notifications", params={"space_id": "1" * 5000}), 422, "query.space_id")
    problem(await client.get("/v1/subscriptions", params={"webhook_endpoint_id": "w" * 5000}),
            422, "query.webhook_endpoint_id")
    assert (await client.get("/v1/subscriptions", params={"keyword": "é" * 512})).status_code == 200
    many = "&".join(f"p{i}={i}" for i in range(5000))
    assert (await client.get(f"/v1/subscriptions?{many}")).status_code == 200
    repeated = "&".join(["keyword=k"] * 3000)
    r = await client.get(f"/v1/subscriptions?{repeated}")
    assert r.status_code == 200, r.text


FORGED_CURSORS = [
    "not-base64!",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    _cursor_of("9" * 100),
    _cursor_of("-1"),
    _cursor_of(str(2**63)),
    _cursor_of("9999-12-31T23:59:59-14:00|x"),
    _cursor_of("0001-01-01T00:00:00+14:00|x"),
    _cursor_of("|"),
]


async def test_forged_cursors_are_422_or_a_page(ctx: AppContext, client: httpx.AsyncClient) -> None:
    """Id-ordered lists may treat a forged id as a position; the Space lists (start time, integer event
    ids) must refuse what does not parse, or what the databases cannot compare (BIGINT, year 10000)."""
    await add_space(ctx, ctx.clock.now() + timedelta(hours=1))
    await client.post("/v1/subscriptions", json={"creator_id": CREATOR, "email": "a@example.com"})
    for cursor in FORGED_CURSORS:
        for path in ["/v1/subscriptions", "/v1/webhook-endpoints", "/v1/notifications"]:
            r = await client.get(path, params={"cursor": cursor})
            if r.status_code != 200:  # a forged id is just a position in an id-ordered list
                problem(r, 422, "query.cursor")
        for path in ["/v1/spaces", f"/v1/spaces/{SPACE}/events"]:
            problem(await client.get(path, params={"cursor": cursor}), 422, "query.cursor")
    await still_works(client)


async def test_dates_beyond_range_are_422_naming_the_parameter(client: httpx.AsyncClient) -> None:
    await client.post("/v1/subscriptions", json={"creator_id": CREATOR, "email": "a@example.com"})
    for name, value in [
        ("starts_after", "9999-12-31T23:59:59-14:00"),  # past datetime.max once in UTC
        ("starts_after", "0001-01-01T00:00:00+14:00"),  # before datetime.min once in UTC
        ("starts_before", "0001-01-01T00:00:00+14:00"),
        ("starts_before", "not a date"),
        ("starts_after", "2026-02-30T00:00:00Z"),
        ("starts_after", "10000-01-01T00:00:00Z"),
    ]:
        problem(await client.get("/v1/spaces", params={name: value}), 422, f"query.{name}")
    extremes = {"starts_after": "0001-01-01T00:00:00Z", "starts_before": "9999-12-31T23:59:59Z"}
    assert (await client.get("/v1/spaces", params=extremes)).status_code == 200


async def test_overlong_idempotency_key_is_422_naming_the_header(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/subscriptions", json={"keyword": "k", "email": "a@example.com"}, headers={"Idempotency-Key": "k" * 256}
    )
    problem(r, 422, "header.idempotency-key")


# --------------------------------------------------------------------------------------------
# Content types


WRONG_BODIES = [
    ("text/plain", b'{"keyword": "k", "email": "a@example.com"}'),
    ("application/x-www-form-urlencoded", b"keyword=k&email=a%40example.com"),
    ("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="keyword"\r\n\r\nk\r\n--xyz--\r\n'),
    ("application/xml", b"<subscription><keyword>k</keyword></subscription>"),
    ("application/octet-stream", b"\x00\x01\x02"),
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("application/json", b""),
    ("application/json", b"null"),
    ("application/json", b"[]"),
    ("application/json", b'"a string"'),
    ("application/json", b"{"),
    ("application/json", b"\x00"),
    ("garbage;;;", b'{"keyword": "k"}'),
]


@pytest.mark.parametrize("path", ["/v1/subscriptions", "/v1/webhook-endpoints"])
async def test_wrong_content_types_and_non_object_bodies_are_422(client: httpx.AsyncClient, path: str) -> None:
    for content_type, raw in WRONG_BODIES:
        body = problem(await post_raw(client, path, raw, content_type), 422)
        assert body["invalid_params"][0]["name"].startswith("body"), (content_type, raw, body)
    assert (await client.get(path)).json()["data"] == []


async def test_json_under_other_json_media_types_is_read(client: httpx.AsyncClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json", "application/vnd.api+json"):
        r = await post_raw(client, "/v1/subscriptions", b'{"keyword": "k", "email": "a@example.com"}', content_type)
        assert r.status_code == 201, (content_type, r.text)


async def test_no_content_type_header_at_all(client: httpx.AsyncClient) -> None:
    """httpx would add one; a raw request shows what a bare client gets."""
    r = await client.post("/v1/subscriptions", content=b'{"keyword": "k", "email": "a@example.com"}')
    assert "content-type" not in r.request.headers
    assert r.status_code in (201, 422), r.text
    if r.status_code == 422:
        problem(r, 422, "body")


# --------------------------------------------------------------------------------------------
# Unicode keywords


UNICODE_KEYWORDS = [
    "CAFÉ ☕",
    "שלום עולם",  # Hebrew, right to left
    "مرحبا بالعالم",  # Arabic, right to left
    "e\u0301cole",  # e + COMBINING ACUTE ACCENT
    "Z\u0351\u0352\u0353algo",  # stacked combining marks
    "🐍🚀 Python",
    "👩\u200d👩\u200d👧 family",  # emoji joined by ZERO WIDTH JOINER
    "\u202eevil\u202c",  # RIGHT-TO-LEFT OVERRIDE ... POP DIRECTIONAL FORMATTING
    "量子コンピュータ",
    "ＦＵＬＬＷＩＤＴＨ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # mathematical alphanumerics, outside the BMP
]


async def test_unicode_keywords_are_stored_and_listed_back_intact(client: httpx.AsyncClient) -> None:
    created = {}
    for keyword in UNICODE_KEYWORDS:
        r = await client.post("/v1/subscriptions", json={"keyword": keyword, "email": "a@example.com"})
        assert r.status_code == 201, (keyword, r.text)
        assert r.json()["target"]["keyword"] == keyword
        created[keyword] = r.json()["id"]
    for keyword, sub_id in created.items():
        got = (await client.get(f"/v1/subscriptions/{sub_id}")).json()
        assert got["target"]["keyword"] == keyword
        assert unicodedata.normalize("NFC", got["target"]["keyword"]) == unicodedata.normalize("NFC", keyword)
    listed = {s["id"]: s["target"]["keyword"] for s in (await client.get("/v1/subscriptions")).json()["data"]}
    assert listed == {v: k for k, v in created.items()}
    # The keyword filter matches on the normalized form: case, composition and width do not matter.
    for query, keyword in [
        ("café ☕", "CAFÉ ☕"),
        ("CAFE\u0301 ☕", "CAFÉ ☕"),
        ("école", "e\u0301cole"),
        ("ÉCOLE", "e\u0301cole"),
        ("fullwidth", "ＦＵＬＬＷＩＤＴＨ"),
        ("unicode", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"),
        ("  שלום   עולם ", "שלום עולם"),
    ]:
        found = (await client.get("/v1/subscriptions", params={"keyword": query})).json()["data"]
        assert [s["id"] for s in found] == [created[keyword]], query


async def test_keyword_whitespace_of_every_kind_collapses(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/subscriptions", json={"keyword": "\u3000 python\u00a0\t\n async\u2003 ", "email": "a@example.com"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["target"]["keyword"] == "python async"
    problem(await client.post("/v1/subscriptions", json={"keyword": "\u2003\u3000\n", "email": "a@example.com"}),
            422, "body.keyword")


@pytest.mark.parametrize(
    ("keyword", "title"),
    [
        ("CAFÉ ☕", "café ☕ chat"),
        ("café", "CAFE\u0301 du matin"),  # decomposed title, composed keyword
        ("e\u0301cole", "L'École des fans"),
        ("STRASSE", "Straße talk"),  # casefold: ß is ss
        ("ＡＩ", "AI news"),  # NFKC: full width letters
        ("שלום עולם", "שידור: שלום עולם!"),
        ("مرحبا", "مرحبا بالعالم"),
        ("🐍", "Live 🐍 coding"),
        ("量子", "量子コンピュータ入門"),  # no word boundaries in Japanese
    ],
)
async def test_unicode_keywords_match_space_titles_after_normalization(
    ctx: AppContext, client: httpx.AsyncClient, keyword: str, title: str
) -> None:
    await add_space(ctx, ctx.clock.now() + timedelta(hours=2), space_id="1UNICODE00000", creator_id="42", title=title)
    await add_space(ctx, ctx.clock.now() + timedelta(hours=3), space_id="1OTHER0000000", creator_id="42",
                    title="Nothing to see here")
    sub = (await client.post("/v1/subscriptions", json={"keyword": keyword, "email": "a@example.com"})).json()
    listed = (await client.get("/v1/spaces")).json()["data"]
    assert [(s["id"], s["title"], s["matched_subscription_ids"]) for s in listed] == [
        ("1UNICODE00000", title, [sub["id"]])
    ]
    got = await client.get("/v1/spaces/1UNICODE00000")
    assert got.status_code == 200 and got.json()["title"] == title
    assert (await client.get("/v1/spaces/1OTHER0000000")).status_code == 404
    filtered = (await client.get("/v1/spaces", params={"keyword": keyword.upper()})).json()["data"]
    assert [s["id"] for s in filtered] == ["1UNICODE00000"]


async def test_unicode_in_query_and_path_is_harmless(client: httpx.AsyncClient) -> None:
    for value in ["\u202e", "🐍" * 100, "\ufeff", "e\u0301" * 200]:
        r = await client.get("/v1/subscriptions", params={"keyword": value})
        assert r.status_code == 200, (value, r.text)
    for raw in ["%ED%A0%80", "%FF", "%C0%AF", "%"]:  # surrogate, invalid and overlong UTF-8, a lone %
        r = await client.get(f"/v1/subscriptions?keyword={raw}")
        assert r.status_code == 200, (raw, r.text)
        r = await client.get(f"/v1/spaces?keyword={raw}")
        assert r.status_code == 200, (raw, r.text)
    problem(await client.get(f"/v1/subscriptions/{quote('sub_🐍')}"), 404)


# --------------------------------------------------------------------------------------------
# The answer comes after the commit


async def test_a_write_is_committed_before_it_is_answered(client: httpx.AsyncClient) -> None:
    """A commit that fails must not have been answered 201 already (and a 201 means the row is there:
    the client's next request sees it)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    def mark(session: Session, _flush_context: object, _instances: object) -> None:
        if any(getattr(obj, "keyword", None) == "commit fails" for obj in session.new):
            session.info["doomed"] = True

    def refuse(session: Session) -> None:
        if session.info.pop("doomed", False):
            raise RuntimeError("the commit failed")

    event.listen(Session, "before_flush", mark)
    event.listen(Session, "before_commit", refuse)
    try:
        r = await client.post("/v1/subscriptions", json={"keyword": "commit fails", "email": "a@example.com"})
    finally:
        event.remove(Session, "before_flush", mark)
        event.remove(Session, "before_commit", refuse)
    problem(r, 500)
    assert (await client.get("/v1/subscriptions")).json()["data"] == []
    for i in range(20):
        created = await client.post("/v1/subscriptions", json={"keyword": f"k{i}", "email": "a@example.com"})
        assert (await client.delete(f"/v1/subscriptions/{created.json()['id']}")).status_code == 204
