"""DNS lookups of SERVICE_NAME.

Production: :class:`AiodnsResolver`, a **fresh** c-ares channel per lookup. c-ares (pycares 5 / c-ares 1.34)
caches answers for their TTL and Docker's embedded DNS answers with TTL 600 s, so a long-lived resolver keeps
returning a stopped container and misses a new one for minutes. A new channel per round costs well under a
millisecond and always asks the server; ``tests/integration/test_dns_freshness.py`` proves it against a
server that answers with TTL 600.

Tests: :class:`StaticResolver`, a dict the test edits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import aiodns
import pycares


class LookupFailed(Exception):
    """The lookup did not produce an answer (timeout, refused, server failure)."""


class Resolver(Protocol):
    async def resolve_ipv4(self, name: str) -> list[str]:
        """IPv4 addresses for name; [] when the name does not exist or has no A records.

        Raises LookupFailed when no answer could be had.
        """
        ...


# c-ares status codes that mean "the server answered: there is nothing", as opposed to "no answer".
_EMPTY_ANSWER = {pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA}


class AiodnsResolver:
    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 2.0) -> None:
        self._nameservers = list(nameservers)
        self._timeout_s = timeout_s

    async def resolve_ipv4(self, name: str) -> list[str]:
        # Fresh channel per lookup: see the module docstring (c-ares' TTL cache vs Docker's TTL 600).
        resolver = aiodns.DNSResolver(
            nameservers=self._nameservers or None, timeout=self._timeout_s, tries=2
        )
        try:
            async with asyncio.timeout(self._timeout_s * 2 + 0.5):
                result = await resolver.query_dns(name, "A")
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code in _EMPTY_ANSWER:
                return []
            raise LookupFailed(str(exc.args[1] if len(exc.args) > 1 else exc)) from None
        except TimeoutError:
            raise LookupFailed("timed out") from None
        finally:
            await resolver.close()
        return sorted({rec.data.addr for rec in result.answer if rec.type == pycares.QUERY_TYPE_A})


class StaticResolver:
    """A resolver whose answers a test sets: ``names[name] = [...]`` or ``failing = True``."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names: dict[str, list[str]] = dict(names or {})
        self.failing = False
        self.lookups = 0

    async def resolve_ipv4(self, name: str) -> list[str]:
        self.lookups += 1
        if self.failing:
            raise LookupFailed("test resolver set to fail")
        return list(self.names.get(name, []))
