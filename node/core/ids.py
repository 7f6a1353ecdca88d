"""Addresses and node IDs.

The documented rule: a node's ID is the last two octets of its IPv4 address, ``a.b.c.d -> c*256 + d``
(10.0.2.3 -> 515). Two addresses in different /16s can share an ID; the election breaks such a tie on the
address so that every node still picks the same leader (and the node logs ``node_id_conflict``).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass


class InvalidAddress(ValueError):
    """The address gives no node ID (not an IPv4 address)."""


# "http://255.255.255.255:65535" is 28 characters; anything much longer is not an address, and bounding it
# keeps error messages (which quote it) and parsing small.
MAX_ADDRESS_CHARS = 64
_ASCII_DIGITS = frozenset("0123456789")


def _ascii_number(text: str, max_digits: int) -> int | None:
    """``text`` as a number if it is 1..max_digits ASCII digits. str.isdigit() and int() would also take
    '²' or Arabic-Indic digits (and int() refuses 4,300+ digits with a ValueError of its own)."""
    if not 0 < len(text) <= max_digits or not set(text) <= _ASCII_DIGITS:
        return None
    return int(text)


def _is_dotted_quad(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(_ascii_number(p, 3) is not None for p in parts)


def node_id_from_ipv4(address: str) -> int:
    if not isinstance(address, str) or not _is_dotted_quad(address):
        raise InvalidAddress(
            f"{_quote(address)} is not an IPv4 address; a node ID is derived from the last two octets of one"
        )
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InvalidAddress(
            f"{_quote(address)} is not an IPv4 address; a node ID is derived from the last two octets of one"
        ) from None
    packed = ip.packed
    return packed[2] * 256 + packed[3]


# An endpoint's node ID is asked for on every replication frame and view change (the cluster facts of each
# answer, the view given to the core): parsing the address each time was ~4% of a busy leader's main thread.
# Bounded: a node meets a handful of peer addresses (and only Endpoints, never raw client text, come here).
MAX_CACHED_NODE_IDS = 1024


@functools.lru_cache(maxsize=MAX_CACHED_NODE_IDS)
def _cached_node_id(host: str) -> int:
    return node_id_from_ipv4(host)


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
        return _cached_node_id(self.host)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``ip:port`` or ``http://ip:port`` (ASCII digits, dotted-quad IPv4, port 1-65535).

        Raises InvalidAddress, and nothing else, for any other text: it comes from clients.
        """
        if not isinstance(text, str) or len(text) > MAX_ADDRESS_CHARS:
            raise InvalidAddress(f"{_quote(text)} is not 'ip:port'")
        rest = text.removeprefix("http://")
        host, sep, port_text = rest.rpartition(":")
        port = _ascii_number(port_text, 5)
        if not sep or port is None or not 1 <= port <= 65535:
            raise InvalidAddress(f"{_quote(text)} is not 'ip:port'")
        node_id_from_ipv4(host)
        return cls(str(ipaddress.IPv4Address(host)), port)


def _quote(text: object) -> str:
    """A client's text for an error message: repr, cut to a readable length."""
    shown = repr(text)
    return shown if len(shown) <= MAX_ADDRESS_CHARS + 2 else f"{shown[:MAX_ADDRESS_CHARS]}..."
