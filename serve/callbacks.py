"""Where a `callback_url` may point: the rules that keep webhooks from reaching into the studio's network
(SSRF), checked twice — when a video is created (400 `invalid_callback_url` naming the rule) and again
at every send, on the addresses the host resolves to then (a name that later resolves to 127.0.0.1 is
refused: DNS rebinding). The dispatcher connects to the address it checked, never re-resolving.

A callback must be `https` (`http` only with `webhooks.allow_http`), carry no user:password, name its
host by DNS name (no IP literals: `2130706433`, `0x7f.1`, `[::1]` and friends), not be `localhost` or a
cloud metadata name, use a port other than 0, keep to DNS's lengths (labels of 1–63 characters, at most
253 in all), and resolve only to public unicast addresses. An IPv6 answer that carries an IPv4 address
counts as that address (IPv4-mapped, NAT64) or is refused (6to4, Teredo, local-use NAT64; see
`_is_public`). `webhooks.allowed_hosts` lists the exceptions a studio with internal receivers needs:
host names, or networks (`10.20.0.0/16`) whose addresses (literal or resolved) are then allowed.

A host that does not resolve at send time is CallbackUnresolved: a transient failure the dispatcher
retries on its schedule (a DNS blip must not lose the webhook), unlike the rules, which are final.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses
BLOCKED_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "instance-data"})
BLOCKED_SUFFIXES = (".localhost", ".internal", ".local")
MAX_LABEL_CHARS, MAX_NAME_CHARS = 63, 253  # RFC 1035 (a name of 255 octets on the wire is 253 as text)
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
# IPv6 ranges refused whatever they carry (why: see _is_public)
REFUSED_IPV6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215 local-use NAT64
    ipaddress.IPv6Network("2002::/16"),  # 6to4
    ipaddress.IPv6Network("2001::/32"),  # Teredo
)


class CallbackRefused(ValueError):
    """The callback URL breaks a rule; the message names it (never the receiver's answer)."""


class CallbackUnresolved(CallbackRefused):
    """The callback's host does not resolve now: perhaps a DNS blip, so worth another try later."""


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """A checked callback: where to connect (a checked address) and what to call it (Host, TLS name)."""

    url: str  # the callback as stored
    host: str  # its host name: the Host header and the TLS server name
    address: str  # the address the send connects to
    connect_url: str  # `url` with the host replaced by `address`


class CallbackPolicy:
    def __init__(
        self,
        *,
        allow_http: bool = False,
        allowed_hosts: list[str] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_http = allow_http
        self.allowed_names: set[str] = set()
        self.allowed_networks: list[IPNetwork] = []
        for entry in allowed_hosts or []:
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_names.add(entry.lower().rstrip("."))
        self.resolver = resolver or _system_resolver

    def check_url(self, url: str) -> str:
        """The host of `url` if its form passes (create time); CallbackRefused naming the rule if not."""
        parts = urlsplit(url)
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            allowed = " or ".join(schemes)
            raise CallbackRefused(f"`callback_url` must use {allowed}, not {parts.scheme or 'no scheme'}")
        if parts.username is not None or parts.password is not None:
            raise CallbackRefused("`callback_url` must not carry a user name or password")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise CallbackRefused("`callback_url` must name a host")
        try:
            port = parts.port
        except ValueError:  # not a number, or past 65535: urllib's own message says which
            raise CallbackRefused(f"`callback_url` has an invalid port in {parts.netloc!r}") from None
        if port == 0:
            raise CallbackRefused("`callback_url` must not use port 0")
        literal = _ip_literal(host)
        if literal is not None:
            if self._network_allowed(literal):
                return host
            raise CallbackRefused(
                f"`callback_url` must name its host by DNS name, not by the address {host} "
                "(list internal receivers in `webhooks.allowed_hosts`)"
            )
        _check_dns_lengths(host)
        if host in self.allowed_names:
            return host
        if host in BLOCKED_NAMES or host.endswith(BLOCKED_SUFFIXES) or "." not in host:
            raise CallbackRefused(f"`callback_url` host {host!r} is a local or internal name")
        return host

    async def target(self, url: str) -> CallbackTarget:
        """Check `url` again and resolve its host now; every address must be public (or allowed)."""
        host = self.check_url(url)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        literal = _ip_literal(host)
        if literal is not None or host in self.allowed_names:
            addresses = [host] if literal is not None else await self._resolve(host, port)
        else:
            addresses = await self._resolve(host, port)
            for address in addresses:
                if not self._public_or_allowed(ipaddress.ip_address(address)):
                    raise CallbackRefused(
                        f"`callback_url` host {host!r} resolves to a non-public address; refused"
                    )
        address = addresses[0]
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        connect_url = parts._replace(netloc=netloc).geturl()
        return CallbackTarget(url=url, host=host, address=address, connect_url=connect_url)

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            addresses = await self.resolver(host, port)
        except OSError:
            raise CallbackUnresolved(f"`callback_url` host {host!r} does not resolve") from None
        if not addresses:
            raise CallbackUnresolved(f"`callback_url` host {host!r} does not resolve")
        return addresses

    def _public_or_allowed(self, address: IPAddress) -> bool:
        return self._network_allowed(address) or _is_public(address)

    def _network_allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allowed_networks)


def _is_public(address: IPAddress) -> bool:
    """Whether `address` is public unicast. IPv6 answers that reach an IPv4 address are judged by it:
    - IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) are that IPv4 address. NAT64 is checked,
      not refused: on an IPv6-only cluster DNS64 answers every IPv4-only receiver in that form.
    - Local-use NAT64 (64:ff9b:1::/48), 6to4 (2002::/16) and Teredo (2001::/32) are refused outright.
      Where local-use NAT64 puts the IPv4 address depends on the operator's prefix length, unknown here;
      6to4 (deprecated, RFC 7526) and Teredo reach their IPv4 host through relays of the network's
      choosing, and Teredo carries two IPv4 addresses (server and obfuscated client). No webhook receiver
      needs them; `allowed_hosts` can still let one through.
    - Other IETF-reserved IPv6 (the deprecated IPv4-compatible ::a.b.c.d among them) is refused."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in NAT64_PREFIX:
            address = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        elif address.is_reserved or any(address in network for network in REFUSED_IPV6):
            return False
    return address.is_global and not address.is_multicast


def _check_dns_lengths(host: str) -> None:
    """CallbackRefused when `host` (a name, without its trailing dot) breaks DNS's length rules."""
    if len(host) > MAX_NAME_CHARS:
        raise CallbackRefused(
            f"`callback_url` host name is {len(host)} characters long; DNS allows at most {MAX_NAME_CHARS}"
        )
    for label in host.split("."):
        if not label:
            raise CallbackRefused("`callback_url` host has an empty label")
        if len(label) > MAX_LABEL_CHARS:
            raise CallbackRefused(
                f"`callback_url` host has a label of {len(label)} characters; "
                f"DNS allows at most {MAX_LABEL_CHARS}"
            )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))
