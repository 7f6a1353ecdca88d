"""Addresses and node IDs.

The documented rule: a node's ID is the last two octets of its IPv4 address, ``a.b.c.d -> c*256 + d``
(10.0.2.3 -> 515). Two addresses in different /16s can share an ID; the election breaks such a tie on the
address so that every node still picks the same leader (and the node logs ``node_id_conflict``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class InvalidAddress(ValueError):
    """The address gives no node ID (not an IPv4 address)."""


def node_id_from_ipv4(address: str) -> int:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InvalidAddress(
            f"{address!r} is not an IPv4 address; a node ID is derived from the last two octets of one"
        ) from None
    packed = ip.packed
    return packed[2] * 256 + packed[3]


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """Where a node's HTTP API listens. Ordered by (host, port) only to break node-ID ties."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def node_id(self) -> int:
        return node_id_from_ipv4(self.host)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``ip:port`` or ``http://ip:port``; raise InvalidAddress naming what is wrong."""
        rest = text.removeprefix("http://")
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidAddress(f"{text!r} is not 'ip:port'")
        node_id_from_ipv4(host)
        return cls(str(ipaddress.IPv4Address(host)), int(port))
