"""The webhook egress policy: every SSRF target is refused with an error that names the policy."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from app.delivery.egress import (
    EgressPolicyError,
    PolicyResolver,
    check_webhook_url,
    check_webhook_url_async,
    is_forbidden_address,
)

LOOPBACK_V4 = ["127.0.0.0/8"]

FORBIDDEN = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "0.0.0.0/8"),
    ("::", "unspecified"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fec0::1", "site-local"),
    ("192.0.0.8", "IETF protocol assignment"),
    ("192.0.2.10", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("2001:db8::1", "documentation"),
    ("::ffff:10.0.0.1", "IPv4-mapped"),
    ("::ffff:127.0.0.1", "loopback address 127.0.0.1 embedded in IPv4-mapped"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::10.0.0.1", "IPv4-compatible"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("2002:0a00:0001::1", "private address 10.0.0.1 embedded in 6to4"),
    ("2002:7f00:0001::", "loopback address 127.0.0.1 embedded in 6to4"),
    ("64:ff9b::10.0.0.1", "private address 10.0.0.1 embedded in NAT64"),
    ("64:ff9b::a9fe:a9fe", "link-local address (cloud metadata endpoint) 169.254.169.254 embedded in NAT64"),
    ("64:ff9b:1::192.168.0.1", "private address 192.168.0.1 embedded in NAT64"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:2::1", "benchmarking"),
    ("100::1", "discard-only"),
    ("4000::1", "outside global unicast"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",  # just past 172.16/12
    "100.128.0.1",  # just past 100.64/10
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "2002:0808:0808::1",  # 6to4 around a public address
    "64:ff9b::8.8.8.8",  # NAT64 around a public address
]


@pytest.mark.parametrize(("ip", "reason"), FORBIDDEN)
def test_forbidden_addresses_are_refused_with_a_reason(ip: str, reason: str) -> None:
    verdict = is_forbidden_address(ip)
    assert verdict is not None and reason in verdict


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_allowed(ip: str) -> None:
    assert is_forbidden_address(ip) is None


def test_allowed_networks_exempt_the_address_or_the_ipv4_it_wraps() -> None:
    assert is_forbidden_address("127.0.0.1", LOOPBACK_V4) is None
    assert is_forbidden_address("::ffff:127.0.0.1", LOOPBACK_V4) is None
    assert is_forbidden_address("10.1.2.3", ["10.1.0.0/16"]) is None
    # Only the listed networks: the rest stays forbidden.
    assert is_forbidden_address("10.2.0.1", ["10.1.0.0/16"]) == "private address"
    assert is_forbidden_address("::1", LOOPBACK_V4) == "loopback address"


def test_unparseable_address_is_forbidden_not_an_exception() -> None:
    assert "not an IP address" in (is_forbidden_address("example.com") or "")


@pytest.mark.parametrize(("ip", "reason"), FORBIDDEN)
def test_url_with_a_forbidden_literal_ip_is_refused_naming_the_policy(ip: str, reason: str) -> None:
    host = f"[{ip.replace('%', '%25')}]" if ":" in ip else ip
    with pytest.raises(EgressPolicyError) as caught:
        check_webhook_url(f"https://{host}/hook", allow_http=False, allowed_networks=())
    message = str(caught.value)
    assert "refused by the egress policy" in message
    assert reason in message


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "hooks.localhost"])
def test_localhost_names_are_refused_as_loopback(host: str) -> None:
    with pytest.raises(EgressPolicyError, match="loopback address.*egress policy"):
        check_webhook_url(f"https://{host}/hook", allow_http=False, allowed_networks=())


def test_exempting_loopback_lets_tests_reach_a_local_receiver() -> None:
    check_webhook_url("http://127.0.0.1:8080/hook", allow_http=True, allowed_networks=LOOPBACK_V4)
    check_webhook_url("http://localhost:8080/hook", allow_http=True, allowed_networks=LOOPBACK_V4)
    with pytest.raises(EgressPolicyError, match="private address"):
        check_webhook_url("http://10.0.0.1:8080/hook", allow_http=True, allowed_networks=LOOPBACK_V4)


def test_http_is_refused_unless_allowed() -> None:
    with pytest.raises(EgressPolicyError, match="webhook URL must use https"):
        check_webhook_url("http://8.8.8.8/hook", allow_http=False, allowed_networks=())
    check_webhook_url("http://8.8.8.8/hook", allow_http=True, allowed_networks=())
    check_webhook_url("https://8.8.8.8/hook", allow_http=False, allowed_networks=())


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/x", "file:///etc/passwd", "gopher://8.8.8.8/", "javascript:alert(1)"])
def test_other_schemes_are_refused_even_with_http_allowed(url: str) -> None:
    with pytest.raises(EgressPolicyError, match="must use http or https"):
        check_webhook_url(url, allow_http=True, allowed_networks=())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://user:pw@example.com/hook", "user name or password"),
        ("https://user@example.com/hook", "user name or password"),
        ("https://evil.com%2f@8.8.8.8/", "user name or password"),
        ("https:///hook", "host name"),
        ("https://example.com:0/hook", "invalid port"),
        ("https://example.com:99999/hook", "malformed"),
        ("https://example .com/hook", "whitespace"),
        ("https://example.com/ho\nok", "whitespace or control"),
        ("https://evil.com\\@127.0.0.1/", "malformed"),
        ("https://example.com/" + "a" * 2100, "longer than 2048"),
        ("", "empty"),
    ],
)
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(EgressPolicyError, match=message):
        check_webhook_url(url, allow_http=False, allowed_networks=())


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "017700000001", "127.1", "10.1"])
def test_legacy_numeric_ipv4_forms_are_refused(host: str) -> None:
    with pytest.raises(EgressPolicyError, match="non-canonical IP address.*egress policy"):
        check_webhook_url(f"http://{host}/hook", allow_http=True, allowed_networks=LOOPBACK_V4)


def test_public_host_names_pass_the_syntax_check_without_dns() -> None:
    check_webhook_url("https://hooks.example.com/spacebell?x=1", allow_http=False, allowed_networks=())
    check_webhook_url("https://bücher.example/hook", allow_http=False, allowed_networks=())


# --- resolution at registration ----------------------------------------------------------------


def _fake_getaddrinfo(answers: dict[str, list[str]]) -> Any:
    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answers[host]
        ]

    return getaddrinfo


async def test_async_check_refuses_a_host_if_any_resolved_address_is_forbidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(
        loop,
        "getaddrinfo",
        _fake_getaddrinfo(
            {"public.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.5"]}
        ),
    )
    await check_webhook_url_async("https://public.example/hook", allow_http=False, allowed_networks=())
    with pytest.raises(EgressPolicyError) as caught:
        await check_webhook_url_async("https://mixed.example/hook", allow_http=False, allowed_networks=())
    assert str(caught.value) == (
        "webhook host mixed.example resolves to 10.0.0.5 (private address) — refused by the egress policy"
    )
    with pytest.raises(EgressPolicyError, match="could not be resolved"):
        await check_webhook_url_async("https://missing.example/hook", allow_http=False, allowed_networks=())


async def test_async_check_resolves_for_real_and_refuses_localhost() -> None:
    with pytest.raises(EgressPolicyError, match="loopback address.*egress policy"):
        await check_webhook_url_async("https://localhost/hook", allow_http=False, allowed_networks=())
    await check_webhook_url_async("http://localhost:9/hook", allow_http=True, allowed_networks=LOOPBACK_V4)
    with pytest.raises(EgressPolicyError, match="could not be resolved"):
        await check_webhook_url_async("https://nothing-here.invalid/hook", allow_http=False, allowed_networks=())


async def test_async_check_applies_the_syntax_rules_too() -> None:
    with pytest.raises(EgressPolicyError, match="must use https"):
        await check_webhook_url_async("http://127.0.0.1/hook", allow_http=False, allowed_networks=LOOPBACK_V4)
    with pytest.raises(EgressPolicyError, match="private address"):
        await check_webhook_url_async("https://[::ffff:192.168.0.1]/", allow_http=False, allowed_networks=())


# --- resolution at connect time ------------------------------------------------------------------


class StaticResolver(AbstractResolver):
    """Answers from a table, like DNS that an attacker controls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        pass


async def test_policy_resolver_drops_forbidden_addresses() -> None:
    resolver = PolicyResolver((), inner=StaticResolver({"mixed.example": ["10.0.0.5", "93.184.216.34", "::1"]}))
    results = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"]


async def test_policy_resolver_refuses_when_nothing_allowed_remains() -> None:
    resolver = PolicyResolver((), inner=StaticResolver({"rebound.example": ["169.254.169.254"]}))
    with pytest.raises(EgressPolicyError) as caught:
        await resolver.resolve("rebound.example", 443)
    assert "rebound.example resolves to 169.254.169.254" in str(caught.value)
    assert "refused by the egress policy" in str(caught.value)


async def test_policy_resolver_honours_allowed_networks_with_the_default_resolver() -> None:
    resolver = PolicyResolver(LOOPBACK_V4)
    try:
        results = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    finally:
        await resolver.close()
    assert results and all(r["host"].startswith("127.") for r in results)
    with pytest.raises(EgressPolicyError, match="loopback"):
        await PolicyResolver(()).resolve("localhost", 80, socket.AF_UNSPEC)
