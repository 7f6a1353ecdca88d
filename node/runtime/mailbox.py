"""Bounded queues with an explicit overflow policy, and a single-slot latest-value cell.

No queue in the node is unbounded. Each mailbox states what happens when it is full:

* ``BLOCK``       producers wait (backpressure). For inputs that must not be lost and whose producers can
                  afford to wait (DNS rounds, probe results).
* ``DROP_OLDEST`` the oldest item is dropped and counted. For streams where only recent items matter.
* ``REJECT``      ``offer`` returns False / ``put`` raises MailboxFull, so an HTTP handler can answer 503.

``LatestCell`` is for values where only the newest matters (the membership view, the leadership decision):
publishing never blocks and a slow reader skips straight to the newest value instead of working through a
backlog.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Overflow(enum.Enum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    REJECT = "reject"


class MailboxFull(Exception):
    pass


class Mailbox(Generic[T]):
    def __init__(self, name: str, maxsize: int, overflow: Overflow) -> None:
        if maxsize < 1:
            raise ValueError("a mailbox holds at least one item")
        self.name = name
        self.maxsize = maxsize
        self.overflow = overflow
        self.dropped = 0
        self._items: collections.deque[T] = collections.deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> bool:
        """Enqueue without waiting. False if the item was refused (full, and the policy is not DROP_OLDEST)."""
        if len(self._items) >= self.maxsize:
            if self.overflow is not Overflow.DROP_OLDEST:
                return False
            self._items.popleft()
            self.dropped += 1
        self._append(item)
        return True

    async def put(self, item: T) -> None:
        while len(self._items) >= self.maxsize:
            if self.overflow is Overflow.REJECT:
                raise MailboxFull(self.name)
            if self.overflow is Overflow.DROP_OLDEST:
                break
            self._not_full.clear()
            await self._not_full.wait()
        self.offer(item)

    async def get(self) -> T:
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        item = self._items.popleft()
        self._not_full.set()
        return item

    def _append(self, item: T) -> None:
        self._items.append(item)
        self._not_empty.set()
        if len(self._items) >= self.maxsize:
            self._not_full.clear()


class LatestCell(Generic[T]):
    """Holds the newest value and a version number; readers wait for a version newer than the one they saw."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._version = 0
        self._changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    def get(self) -> T | None:
        return self._value

    def publish(self, value: T) -> int:
        self._value = value
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self._version

    async def wait_newer(self, seen: int) -> tuple[int, T]:
        while self._version <= seen:
            await self._changed.wait()
        assert self._value is not None
        return self._version, self._value
