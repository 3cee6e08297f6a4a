"""Where downloads may go: http(s) only, public addresses only, checked after DNS.

Shared by model-weight downloads (models/weights.py) and the URL-list download
stage (facecap/sources/downloader.py). A URL is refused when its scheme is not
http(s), or when any address its host resolves to is loopback, private,
link-local (cloud metadata 169.254.169.254), multicast or otherwise not
global, including IPv4 addresses hidden in IPv6 forms (mapped, NAT64, 6to4,
Teredo), unless an explicit CIDR allow-list names it. Callers connect to the
addresses returned here (see `pinned`), never resolve the name a second time,
so a DNS answer cannot change between the check and the connection, and they
check again on every redirect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

import httpx

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 forms that carry an IPv4 address a gateway or tunnel delivers to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class GuardError(Exception):
    """A URL that must not be fetched. `reason`: invalid_url, blocked_address or dns."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def allow_networks(allow: list[str], setting: str = "allow_addresses") -> list[IPNetwork]:
    """Parse a CIDR allow-list; a bad entry is a ValueError naming the setting."""
    networks = []
    for net in allow:
        try:
            networks.append(ipaddress.ip_network(net, strict=False))
        except ValueError as exc:
            raise ValueError(f"{setting}: {net!r} is not a CIDR range ({exc})") from exc
    return networks


def address_allowed(address: str, networks: list[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address)
    if any(ip in net for net in networks):
        return True
    embedded = _embedded_ipv4(ip)
    if embedded is not None and not (embedded.is_global and not embedded.is_multicast):
        return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int


def parse_target(url: str, verb: str = "download") -> Target:
    """Scheme, host and port of an http(s) URL; GuardError(invalid_url) otherwise."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise GuardError("invalid_url", f"refusing to {verb} {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise GuardError("invalid_url", f"refusing to {verb} {url!r}: only http(s) URLs are fetched "
                                        "(use a local path instead)")
    if not parts.hostname:
        raise GuardError("invalid_url", f"refusing to {verb} {url!r}: no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise GuardError("invalid_url", f"refusing to {verb} {url!r}: {exc}") from exc
    return Target(url, parts.hostname, port)


def _filter(target: Target, infos: list, networks: list[IPNetwork], setting: str, verb: str) -> list[str]:
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if not address_allowed(address, networks):
            raise GuardError(
                "blocked_address",
                f"refusing to {verb} {target.url!r}: {target.host} resolves to {address}, a non-public address "
                f"(allow it explicitly with {setting}, e.g. 127.0.0.1/32)")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise GuardError("dns", f"cannot resolve {target.host}: no addresses")
    return addresses


def checked_addresses(url: str, networks: list[IPNetwork], setting: str = "allow_addresses",
                      verb: str = "download") -> list[str]:
    """The addresses url's host resolves to, every one of them allowed; else GuardError."""
    target = parse_target(url, verb)
    try:
        infos = socket.getaddrinfo(target.host, target.port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise GuardError("dns", f"cannot resolve {target.host}: {exc}") from exc
    return _filter(target, infos, networks, setting, verb)


async def checked_addresses_async(url: str, networks: list[IPNetwork], setting: str = "allow_addresses",
                                  verb: str = "download") -> list[str]:
    """`checked_addresses` without blocking the event loop (the loop resolves in its thread pool)."""
    target = parse_target(url, verb)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise GuardError("dns", f"cannot resolve {target.host}: {exc}") from exc
    return _filter(target, infos, networks, setting, verb)


def pinned(client: httpx.Client | httpx.AsyncClient, url: str, address: str,
           headers: dict[str, str] | None = None) -> httpx.Request:
    """A GET of `url` that connects to `address` (already checked) instead of resolving the host again."""
    original = httpx.URL(url)
    return client.build_request(
        "GET",
        original.copy_with(host=address, fragment=None),
        headers={**(headers or {}), "Host": original.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        # TLS still sends and verifies the certificate against the real host name.
        extensions={"sni_hostname": original.host},
    )
