"""Handing out reader connections fairly: a cap per client and round-robin waiting (event loop only)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any

from node import errors

Slot = Any  # a reader connection slot (node.storage.sqlite._Slot); the scheduler only hands them out


class ReadScheduler:
    """Hands out readers: at most ``per_client`` to one client, waiting requests served fairly by client.

    Invariant: a request waits only if no reader is free or its client already holds ``per_client``; so when a
    reader becomes free it goes to the waiting client (below its cap) that holds the fewest readers, in
    round-robin order among equals, never to the longest backlog. At most ``queue_size`` requests wait in all, and one client at most half of them (at least one),
    so one client cannot fill the queue for the others. Overflow: 503 busy. Runs on the event loop only.
    """

    def __init__(self, slots: list[Slot], *, per_client: int, queue_size: int) -> None:
        self._free = list(slots)
        self._all = list(slots)
        self._per_client = per_client
        self._queue_size = queue_size
        self._per_client_queue = max(1, queue_size // 2)
        self._held: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future[Slot]]] = {}
        self._count = 0
        self._pausers = 0
        self._idle: asyncio.Event | None = None

    @property
    def waiting(self) -> int:
        return self._count

    def held(self, client: str) -> int:
        return self._held[client]

    async def acquire(self, client: str) -> Slot:
        if not self._paused and self._free and self._held[client] < self._per_client:
            return self._grant(client)
        if self._count >= self._queue_size:
            raise errors.Busy(
                f"database read queue is full ({self._queue_size} requests waiting); retry shortly"
            )
        queue = self._waiting.setdefault(client, collections.deque())
        if len(queue) >= self._per_client_queue:
            raise errors.Busy(
                f"this client already has {len(queue)} read requests waiting; retry when they have finished"
            )
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        queue.append(future)
        self._count += 1
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result(), client)  # granted just as we were cancelled: hand it on
            raise
        finally:
            if not future.done() or future.cancelled() or future.exception() is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(future)
                    self._count -= 1
                if not queue and self._waiting.get(client) is queue:
                    del self._waiting[client]

    def _grant(self, client: str) -> Slot:
        self._held[client] += 1
        return self._free.pop()

    def release(self, slot: Slot, client: str) -> None:
        self._held[client] -= 1
        if self._held[client] <= 0:
            del self._held[client]
        self._free.append(slot)
        self._dispatch()

    def _dispatch(self) -> None:
        if self._paused:
            if self._idle is not None and len(self._free) == len(self._all):
                self._idle.set()
            return
        while self._free and self._waiting:
            # The waiting client holding the fewest readers goes first (ties: the one whose turn came least
            # recently), so a client with a backlog never takes a freed reader from one that has none.
            eligible = [c for c in self._waiting if self._held[c] < self._per_client]
            if not eligible:
                return  # every waiting client is at its cap
            client = min(eligible, key=lambda c: self._held[c])
            queue = self._waiting.pop(client)
            future = queue.popleft()
            self._count -= 1
            if queue:
                self._waiting[client] = queue  # to the back of the round
            if not future.done():  # a cancelled waiter whose task has not resumed yet: skip it
                future.set_result(self._grant(client))

    async def pause(self) -> None:
        """Stop handing out readers and wait until every reader is back (for a file swap or close).

        Pauses nest (a load and a close may overlap): readers are handed out again after the last resume.
        """
        self._pausers += 1
        if self._idle is None:
            self._idle = asyncio.Event()
        if len(self._free) == len(self._all):
            self._idle.set()
        await self._idle.wait()

    def resume(self) -> None:
        self._pausers -= 1
        if self._pausers > 0:
            return
        self._idle = None
        self._dispatch()

    @property
    def _paused(self) -> bool:
        return self._pausers > 0

    def fail_waiting(self, exc_factory: Callable[[], BaseException]) -> None:
        for queue in self._waiting.values():
            for future in queue:
                if not future.done():
                    future.set_exception(exc_factory())
            queue.clear()
        self._waiting.clear()
        self._count = 0
