"""Which addresses egress may dial: globally routable unicast only (unless a route says
private_network), checked on every address a host resolves to. Standard library only."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from bottle_tasks.contract import LAN_CIDRS

# Ranges Python's ipaddress still calls global but that must never be reachable from a bottle.
EXTRA_NON_GLOBAL = (
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT (is_global already False on 3.11)
    ipaddress.ip_network("224.0.0.0/4"),  # multicast
    ipaddress.ip_network("ff00::/8"),
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-in-IPv6 forms are unwrapped)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    if any(addr in net for net in EXTRA_NON_GLOBAL if net.version == addr.version):
        return False
    return addr.is_global


# What network.unknown_private_network opens to hosts the agent chose (ask, learn, the overlay): a LAN.
LAN_NETWORKS = tuple(ipaddress.ip_network(n) for n in LAN_CIDRS)


def is_lan_address(ip: str) -> bool:
    """A private LAN unicast address: never loopback, link-local (metadata), CGNAT, multicast or unspecified."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in LAN_NETWORKS if net.version == addr.version)


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address host resolves to (getaddrinfo, TCP), IPv4 first; [] when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    addresses: list[str] = []
    for _family, *_rest, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    # IPv4 first: bundle networks rarely route IPv6, and the pin dials only one address.
    return sorted(addresses, key=lambda ip: ":" in ip)
