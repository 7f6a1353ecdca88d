"""Test doubles for the runtime's injected dependencies: a clock that moves when told, a dict resolver.

They live here, not in node/, so that nothing in the shipped package can depend on them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from node.runtime.resolver import LookupFailed


class FakeClock:
    """A clock that moves only when a test says so.

    ``await clock.advance(dt)`` wakes, in deadline order, every sleeper whose deadline falls within ``dt``,
    letting the loop run between wake-ups so that woken tasks can react (and go back to sleep) before the
    next deadline fires.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(seconds, 0.0), next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        target = self._now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            await settle()
        self._now = target
        await settle()


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until the loop has nothing ready (bounded)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


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
