"""Finding the address this node advertises (and so its ID) when ADVERTISE_ADDRESS is not set."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from node.core.ids import InvalidAddress
from node.runtime.resolver import LookupFailed, Resolver


async def detect_advertise_address(
    *, host: str, port: int, service_name: str, resolver: Resolver
) -> tuple[str, str]:
    """Return (IPv4, how it was found). Raise InvalidAddress if no IPv4 can be had.

    In order:
    1. HOST, when it is one specific IPv4 address (the node listens only there).
    2. The local address the kernel would use to reach the addresses SERVICE_NAME resolves to: inside Docker
       that is the container's address on the network where the alias lives, even with several networks.
    3. The address this host's name resolves to (Docker's /etc/hosts maps it to the container address).
    4. 127.0.0.1, for a laptop with nothing else to go on.
    """
    bind = ipaddress.ip_address(host)
    if isinstance(bind, ipaddress.IPv4Address) and not bind.is_unspecified:
        return str(bind), "HOST"
    if isinstance(bind, ipaddress.IPv6Address) and not bind.is_unspecified:
        raise InvalidAddress(
            f"HOST={host} is IPv6; node IDs come from IPv4 addresses: set ADVERTISE_ADDRESS to this node's IPv4"
        )
    try:
        peers = await resolver.resolve_ipv4(service_name)
    except LookupFailed:
        peers = []
    sources = [local for local in (_route_source(peer, port) for peer in peers) if local is not None]
    # Prefer a source address that DNS itself lists (we are one of the answers); else any route's source.
    for local in sorted(sources, key=lambda a: a not in peers):
        return local, f"route to {service_name}"
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET)
    except OSError:
        infos = []
    for *_, sockaddr in infos:
        return sockaddr[0], "hostname"
    return "127.0.0.1", "fallback"


def _route_source(peer: str, port: int) -> str | None:
    """The source address the kernel picks for packets to peer (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((peer, port))
            return sock.getsockname()[0]
    except OSError:
        return None
