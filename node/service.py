"""The data service: the one seam between the HTTP layer and the replica for every write and read.

HTTP authenticates, parses, calls the service and renders what it answers; it never touches storage for
data. :class:`DataService` is what it calls:

* ``submit(request, client)``: a write. :class:`LogBackedDataService` (what a node runs) is the leader of a
  one-node cluster: it stamps the request (one time, one seed, the time keywords rewritten) and encodes it
  (:mod:`node.storage.command_codec`), both off the event loop, appends it to the durable log
  (``DATA_DIR/log``, :mod:`node.storage.log`) and waits for the log's fsync, then applies it to SQLite in log
  order and answers with the results. With replication the same call will wait for a majority's fsync as
  leader, forward to the leader as follower, or answer 301 for ``redirect``.
* ``read(request, level, client)``: a read at a consistency level; today every level reads the local
  database (there is one copy).
* loads (SQL dumps and SQLite files) are writes too and get an index; backups and readiness stay local.
  With REPLICATION=on a dump is shipped as log entries and applied all or nothing on every replica
  (:mod:`node.replication.service`); an SQLite file is staged on a majority and then swapped in on every
  replica at the same index (one replicated entry, :mod:`node.replication.staged_loads`).

**Durability: which fsync comes before which answer.** A write is acknowledged (200) only after (1) the
log's ``fdatasync`` covering its entry returned (``AsyncLog.append_and_sync``; concurrent writes share one
append and one fsync), and (2) its entry was applied to SQLite (the COMMIT returned; SQLite's own sync is
``NORMAL``, see :mod:`node.storage.statemachine`). Whatever crashes after (1), the entry is in the log, and
the start-up replay applies every entry past SQLite's applied index before the database serves. The applied
index is written in the same SQLite transaction as the entry's effects, so no entry is applied twice.

**One apply pipeline.** Entries are applied strictly in log order by one task (:meth:`_apply_loop`), never
by the client's request: a client that goes away cannot leave a hole, and consecutive durable entries are
applied as one group (one SQLite transaction). If applying fails locally (disk full, I/O error: SQLite did
not commit), that failure is never a client's answer -- the entry is durable and will be applied: the
pipeline stops, new writes answer 503, and it retries with a growing pause until it succeeds or the node
stops. At shutdown, writes whose entries are durable but not yet applied answer 503 (outcome unknown to the
client: they are applied at the next start; a retry with the same X-Request-Id is applied at most once).

**Loads.** A dump or SQLite file can be larger than an entry may be (64 MiB), so the log records only a
*load marker*: (1) the marker is appended and fsynced, (2) in its turn in the apply pipeline (every earlier
entry applied) the load runs with its index as the applied index, its COMMIT (or the stamped file) synced
FULL, (3) then it is acknowledged. Replay skips markers: a marker whose load never committed (a crash
between (1) and (2)) was never acknowledged, so skipping it is the truth; a load that committed is in SQLite
durably (FULL), and the entries after it are replayed on top of it. Entries appended while a load runs are
applied after it, so none of them was acknowledged before the load's outcome was known.

**Start-up** (:meth:`LogBackedDataService.start`, in the background while HTTP already answers 503
``database_checking``): the database opens and is checked, then the node identity and hard state are
loaded, the log is opened (recovery: a torn tail is cut; damage is :class:`LogCorrupt`) and the entries
``(applied_index, last]`` are replayed, and only then does the database serve. Refusals keep the node alive
and not ready, with the reason in /readyz: a corrupt log is moved to ``DATA_DIR/quarantine/<time>/log``;
entries written under another SQLite version, an unknown entry format, or a database and log that do not
fit together (the database is older than the log's first entry, or newer than its last) are refused. A
database without a log (the previous release) starts the log at its applied index + 1: nothing is lost.

A simulation drives whole clusters through this protocol with an in-memory store
(``tests/support/memservice.py``), without sockets or threads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from node import errors
from node.core.sqlreq import DbRequest, Flags, Level, Statement, stamp_write
from node.storage import command_codec as codec
from node.storage.asynclog import AsyncLog, LogBusy, LogClosed
from node.storage.durable import fsync_dir
from node.storage.hardstate import HardStateError, load_hard_state
from node.storage.identity import IdentityError, load_or_create_identity
from node.storage.log import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    LOG_DIR_NAME,
    DurableLog,
    LogCorrupt,
    LogDiskFull,
    LogEntry,
    LogError,
    LogVersionError,
    default_sqlite_version,
)
from node.storage.results import StatementResult
from node.storage.sqlite import MAX_GROUP_COMMANDS, QUARANTINE_DIR, Database, StartRefused
from node.storage.statemachine import Command, Entry

# Bytes of log entries read per step of the start-up replay (memory held at once, about; one SQLite
# transaction applies at most MAX_GROUP_COMMANDS commands of them).
REPLAY_CHUNK_BYTES = 8 << 20
# Pause before applying again after a local apply failure, doubling up to the maximum (see the docstring).
APPLY_RETRY_FIRST_S = 0.05
APPLY_RETRY_MAX_S = 2.0
# While a write whose client went away may be durable without anyone to report it, the apply pipeline looks
# at the log's synced index this often (otherwise it sleeps until a write wakes it).
ORPHAN_POLL_S = 0.05


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
    committed: bool = True  # False: nothing was stored (the group's COMMIT failed); ``index`` names nothing


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    statements: int
    epoch: int
    index: int


class DataService(Protocol):
    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome: ...

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]: ...


class LocalDataService:
    """This node is the only copy and its own leader, without a log: indices are local, the epoch is 0.

    For tests and tools that drive a :class:`Database` alone. With SQLite applying at ``synchronous=NORMAL``
    (the log is the durable record), a power loss may lose its last writes: a node runs
    :class:`LogBackedDataService`.

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
        return WriteOutcome(applied.results, 0, applied.index, applied.duplicate, applied.committed)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        # One copy: every level (none, weak, linearizable, strong, auto) reads the local database.
        return await self.database.query(request, client=client)

    async def load_dump_file(self, path: Path, *, client: str = "", request_id: str | None = None) -> LoadOutcome:
        """An SQL dump as one write (split and stamped on the database's writer thread, never on the loop).
        ``client``/``request_id`` are for the replicated service's at-most-once rule (not kept here)."""
        index = await self._take_index()
        count = await self.database.load_dump_file(
            path, time_ns=self._wall_clock_ns(), seed=self._seeds(), index=index
        )
        return LoadOutcome(count, 0, index)

    async def load_sqlite_file(
        self, path: Path, *, client: str = "", request_id: str | None = None
    ) -> LoadOutcome:
        index = await self._take_index()
        await self.database.load_sqlite_file(path, index=index)
        return LoadOutcome(0, 0, index)


@dataclass(slots=True)
class _Pending:
    """An entry appended (or being appended) whose waiter expects its outcome from the apply pipeline."""

    future: asyncio.Future
    index: int
    commands: tuple[Command, ...] = ()
    load: Callable[[int], Awaitable[Any]] | None = None  # a load marker: runs the load with its index


class LogBackedDataService:
    """A one-node cluster's leader: every write is appended to the durable log and fsynced before it is
    applied and answered (see the module docstring for the durability argument).

    Life cycle: :meth:`start` (opens the database, the log, replays), :meth:`begin_shutdown`, :meth:`close`
    (the database first, then the log). The apply task is owned here: created by :meth:`start`, cancelled
    and awaited by :meth:`close`.
    """

    def __init__(
        self,
        database: Database,
        *,
        log_reserve_bytes: int,
        emit: Any = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        seeds: Callable[[], int] = lambda: secrets.randbits(63),
        sqlite_version: str | None = None,
        own_log: bool = True,
    ) -> None:
        self.database = database
        # False with REPLICATION=on: the Replicator owns DATA_DIR/log and carries every write; this service
        # then only opens and checks the database (two writers on one log would corrupt it).
        self._own_log = own_log
        self.data_dir = database.data_dir
        self.log_dir = self.data_dir / LOG_DIR_NAME
        self._reserve_bytes = log_reserve_bytes
        self._emit_to = emit
        self._wall_clock_ns = wall_clock_ns
        self._seeds = seeds
        self._sqlite_version = sqlite_version or default_sqlite_version()
        self.log: AsyncLog | None = None
        self.identity: str | None = None
        self._next_index = 0  # the index the next entry gets; valid once the log is open and replayed
        self._applied = 0  # the last index the pipeline applied (or skipped: a failed load's marker)
        self._pending: dict[int, _Pending] = {}
        self._wake = asyncio.Event()
        self._orphan_upto = 0  # entries up to here may be durable without a waiter to wake the pipeline
        self._applier: asyncio.Task | None = None
        self._closing = False
        self._append_failure: errors.NodeError | None = None
        self.stalled: str | None = None  # why the apply pipeline is retrying (None: applying normally)
        self.replayed = 0  # entries re-applied at the last start

    # --- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open and check the database, open the log and replay it; then serve. Never raises for bad data:
        the database's state says why the node is not ready."""
        if not self._own_log:
            await self.database.start()
            return
        await self.database.start(replay=self._open_and_replay)
        if self._closing:
            # close() may have run while this was starting: the log opened since must not outlive it.
            log, self.log = self.log, None
            if log is not None:
                await log.close()
            return
        if self.database.is_open:
            self._applier = asyncio.create_task(self._apply_loop(), name="apply-log")

    def begin_shutdown(self) -> None:
        """Refuse new writes; the database interrupts running jobs and fails queued ones (their handlers
        answer 503 while HTTP still serves)."""
        self._closing = True
        self.database.begin_shutdown()
        self._wake.set()

    async def close(self) -> None:
        """Database first, then the log: every entry the database applied is already durable in the log."""
        self._closing = True
        self._wake.set()
        try:
            await self.database.close()
        finally:
            applier, self._applier = self._applier, None
            if applier is not None:
                applier.cancel()
                await asyncio.gather(applier, return_exceptions=True)
            self._fail_pending(_unknown_at_shutdown)
            log, self.log = self.log, None
            if log is not None:
                await log.close()

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self._emit_to is not None:
            getattr(self._emit_to, level)(event, **fields)

    # --- start-up: open the log, replay ----------------------------------------------------------------------

    async def _open_and_replay(self) -> None:
        db = self.database
        applied = await db.applied_index(starting=True)
        try:
            self.identity = await asyncio.to_thread(load_or_create_identity, self.data_dir)
            await asyncio.to_thread(load_hard_state, self.data_dir, self.identity)
        except (IdentityError, HardStateError) as exc:
            raise StartRefused(f"{exc}; the node does not serve until an operator looks") from None
        log = AsyncLog(
            lambda: DurableLog.open(
                self.log_dir, sqlite_version=self._sqlite_version, reserve_bytes=self._reserve_bytes,
                first_index=applied + 1,
            )
        )  # fmt: skip
        try:
            await log.start()
        except LogCorrupt as exc:
            raise await self._quarantined(exc) from None
        except LogVersionError as exc:
            raise StartRefused(f"the log was written by another release: {exc}") from None
        except (LogError, OSError) as exc:
            raise StartRefused(f"cannot open the log {self.log_dir}: {exc}") from None
        self.log = log
        try:
            await self._replay_after(log, applied)
        except LogCorrupt as exc:  # a record that verified at open fails its checksum when read again
            self.log = None
            await log.close()
            raise await self._quarantined(exc) from None
        except LogError as exc:
            raise StartRefused(f"cannot read the log {self.log_dir}: {exc}") from None

    async def _quarantined(self, exc: LogCorrupt) -> StartRefused:
        where = await asyncio.to_thread(self._quarantine_log)
        self._emit(
            "error", "log_corrupt", path=str(where), reason=str(exc),
            advice="the log was moved aside; restart the node to start a new log after the database's "
            "applied index (writes not yet applied to SQLite that were only in the damaged log are "
            "lost: check them in the quarantined copy, or restore a backup with /db/load)",
        )  # fmt: skip
        return StartRefused(
            f"the log was damaged ({exc.reason}) and was moved to {where}; restart the node to start a "
            "new log after the database's applied index", corrupt=True,
        )  # fmt: skip

    async def _replay_after(self, log: AsyncLog, applied: int) -> None:
        first, last = log.first_index, log.last[1]
        if first > applied + 1:
            raise StartRefused(
                f"the database has applied up to index {applied} but the log starts at {first}: entries "
                f"{applied + 1}..{first - 1} are missing (an older copy of the database?); put back the "
                f"database that belongs to this log, or move {self.log_dir} aside to serve the database as it is"
            )
        if last < applied:
            raise StartRefused(
                f"the database has applied up to index {applied} but the log ends at {last}: they do not "
                f"belong together (was {self.log_dir} or the database replaced?); move {self.log_dir} aside "
                "to serve the database as it is (a new log then starts after its applied index)"
            )
        if last > applied:
            await self._check_versions(log, applied + 1, last)
            await self._replay(log, applied + 1, last)
        self._next_index = last + 1
        self._applied = last
        if last > applied:
            self._emit("info", "log_replayed", entries=last - applied, first=applied + 1, last=last)

    async def _check_versions(self, log: AsyncLog, first: int, last: int) -> None:
        segments = await log.run(DurableLog.segments)
        for seg in segments:
            if seg.last_index < first or seg.first_index > last:
                continue
            if seg.sqlite_version != self._sqlite_version:
                raise StartRefused(
                    f"log entries {max(first, seg.first_index)}..{min(last, seg.last_index)} were written under "
                    f"SQLite {seg.sqlite_version} and this node runs SQLite {self._sqlite_version}: replaying "
                    "them could give other results, so the node does not serve; run the release that wrote "
                    "them until they are applied"
                )

    async def _replay(self, log: AsyncLog, first: int, last: int) -> None:
        index = first
        for _ in range(last - first + 1):  # bounded: every step consumes at least one entry
            if index > last:
                break
            chunk = await log.read(index, REPLAY_CHUNK_BYTES)
            chunk = [e for e in chunk if e.index <= last]
            if not chunk:
                raise StartRefused(f"the log has no entry {index} although it ends at {last}")
            try:
                entries = await asyncio.to_thread(_decode_entries, chunk)
            except codec.CommandFormatError as exc:
                raise StartRefused(f"a log entry cannot be read by this release: {exc}") from None
            for group in _groups(entries):
                await self.database.apply_entries(group, starting=True)
            self.replayed += len(chunk)
            index = chunk[-1].index + 1

    def _quarantine_log(self) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.data_dir / QUARANTINE_DIR / stamp
        target.mkdir(parents=True, exist_ok=True)
        os.replace(self.log_dir, target / LOG_DIR_NAME)
        fsync_dir(target)
        fsync_dir(self.data_dir)
        return target / LOG_DIR_NAME

    # --- writes ----------------------------------------------------------------------------------------------

    def _require_writable(self) -> AsyncLog:
        if self._closing:
            raise errors.Unavailable("the node is shutting down")
        log = self.log
        if log is None or self._applier is None:
            self.database.require_ready()  # the database's reason (checking, corrupt, failed)
            raise errors.Unavailable("the log is not open")
        if self.stalled is not None:
            raise errors.Unavailable(f"writes are paused: {self.stalled}")
        return log

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        self._require_writable()
        time_ns, seed = self._wall_clock_ns(), self._seeds()
        # Stamping rewrites the SQL's time keywords and encoding walks every value: never on the event loop.
        command, payload = await asyncio.to_thread(_stamp_and_encode, request, client, time_ns, seed)
        pending = await self._append(codec.KIND_COMMANDS, payload, commands=(command,))
        (applied,) = await _outcome(pending)
        return WriteOutcome(applied.results, 0, applied.index, applied.duplicate)

    async def _append(
        self, kind: int, payload: bytes, *, commands: tuple[Command, ...] = (), load: Any = None
    ) -> _Pending:
        """Number the entry, append it and wait for the log's fsync. Returns the entry's pending record,
        whose future the apply pipeline resolves."""
        if len(payload) > DEFAULT_MAX_PAYLOAD_BYTES:
            raise errors.PayloadTooLarge(
                f"the write is {len(payload)} bytes as a log entry; at most {DEFAULT_MAX_PAYLOAD_BYTES}",
                limit=DEFAULT_MAX_PAYLOAD_BYTES,
            )
        log = self._require_writable()
        # From here to the log's queue there is no await: entries enter the queue in index order.
        index = self._next_index
        self._next_index += 1
        pending = _Pending(asyncio.get_running_loop().create_future(), index, commands, load)
        self._pending[index] = pending
        try:
            await log.append_and_sync([LogEntry(0, index, kind, payload)])
        except asyncio.CancelledError:
            # The request was accepted and will be appended: the pipeline applies it without its waiter.
            self._orphan_upto = max(self._orphan_upto, index)
            pending.future.add_done_callback(_consume)
            raise
        except (LogBusy, LogClosed) as exc:
            # Refused before it was queued (no await happened since numbering): take the index back.
            self._forget(index, pending)
            if self._next_index == index + 1:
                self._next_index = index
            if isinstance(exc, LogBusy):
                raise errors.Busy(f"the log's queue is full; retry shortly ({exc})") from None
            raise errors.Unavailable("the node is shutting down") from None
        except LogError as exc:
            self._forget(index, pending)
            self._append_failure = _append_error(exc)
            assert self.log is not None
            # Nothing of the failed batch is in the log; later entries were numbered after it: number anew.
            self._next_index = self.log.last[1] + 1
            raise self._append_failure from None
        except ValueError:
            # Numbered after an entry that failed (see AsyncLog): nothing stored, answer as that failure did.
            self._forget(index, pending)
            raise self._append_failure or errors.Unavailable("the write could not be logged; retry") from None
        self._wake.set()
        return pending

    def _forget(self, index: int, pending: _Pending) -> None:
        if self._pending.get(index) is pending:
            del self._pending[index]

    # --- the apply pipeline ----------------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        """Apply durable entries in log order, in groups, until the node stops; then answer every waiter
        left (at once: HTTP is still serving, and the 2 s stop must not wait for them)."""
        try:
            await self._apply_until_stopped()
        finally:
            self._fail_pending(_unknown_at_shutdown)

    async def _apply_until_stopped(self) -> None:
        delay = APPLY_RETRY_FIRST_S
        while True:
            log = self.log
            if log is None or self._closing:
                return
            durable = log.synced_index
            if self._applied >= durable:
                self._wake.clear()
                if self._orphan_upto > self._applied:
                    try:
                        await asyncio.wait_for(self._wake.wait(), ORPHAN_POLL_S)
                    except TimeoutError:
                        pass
                else:
                    await self._wake.wait()
                continue
            try:
                await self._apply_some(log, durable)
            except Exception as exc:  # noqa: BLE001 - ApplyFailed, a NodeError, or a bug: retry, never die
                if self._closing:
                    return
                if self.stalled is None:
                    self._emit("error", "apply_stalled", reason=str(exc), applied_index=self._applied,
                               advice="free disk space in DATA_DIR; writes resume by themselves")  # fmt: skip
                self.stalled = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, APPLY_RETRY_MAX_S)
                continue
            if self.stalled is not None:
                self._emit("info", "apply_resumed", applied_index=self._applied)
                self.stalled = None
            delay = APPLY_RETRY_FIRST_S

    async def _apply_some(self, log: AsyncLog, durable: int) -> None:
        """Apply the next durable entries: a load alone, or a run of command entries as one group."""
        first = self._applied + 1
        pending = self._pending.get(first)
        if pending is None:
            # Durable but not known here (cannot happen in normal operation): read it back from the log.
            await self._apply_from_log(log, first, durable)
            return
        if pending.load is not None:
            try:
                result = await pending.load(first)
            except Exception as exc:  # noqa: BLE001 - whatever stopped the load is its answer
                if self._closing:
                    raise errors.Unavailable("the node is shutting down") from None
                # The load did not commit: replay skips its marker too, so "not loaded" is the truth.
                _settle(pending.future, exc=exc)
            else:
                _settle(pending.future, result)
            self._forget(first, pending)
            self._applied = first
            return
        group: list[tuple[int, _Pending]] = []
        commands = 0
        index = first
        while index <= durable:
            p = self._pending.get(index)
            if p is None or p.load is not None or (group and commands + len(p.commands) > MAX_GROUP_COMMANDS):
                break
            group.append((index, p))
            commands += len(p.commands)
            index += 1
        outcomes = await self.database.apply_entries([Entry(i, p.commands) for i, p in group])
        for (i, p), outcome in zip(group, outcomes, strict=True):
            self._forget(i, p)
            if outcome is None:  # applied before (cannot happen: the pipeline is the only writer)
                _settle(p.future, exc=errors.Unavailable(f"log index {i} was already applied"))
            else:
                _settle(p.future, outcome)
        self._applied = group[-1][0]

    async def _apply_from_log(self, log: AsyncLog, first: int, durable: int) -> None:
        chunk = [e for e in await log.read(first, REPLAY_CHUNK_BYTES) if e.index <= durable]
        entries = await asyncio.to_thread(_decode_entries, chunk)
        for group in _groups(entries):
            await self.database.apply_entries(group)
        self._applied = chunk[-1].index

    def _fail_pending(self, make: Callable[[], BaseException]) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            _settle(p.future, exc=make())

    # --- reads and loads -------------------------------------------------------------------------------------

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        # One copy: every level (none, weak, linearizable, strong, auto) reads the local database.
        return await self.database.query(request, client=client)

    async def load_dump_file(self, path: Path, *, client: str = "", request_id: str | None = None) -> LoadOutcome:
        """An SQL dump: a load marker in the log, then the load in its turn (see "Loads" above)."""
        time_ns, seed = self._wall_clock_ns(), self._seeds()

        async def run(index: int) -> int:
            return await self.database.load_dump_file(path, time_ns=time_ns, seed=seed, index=index)

        pending = await self._append(codec.KIND_LOAD_MARKER, codec.encode_load_marker("dump"), load=run)
        count = await _outcome(pending)
        return LoadOutcome(count, 0, pending.index)

    async def load_sqlite_file(
        self, path: Path, *, client: str = "", request_id: str | None = None
    ) -> LoadOutcome:
        async def run(index: int) -> None:
            await self.database.load_sqlite_file(path, index=index)

        pending = await self._append(codec.KIND_LOAD_MARKER, codec.encode_load_marker("sqlite"), load=run)
        await _outcome(pending)
        return LoadOutcome(0, 0, pending.index)


def _unknown_at_shutdown() -> errors.NodeError:
    return errors.Unavailable(
        "the node is shutting down before this write was applied; it may be applied at the next start (it "
        "was appended to the log): retry with the same X-Request-Id to apply it at most once"
    )


def _stamp_and_encode(request: WriteRequest, client: str, time_ns: int, seed: int) -> tuple[Command, bytes]:
    db_request = DbRequest(request.statements, Flags(transaction=request.transaction))
    write = stamp_write(db_request, time_ns=time_ns, seed=seed)
    command = Command(write, unified=request.unified, client=client, request_id=request.request_id)
    try:
        return command, codec.encode_commands([command])
    except (TypeError, ValueError) as exc:  # a string orjson cannot hold even tagged: the client's input
        raise errors.BadRequest(f"the request cannot be stored: {exc}") from None


def _decode_entries(chunk: list[LogEntry]) -> list[Entry]:
    """Log entries to state machine entries; load markers are skipped (replay cannot repeat a load)."""
    out: list[Entry] = []
    for e in chunk:
        if e.kind == codec.KIND_COMMANDS:
            out.append(Entry(e.index, codec.decode_commands(e.payload)))
        elif e.kind == codec.KIND_LOAD_MARKER:
            codec.decode_load_marker(e.payload)  # its version is checked like any entry's
        else:
            raise codec.CommandFormatError(f"entry {e.index} has kind {e.kind}, unknown to this release")
    return out


def _groups(entries: list[Entry]) -> list[list[Entry]]:
    """Consecutive entries in groups of at most MAX_GROUP_COMMANDS commands (one transaction each)."""
    groups: list[list[Entry]] = []
    commands = 0
    for entry in entries:
        if not groups or commands + len(entry.commands) > MAX_GROUP_COMMANDS:
            groups.append([])
            commands = 0
        groups[-1].append(entry)
        commands += len(entry.commands)
    return groups


async def _outcome(pending: _Pending) -> Any:
    # Shielded: a client that goes away stops waiting, but its entry is applied all the same.
    return await asyncio.shield(pending.future)


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _append_error(exc: LogError) -> errors.NodeError:
    if isinstance(exc, LogDiskFull):
        return errors.InsufficientStorage(
            f"the disk is nearly full: the write was refused before anything of it was stored ({exc}); free "
            "space in DATA_DIR (the log keeps LOG_RESERVE_BYTES free)"
        )
    return errors.Unavailable(f"the write could not be logged: {exc}; nothing of it was stored")
