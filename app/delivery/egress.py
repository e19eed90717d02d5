"""Webhook egress policy: which URLs and addresses the service may POST to (SSRF defence).

Two checks, because a URL checked once can later resolve elsewhere (DNS rebinding):

* `check_webhook_url` / `check_webhook_url_async` when an endpoint is registered or changed;
* `PolicyResolver` inside the sender's connector, on every fresh connection, plus
  `check_webhook_url` in the sender before each request, because aiohttp never asks the
  resolver about IP literals.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Union
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
NetworkLike = Union[str, IPNetwork]

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_SECONDS = 5.0
POLICY = "refused by the egress policy"


class EgressPolicyError(ValueError):
    """A webhook URL or address the service refuses to contact; `reason` is safe to show users."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Order matters: the first match names the reason, so specific ranges come before broad ones.
_IPV4_FORBIDDEN: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified address", _nets("0.0.0.0/32")),
    ('"this network" address (0.0.0.0/8)', _nets("0.0.0.0/8")),
    ("loopback address", _nets("127.0.0.0/8")),
    ("private address", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("shared/CGNAT address (100.64.0.0/10)", _nets("100.64.0.0/10")),
    ("link-local address (cloud metadata endpoint)", _nets("169.254.169.254/32")),
    ("link-local address", _nets("169.254.0.0/16")),
    ("IETF protocol assignment (192.0.0.0/24)", _nets("192.0.0.0/24")),
    ("documentation address", _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")),
    ("6to4 relay anycast address", _nets("192.88.99.0/24")),
    ("benchmarking address (198.18.0.0/15)", _nets("198.18.0.0/15")),
    ("multicast address", _nets("224.0.0.0/4")),
    ("broadcast address", _nets("255.255.255.255/32")),
    ("reserved address (240.0.0.0/4)", _nets("240.0.0.0/4")),
)

_IPV6_FORBIDDEN: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified address", _nets("::/128")),
    ("loopback address", _nets("::1/128")),
    ("IPv4-compatible IPv6 address (deprecated)", _nets("::/96")),
    ("IPv4-translated IPv6 address", _nets("::ffff:0:0:0/96")),
    ("discard-only address (100::/64)", _nets("100::/64")),
    ("Teredo tunnel address (2001::/32)", _nets("2001::/32")),
    ("benchmarking address (2001:2::/48)", _nets("2001:2::/48")),
    ("IETF protocol assignment (2001::/23)", _nets("2001::/23")),
    ("documentation address", _nets("2001:db8::/32", "3fff::/20")),
    ("unique local address (fc00::/7)", _nets("fc00::/7")),
    ("link-local address", _nets("fe80::/10")),
    ("site-local address (deprecated)", _nets("fec0::/10")),
    ("multicast address", _nets("ff00::/8")),
)

# Only 2000::/3 is global unicast; the wrapped-IPv4 prefixes below are unwrapped before this check.
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215 local-use NAT64; we assume the common /96 layout (IPv4 in the last 32 bits).
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")

_LOCALHOST_NAMES = ("localhost", "localhost.", "localhost.localdomain")


def parse_networks(networks: Iterable[NetworkLike] | None) -> tuple[IPNetwork, ...]:
    """CIDR strings or network objects -> a tuple of networks (host bits allowed)."""
    if not networks:
        return ()
    return tuple(
        n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else ipaddress.ip_network(n, strict=False)
        for n in networks
    )


def _parse_ip(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = ip
    else:
        address = ipaddress.ip_address(ip.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # fe80::1%eth0 — the zone does not change which range the address is in.
        address = ipaddress.IPv6Address(int(address))
    return address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address forwards to, for the wrappings we unwrap."""
    if address in _IPV4_MAPPED:
        return "IPv4-mapped", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64_WELL_KNOWN or address in _NAT64_LOCAL_USE:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return "6to4", ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def _first_match(address: IPAddress, table: tuple[tuple[str, tuple[IPNetwork, ...]], ...]) -> str | None:
    for reason, networks in table:
        if any(address in network for network in networks):
            return reason
    return None


def _in_any(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def is_forbidden_address(ip: str | IPAddress, allowed_networks: Iterable[NetworkLike] | None = ()) -> str | None:
    """Why the service must not connect to `ip`, or None when it may.

    An address inside `allowed_networks` (as given, or the IPv4 address it wraps) is exempt.
    Unparseable input is forbidden rather than raising.
    """
    allowed = parse_networks(allowed_networks)
    try:
        address = _parse_ip(ip)
    except ValueError:
        return f"not an IP address ({ip!s})"
    if _in_any(address, allowed):
        return None

    if isinstance(address, ipaddress.IPv4Address):
        return _first_match(address, _IPV4_FORBIDDEN)

    embedded = _embedded_ipv4(address)
    if embedded is not None:
        wrapping, inner = embedded
        if _in_any(inner, allowed):
            return None
        inner_reason = _first_match(inner, _IPV4_FORBIDDEN)
        return f"{inner_reason} {inner} embedded in {wrapping} form" if inner_reason else None

    reason = _first_match(address, _IPV6_FORBIDDEN)
    if reason is None and address not in _IPV6_GLOBAL_UNICAST:
        reason = "reserved address outside global unicast (2000::/3)"
    return reason


def _refusal(host: str, ip: str | IPAddress, reason: str) -> str:
    if host == str(ip):
        return f"webhook URL points at {ip} ({reason}) — {POLICY}"
    return f"webhook host {host} resolves to {ip} ({reason}) — {POLICY}"


def _is_legacy_numeric_ipv4(host: str) -> bool:
    """2130706433, 0x7f.1, 017700000001 … — forms getaddrinfo maps onto an IPv4 address."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def _split_and_check_syntax(url: str, allow_http: bool) -> tuple[str, str, int]:
    """Everything that can be judged without DNS; returns (scheme, host as aiohttp sees it, port).

    The URL is parsed by yarl (what aiohttp will use) and by urllib; if they disagree about the
    host the URL is refused, so no parser differential can smuggle in a different target.
    """
    if not isinstance(url, str) or not url:
        raise EgressPolicyError("webhook URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise EgressPolicyError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise EgressPolicyError("webhook URL contains whitespace or control characters")
    try:
        parsed = URL(url)
        port = parsed.port
        other = urlsplit(url)
        other_host = other.hostname
    except (ValueError, UnicodeError) as exc:
        raise EgressPolicyError(f"webhook URL is malformed ({exc})") from None
    scheme = (parsed.scheme or "").lower()
    allowed_schemes = ("https", "http") if allow_http else ("https",)
    if scheme not in allowed_schemes:
        raise EgressPolicyError(
            "webhook URL must use http or https" if allow_http else "webhook URL must use https"
        )
    if parsed.raw_user is not None or parsed.raw_password is not None or "@" in other.netloc:
        raise EgressPolicyError("webhook URL must not contain a user name or password")
    host = (parsed.raw_host or "").lower()
    if not host:
        raise EgressPolicyError("webhook URL must have a host name")
    if not _same_host(parsed.host or "", other_host or ""):
        raise EgressPolicyError("webhook URL is ambiguous (parsers disagree about its host)")
    if not port:
        raise EgressPolicyError("webhook URL has an invalid port")
    if _is_legacy_numeric_ipv4(host):
        raise EgressPolicyError(f"webhook host {host} is a non-canonical IP address — {POLICY}")
    return scheme, host, port


def _same_host(first: str, second: str) -> bool:
    first, second = first.lower().replace("%25", "%"), second.lower().replace("%25", "%")
    if first == second:
        return True
    try:  # IPv6 literals have many spellings: 2002:0a00:0001::1 == 2002:a00:1::1
        return ipaddress.ip_address(first) == ipaddress.ip_address(second)
    except ValueError:
        return False


def _literal_ip(host: str) -> str | None:
    try:
        return str(_parse_ip(host))
    except ValueError:
        return None


def _is_localhost_name(host: str) -> bool:
    return host in _LOCALHOST_NAMES or host.endswith((".localhost", ".localhost."))


def _check_addresses(host: str, addresses: Iterable[str], allowed: tuple[IPNetwork, ...]) -> None:
    """Refuse if ANY address is forbidden (registration is strict; mixed answers are suspicious)."""
    for ip in addresses:
        reason = is_forbidden_address(ip, allowed)
        if reason is not None:
            raise EgressPolicyError(_refusal(host, ip, reason))


def _check_localhost(host: str, allowed: tuple[IPNetwork, ...]) -> None:
    """localhost always means loopback (RFC 6761); it passes only if a loopback network is exempt."""
    loopbacks = ("127.0.0.1", "::1")
    if all(is_forbidden_address(ip, allowed) is not None for ip in loopbacks):
        raise EgressPolicyError(_refusal(host, loopbacks[0], "loopback address"))


def _check_known_host(host: str, allowed: tuple[IPNetwork, ...]) -> bool:
    """Check hosts whose addresses are known without DNS; False when DNS is needed."""
    ip = _literal_ip(host)
    if ip is not None:
        _check_addresses(host, [ip], allowed)
        return True
    if _is_localhost_name(host):
        _check_localhost(host, allowed)
        return True
    return False


def check_webhook_url(
    url: str, *, allow_http: bool = False, allowed_networks: Iterable[NetworkLike] | None = ()
) -> None:
    """Syntax and literal-address check, no DNS: scheme, no userinfo, a host, no forbidden IP literal.

    `localhost` names count as loopback. Use `check_webhook_url_async` at registration to also
    check what a host name resolves to.
    """
    _scheme, host, _port = _split_and_check_syntax(url, allow_http)
    _check_known_host(host, parse_networks(allowed_networks))


async def check_webhook_url_async(
    url: str,
    *,
    allow_http: bool = False,
    allowed_networks: Iterable[NetworkLike] | None = (),
    resolve_timeout: float = RESOLVE_TIMEOUT_SECONDS,
) -> None:
    """`check_webhook_url`, then resolve the host and refuse if ANY address it resolves to is forbidden."""
    _scheme, host, port = _split_and_check_syntax(url, allow_http)
    allowed = parse_networks(allowed_networks)
    if _check_known_host(host, allowed):
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=resolve_timeout
        )
    except (OSError, UnicodeError) as exc:
        raise EgressPolicyError(f"webhook host {host} could not be resolved ({exc})") from None
    except TimeoutError:
        raise EgressPolicyError(f"webhook host {host} could not be resolved (timed out)") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise EgressPolicyError(f"webhook host {host} resolves to no address")
    _check_addresses(host, addresses, allowed)


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that drops forbidden addresses after DNS, at connect time.

    Raises `EgressPolicyError` when nothing allowed remains, so a host that was public at
    registration and now resolves to 10.0.0.5 (DNS rebinding) is never connected to.
    """

    def __init__(
        self,
        allowed_networks: Iterable[NetworkLike] | None = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._allowed = parse_networks(allowed_networks)
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refused: list[tuple[str, str]] = []
        for result in results:
            reason = is_forbidden_address(result["host"], self._allowed)
            if reason is None:
                allowed.append(result)
            else:
                refused.append((result["host"], reason))
        if refused:
            log.warning(
                "egress policy dropped %d address(es) of webhook host %s: %s",
                len(refused),
                host,
                ", ".join(f"{ip} ({reason})" for ip, reason in refused),
            )
        if not allowed:
            if refused:
                ip, reason = refused[0]
                raise EgressPolicyError(_refusal(host, ip, reason))
            raise EgressPolicyError(f"webhook host {host} resolves to no address")
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
