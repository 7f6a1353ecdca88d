"""The data service: the one seam between the HTTP layer and the replica for every write and read.

HTTP authenticates, parses, calls the service and renders what it answers; it never touches storage for
data. :class:`DataService` is what it calls:

* ``submit(request, client)``: a write. Today's :class:`LocalDataService` is its own leader: it stamps the
  request (one time, one seed, the time keywords rewritten; off the event loop, whatever the size), gives
  it the next local log index and applies it. With replication the same call will append to the log and
  wait for commit as leader, forward to the leader as follower, or answer 301 when the client asked for
  ``redirect``; the outcome names the (epoch, index) that committed the write either way.
* ``read(request, level, client)``: a read at a consistency level; today every level reads the local
  database (there is one copy).
* loads (SQL dumps and SQLite files) are writes too and get an index; backups and readiness stay local.

A simulation drives whole clusters through this protocol with an in-memory store
(``tests/support/memservice.py``), without sockets or threads.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node import errors
from node.core.sqlreq import DbRequest, Flags, Level, Statement, stamp_write
from node.storage.results import StatementResult
from node.storage.sqlite import Database
from node.storage.statemachine import Command


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """A parsed write as a client sent it (not yet stamped): /db/execute, or /db/request when ``unified``."""

    statements: tuple[Statement, ...]
    transaction: bool = False
    unified: bool = False
    # The client's X-Request-Id: a retry with the same ID (and credential) is applied at most once.
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """A committed write: its raw results, and the epoch and log index that committed it.

    ``duplicate``: the request ID was seen before; the results are the first application's, and ``index``
    is the index that applied it then. ``epoch`` is 0 until replication.
    """

    results: tuple[StatementResult, ...]
    epoch: int
    index: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    statements: int
    epoch: int
    index: int


class DataService(Protocol):
    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome: ...

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]: ...


class LocalDataService:
    """This node is the only copy and its own leader: indices are local, the epoch is 0.

    Indices are handed out in the order requests reach :meth:`submit` after stamping, and the database
    applies jobs in that order (one writer, first in first out), so they are applied in increasing order.
    A write dropped before it ran (its client went away) leaves a gap, which is harmless: an index is only
    ever compared with the applied one.
    """

    def __init__(
        self,
        database: Database,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        seeds: Callable[[], int] = lambda: secrets.randbits(63),
    ) -> None:
        self.database = database
        self._wall_clock_ns = wall_clock_ns
        self._seeds = seeds
        self._next_index: int | None = None
        self._index_lock = asyncio.Lock()

    async def _take_index(self) -> int:
        if self._next_index is None:
            async with self._index_lock:
                if self._next_index is None:
                    self._next_index = await self.database.applied_index() + 1
        index = self._next_index
        self._next_index += 1
        return index

    def forget_index(self) -> None:
        """After the database was closed and opened again (tests): read the applied index again."""
        self._next_index = None

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        time_ns, seed = self._wall_clock_ns(), self._seeds()
        db_request = DbRequest(request.statements, Flags(transaction=request.transaction))
        # Stamping rewrites the SQL's time keywords: per-character work, never on the event loop.
        write = await asyncio.to_thread(stamp_write, db_request, time_ns=time_ns, seed=seed)
        command = Command(write, unified=request.unified, client=client, request_id=request.request_id)
        index = await self._take_index()
        outcomes = await self.database.apply(index, [command])
        if outcomes is None:  # cannot happen: the index is new
            raise errors.Unavailable(f"log index {index} was already applied")
        (applied,) = outcomes
        return WriteOutcome(applied.results, 0, applied.index, applied.duplicate)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        # One copy: every level (none, weak, linearizable, strong, auto) reads the local database.
        return await self.database.query(request, client=client)

    async def load_dump_file(self, path: Path) -> LoadOutcome:
        """An SQL dump as one write (split and stamped on the database's writer thread, never on the loop)."""
        index = await self._take_index()
        count = await self.database.load_dump_file(
            path, time_ns=self._wall_clock_ns(), seed=self._seeds(), index=index
        )
        return LoadOutcome(count, 0, index)

    async def load_sqlite_file(self, path: Path) -> LoadOutcome:
        index = await self._take_index()
        await self.database.load_sqlite_file(path, index=index)
        return LoadOutcome(0, 0, index)
