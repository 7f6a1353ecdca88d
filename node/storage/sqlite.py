"""The node's SQLite database: one file in DATA_DIR, WAL mode, every connection on a thread of its own.

Threads and connections (no sqlite call ever runs on the event loop; no connection is shared by threads):

* the **writer**: one thread, one connection, applies log entries (:meth:`Database.apply`, the state
  machine of :mod:`node.storage.statemachine`), /db/load and /db/backup in arrival order. Entries queued
  back to back are applied in one transaction (group apply: one fsync for all of them). At most
  ``queue_size`` writes wait; beyond that callers get 503 (busy). Its ``random()``, ``randomblob()`` and
  date/time functions answer from the current :class:`WriteCommand`'s seed and timestamp, and the work of
  one command is bounded by a budget of SQLite VM steps (``write_step_budget``), not by a clock, so a
  command has the same outcome on every copy of the database.
* the **readers**: ``readers`` threads, each with a ``query_only`` connection (WAL lets them read while the
  writer writes). A read request holds one reader for its whole run, and its time limit
  (``statement_timeout_s``, the name kept from when it bounded each statement) bounds the whole request.
  One client (one credential) may hold at most ``readers_per_client`` readers at once; requests above that
  wait in a bounded queue served round-robin across clients (:class:`ReadScheduler`), so a client's backlog
  delays another client by at most one reader becoming free.

Results are raw values (:mod:`node.storage.results`): rendering them as rqlite's JSON is the HTTP layer's.

Cancellation: a request whose client went away is cancelled by the HTTP server; its job is dropped if it has
not started, and a running read is interrupted. A running write is left to finish within its step budget: its
outcome must not depend on a client's connection (with replication every node executes it).

Durability: WAL mode with the synchronous level :data:`node.storage.statemachine.SYNCHRONOUS` (NORMAL):
the log is the durable record, fsynced before an entry is applied, and the start-up replay re-applies what a
crash took from the WAL (the module docstring of :mod:`node.storage.statemachine` says why that is safe).
Loads are the exception: the log holds only their marker, so their COMMIT (and the stamped file of a file
load) is synced FULL before it is acknowledged. No result claims what is not stored: when a
transaction does not commit, every statement's result is an error saying it was rolled back and why
(:func:`node.storage.results.rolled_back`).

Guards on user SQL (an authorizer): no ATTACH/DETACH, no transaction statements (use the ``transaction``
flag), no TEMP objects (they would outlive the request on a shared connection), only the pragmas
:mod:`node.storage.pragmas` allows, so no request changes a connection for the requests after it, and no
access to the node's own tables (``_talentnest_*``: the applied index and request IDs).

Snapshots (:mod:`node.storage.snapshots`): :meth:`Database.copy_for_snapshot` writes a consistent copy with
``VACUUM INTO`` on a private read-only connection of its own thread (WAL: the writer goes on meanwhile);
:meth:`Database.install_snapshot` swaps a snapshot in the way a /db/load swaps a file in (:meth:`_swap_in`),
keeping the snapshot's own request IDs and applied index, which are replicated state.

Swapping a file in (load or snapshot install), and what a crash leaves: the new file is complete and fsynced
in DATA_DIR before anything changes; readers are closed, then the writer (the last connection: SQLite
checkpoints the WAL into the old file and deletes it); ``-wal``/``-shm`` leftovers are removed and the
directory fsynced (so no old WAL can ever reappear next to the new file, which would replay it onto the new
file); then ONE ``os.replace`` over ``node.db`` and a directory fsync. Before the rename the old file is whole
(with its WAL checkpointed in); after it the new file is whole; the rename is atomic. So a crash at any point
leaves the old database or the new one, never a mix, and a temp copy left behind is removed at the next start.

Start: :meth:`Database.start` opens the file and runs ``PRAGMA quick_check`` (about 1 s/GB warm) while the
HTTP server already answers; data calls meanwhile fail with 503 ``database_checking``. A corrupt file is
moved to ``DATA_DIR/quarantine/<timestamp>/`` and never served. With replication (``quarantine_corrupt``
False) the Database only reports the damage (state ``corrupt``, the file left in place, the writer closed):
the Replicator moves the database together with the log, hard state and identity as one event and starts
the node again as a new, empty member (:mod:`node.storage.quarantine`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import apsw

from node import errors
from node.core.sqlreq import DbRequest, Statement, WriteCommand, rewrite_time_keywords, utc_text
from node.storage import pragmas, statemachine
from node.storage import results as res
from node.storage.dump import dump_statements
from node.storage.durable import FILE_CHUNK_BYTES, crash_point
from node.storage.quarantine import QUARANTINE_DIR, event_stamp
from node.storage.readers import ReadScheduler
from node.storage.results import StatementResult
from node.storage.statemachine import Applied, Command, Entry, Mode

T = TypeVar("T")

DB_FILE_NAME = "node.db"
DB_FILE_NAMES = (DB_FILE_NAME, f"{DB_FILE_NAME}-wal", f"{DB_FILE_NAME}-shm")  # the database and its sidecars
SQLITE_MAGIC = b"SQLite format 3\x00"
READ_ONLY_REFUSAL = "attempt to change database via query operation"
# Date and time functions that accept 'now'; on the write connection they answer from the command's time.
TIME_FUNCTIONS = ("date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff")
# SQLite virtual-machine steps between two calls of the progress handler (deadline, cancel, step budget).
PROGRESS_STEPS = 1000
# Below this many free bytes in DATA_DIR the node reports "[-]disk full" (a write may need a few pages).
DISK_LOW_BYTES = 1 << 20
# Longest single statement a dump may hold (a 16 MiB value as hex is 32 MiB of text).
MAX_DUMP_STATEMENT_CHARS = 64 << 20
# Commands one group apply takes at most (they share one transaction and one fsync).
MAX_GROUP_COMMANDS = 1000
_TEMP_PREFIX = ".tmp-"
_INSERT_WORDS = re.compile(r"^\s*(INSERT|REPLACE)\b", re.IGNORECASE)
_TX_WORDS = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK)\b", re.IGNORECASE)
_FK_PRAGMA = re.compile(
    r"^\s*PRAGMA\s+(?:main\.)?foreign_keys\s*(?:=\s*|\(\s*)'?(\w+)'?\s*\)?\s*;?\s*$", re.I
)
_TX_ACTIONS = (apsw.SQLITE_TRANSACTION, apsw.SQLITE_SAVEPOINT)
_TEMP_CREATE = frozenset(
    {
        apsw.SQLITE_CREATE_TEMP_TABLE, apsw.SQLITE_CREATE_TEMP_INDEX, apsw.SQLITE_CREATE_TEMP_TRIGGER,
        apsw.SQLITE_CREATE_TEMP_VIEW,
    }
)  # fmt: skip
_CREATE = frozenset(
    {apsw.SQLITE_CREATE_TABLE, apsw.SQLITE_CREATE_INDEX, apsw.SQLITE_CREATE_TRIGGER, apsw.SQLITE_CREATE_VIEW,
     apsw.SQLITE_CREATE_VTABLE}
)  # fmt: skip


def default_readers_per_client(readers: int) -> int:
    return max(1, readers // 2)


@dataclass(frozen=True, slots=True)
class Limits:
    # Seconds one READ request (all its statements) may run; a request can ask for less with db_timeout.
    statement_timeout_s: float = 5.0
    # Rows one statement may return.
    max_result_rows: int = 10_000
    # Bytes (approximate, as encoded) all results of one request may hold; also the largest single value.
    max_result_bytes: int = 16 << 20
    # SQLite VM steps one WRITE request (all its statements) may use; deterministic, unlike a clock.
    # 20 million is 1.5-4 s of work on a loaded 2-core machine (5-14 million steps/s measured).
    write_step_budget: int = 20_000_000
    # Read-only connections, each on its own thread.
    readers: int = 4
    # Readers one client may hold at once (None: half of them, at least one).
    readers_per_client: int | None = None

    @property
    def per_client(self) -> int:
        if self.readers_per_client is None:
            return default_readers_per_client(self.readers)
        return max(1, min(self.readers_per_client, self.readers))


class State:
    CLOSED = "closed"
    CHECKING = "checking"
    READY = "ready"
    CORRUPT = "corrupt"
    FAILED = "failed"


class _ResultTooLarge(Exception):
    pass


class StartRefused(Exception):
    """The database must not be served (the reason is the state's detail); ``corrupt``: data was damaged."""

    def __init__(self, reason: str, *, corrupt: bool = False) -> None:
        super().__init__(reason)
        self.corrupt = corrupt


class ApplyFailed(Exception):
    """Applying log entries did not commit (disk full, I/O error): nothing of them was applied. The entries
    are durable in the log, so this is never a client's answer: the caller retries (see node.service)."""


class _ShuttingDown(Exception):
    pass


class SqliteVersionRefused(errors.NodeError):
    """Commands stamped under another SQLite version: applying them could diverge from the leader's copy."""

    status = 503
    code = "sqlite_version_mismatch"


class _QuarantineHeld(Exception):
    """node.db is absent and a quarantined database is kept: starting empty must be the operator's choice."""


class _Job:
    """One unit of work for a connection thread; the loop side and the thread meet here.

    ``started``/``cancelled`` change under ``lock`` so a job is either dropped before it starts or runs (and
    then sees ``cancelled`` at its next progress check). ``steps`` and ``budget`` count VM steps (writes).
    """

    __slots__ = ("budget", "bytes_left", "cancelled", "deadline", "done", "entry", "future", "lock", "loop",
                 "over_budget", "started", "steps", "timeout_s")  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, budget: int | None = None, entry: Entry | None = None
    ) -> None:
        self.loop = loop
        self.entry = entry  # a log entry to apply: jobs with one may be applied together (group apply)
        self.future: asyncio.Future[Any] = loop.create_future()
        self.lock = threading.Lock()
        self.started = False
        self.cancelled = False
        self.done = False
        self.deadline = float("inf")
        self.timeout_s = 0.0
        self.budget = budget
        self.steps = 0
        self.over_budget = False
        self.bytes_left = 0

    def settle(self, result: Any = None, exc: BaseException | None = None) -> None:
        """Resolve the loop-side future (from any thread; a second call is ignored)."""

        def apply() -> None:
            if self.future.done():
                return
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(apply)


class _Slot:
    """A connection and the one thread that owns it."""

    def __init__(self, name: str, *, writer: bool) -> None:
        self.name = name
        self.writer = writer
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: apsw.Connection | None = None
        self.job: _Job | None = None
        self.internal = False
        self.denied: str | None = None
        self.denied_internal = False  # the last refusal was about the node's own tables
        self.full = False  # a statement failed because the disk is full (writer)

    def interrupt(self) -> None:
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(apsw.Error):
                conn.interrupt()  # thread-safe by SQLite's contract


# A staged group (Database.stage_entries): its token and, per entry, its commands' outcomes.
Staged = tuple[object, list[tuple[Applied, ...]]]


class Database:
    def __init__(
        self,
        data_dir: Path,
        *,
        limits: Limits,
        queue_size: int,
        log: Any = None,
        quarantine_corrupt: bool = True,
    ) -> None:
        self.data_dir = data_dir
        # False with REPLICATION=on: a corrupt file is only reported (state CORRUPT, left in place) and the
        # Replicator quarantines it with the rest of the replicated state, one directory per event; an absent
        # node.db beside a quarantine is then a resync in progress, not a reason to refuse to start empty.
        self.quarantine_corrupt = quarantine_corrupt
        self.path = data_dir / DB_FILE_NAME
        self.limits = limits
        self._queue_size = queue_size
        self._log = log
        self.state = State.CLOSED
        self.state_detail = ""
        self._writer: _Slot | None = None
        self._readers: list[_Slot] = []
        self._scheduler: ReadScheduler | None = None
        # Every write job in arrival order. The loop adds and removes; the writer thread looks for jobs to
        # apply in the same group, so it is guarded by a lock.
        self._write_jobs: collections.deque[_Job] = collections.deque()
        self._jobs_lock = threading.Lock()
        self._swap_lock = asyncio.Lock()
        # Set (on the loop thread) when shutting down: running statements are interrupted at their next
        # progress check and queued jobs fail at once, so a stop is not held up by a slow query or a backlog.
        self._closing = False
        self.disk_full = False  # the last write failed with SQLITE_FULL and none has succeeded since
        # Touched only on the writer thread.
        self._clock_db: apsw.Connection | None = None
        # The running command's seed and time (None: no command runs, random() and 'now' are the real ones).
        # Its random.Random and its time text are made only when SQL first asks for them (random(),
        # randomblob(), a date function): most writes call none, and seeding costs more than the INSERT.
        self._seed: int | None = None
        self._rng: random.Random | None = None
        self._now_ns: int | None = None
        self._now_text: str | None = None
        # The write connection on which the node's own tables were all seen committed (see _WriterOps).
        self._schema_conn: apsw.Connection | None = None
        self._temp_seq = 0
        # The SQLite this process runs: replicated commands stamped under another one are refused.
        self.sqlite_version = apsw.sqlite_lib_version()
        # Why the last apply was refused (a command of another SQLite version); None once one applies.
        self.apply_refused: str | None = None
        # The group stage_entries left open on the writer (its token), or None. Writer thread only: every
        # other writer job rolls it back before it runs (_run_job), so nothing ever runs inside it.
        self._staged: object | None = None
        self._staged_ok = False  # a statement of the staged group succeeded (a full disk has room again)

    # --- life cycle (event loop side) ----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Fast checks that must fail the start-up (exit 2): DATA_DIR exists or can be made, and is writable."""
        try:
            await asyncio.to_thread(self._prepare)
        except OSError as exc:
            # An OSError so the node reports it as a start-up failure (exit 2), naming DATA_DIR.
            raise OSError(f"cannot open the database {self.path} (DATA_DIR): {exc}") from exc

    async def open(self) -> None:
        """Prepare, open and check, waiting for the check. Raises OSError if the database cannot be served."""
        await self.prepare()
        await self.start()
        if self.state != State.READY:
            detail = self.state_detail
            await self.close()
            raise OSError(f"cannot open the database {self.path} (DATA_DIR): {detail}")

    async def start(self, replay: Callable[[], Awaitable[None]] | None = None) -> None:
        """Open the file and check its integrity (``quick_check``); on success, serve. Never raises for a bad
        file: a corrupt one is quarantined and the state says so (the node stays alive, not ready).

        ``replay`` runs after the check and before the database serves (the state stays ``checking``): the
        data service re-applies the log's entries past the applied index there, with
        :meth:`apply_entries` (``starting=True``). It raises :class:`StartRefused` to keep the node not
        ready with a reason (a log written under another SQLite, a corrupt log)."""
        self._closing = False
        self.state, self.state_detail = State.CHECKING, "database is being checked"
        loop = asyncio.get_running_loop()
        self._writer = _Slot("sqlite-writer", writer=True)
        self._readers = [_Slot(f"sqlite-reader-{i}", writer=False) for i in range(self.limits.readers)]
        self._scheduler = ReadScheduler(
            self._readers, per_client=self.limits.per_client, queue_size=self._queue_size
        )
        writer, readers = self._writer, self._readers
        try:
            verdict = await loop.run_in_executor(writer.executor, self._open_and_check)
        except _QuarantineHeld as exc:
            self.state, self.state_detail = State.CORRUPT, str(exc)
            self._emit("error", "database_quarantined", path=str(self.path), reason=str(exc))
            return
        except (apsw.Error, OSError) as exc:
            if not self._closing:
                self._set_failed(f"cannot open the database: {_message(exc)}")
            return
        if self._closing:
            return
        if verdict is not None:
            await loop.run_in_executor(writer.executor, self._close_writer)
            if not self.quarantine_corrupt:
                self.state = State.CORRUPT
                self.state_detail = f"the database file failed its integrity check: {'; '.join(verdict[:5])}"
                return  # the caller moves it aside with the rest of its state and says so loudly
            where = await loop.run_in_executor(writer.executor, self._quarantine)
            self.state = State.CORRUPT
            self.state_detail = f"the database file was corrupt and was moved to {where}"
            self._emit(
                "error", "database_corrupt", path=str(where), verdict=verdict[:5],
                advice="restore a backup with /db/load, or remove the quarantine directory to start empty",
            )  # fmt: skip
            return
        try:
            await asyncio.gather(*(loop.run_in_executor(s.executor, self._open_reader, s) for s in readers))
        except (apsw.Error, OSError) as exc:
            if not self._closing:
                self._set_failed(f"cannot open the database: {_message(exc)}")
            return
        if self._closing:
            return
        if replay is not None:
            self.state_detail = "replaying the log into the database"
            try:
                await replay()
            except StartRefused as exc:
                self.state = State.CORRUPT if exc.corrupt else State.FAILED
                self.state_detail = str(exc)
                self._emit("error", "database_not_served", path=str(self.path), reason=str(exc))
                return
            except (errors.NodeError, apsw.Error, OSError) as exc:
                if not self._closing:
                    self._set_failed(f"cannot replay the log: {_message(exc)}")
                return
            if self._closing:
                return
        self.state, self.state_detail = State.READY, ""
        self._emit("info", "database_ready", path=str(self.path))

    def begin_shutdown(self) -> None:
        """Refuse queued jobs and interrupt running ones now, so handlers in flight can still answer 503."""
        self._closing = True
        self._interrupt_all()
        shutting = partial(errors.Unavailable, "the node is shutting down")
        if self._scheduler is not None:
            self._scheduler.fail_waiting(shutting)
        with self._jobs_lock:
            jobs = list(self._write_jobs)
            self._write_jobs.clear()
        for job in jobs:
            with job.lock:
                job.cancelled = True
            if not job.started and not job.future.done():
                job.future.set_exception(shutting())

    async def close(self) -> None:
        """Stop serving and close every connection, the writer last, so that its close checkpoints the WAL
        into node.db and removes it (a stopped node leaves one self-contained file).

        Which writes finish: :meth:`begin_shutdown` (run here if the owner has not) is the cut-off. From it on
        new writes are refused (503 "shutting down"), jobs still queued then are refused as well (nothing of
        them ran: the log holds what they would have applied), and the job running on the writer is
        interrupted at its next progress check (it rolls back), or ends with its own result if it has no
        statement left to run. Close waits for that job with no time limit, and that is bounded: an
        interrupted job ends within ``PROGRESS_STEPS`` VM steps plus what SQLite cannot interrupt (an fsync,
        the check of a file being loaded, about 1 s/GB). A timer would not shorten the stop anyway: the
        connection belongs to the writer thread and cannot be closed under it, and the process waits for that
        thread at exit. The close job is queued behind every job the writer accepted (one thread, in order),
        so when this returns each of them has ended and its future is settled (``settle`` is called on the
        thread before the close job starts, and the loop runs those callbacks in order).

        A snapshot copy (a connection of its own) and a swap are waited for too (they hold ``_swap_lock``
        until their thread has ended, and stop at their next progress check now): while another connection
        is open the writer's close is not the last one and leaves the WAL.
        """
        if self._writer is None:
            return
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        async with self._swap_lock:
            writer, readers, scheduler = self._writer, self._readers, self._scheduler
            if writer is None:
                return  # another close() finished while this one waited for the lock
            if scheduler is not None:
                await scheduler.pause()
            for slot in readers:
                await loop.run_in_executor(slot.executor, _close_conn, slot)
            wal_kept = await loop.run_in_executor(writer.executor, self._shut_writer)
            for slot in (writer, *readers):
                slot.executor.shutdown(wait=False)
            self._writer, self._readers, self._scheduler = None, [], None
            self.state = State.CLOSED
        if wal_kept:
            self._emit(
                "warning", "database_wal_kept", path=str(self.path),
                detail="the WAL was not checkpointed at close (another connection had the file open); "
                "the next start recovers it",
            )  # fmt: skip

    def snapshot(self) -> dict[str, int]:
        """Counts for diagnostics and tests: jobs running on a connection thread, reads and writes waiting."""
        scheduler = self._scheduler
        return {
            "reads_running": sum(1 for s in self._readers if s.job is not None),
            "reads_waiting": scheduler.waiting if scheduler is not None else 0,
            "writes_queued": len(self._write_jobs),
            "write_running": int(self._writer is not None and self._writer.job is not None),
        }

    @property
    def is_open(self) -> bool:
        return self.state == State.READY

    @property
    def started(self) -> bool:
        """start() ran (whatever it found) and close() has not."""
        return self._writer is not None

    def announce_check(self) -> None:
        """The database will be opened and checked shortly, once its owner has prepared DATA_DIR (with
        replication: finishing an interrupted quarantine). Data calls answer ``database_checking`` from now
        on, as during the check itself, not "not open"."""
        if self.state == State.CLOSED:
            self.state, self.state_detail = State.CHECKING, "database is being checked"

    def require_ready(self) -> None:
        """Raise the reason this database cannot serve now (shutting down, being checked, corrupt, not open)."""
        if self._closing:
            raise errors.Unavailable("the node is shutting down")
        if self.state == State.READY:
            return
        if self.state == State.CHECKING:
            raise errors.DatabaseChecking("database is being checked; retry shortly")
        if self.state == State.CORRUPT:
            raise errors.DatabaseCorrupt(self.state_detail)
        raise errors.Unavailable(self.state_detail or "the database is not open")

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self._log is not None:
            getattr(self._log, level)(event, **fields)

    def _set_failed(self, detail: str) -> None:
        self.state, self.state_detail = State.FAILED, detail
        self._emit("error", "database_unavailable", path=str(self.path), reason=detail)

    def _interrupt_all(self) -> None:
        for slot in (self._writer, *self._readers):
            if slot is not None and slot.job is not None:
                slot.interrupt()

    # --- running jobs (event loop side) --------------------------------------------------------------------

    async def _write(
        self, fn: Callable[..., T], *args: Any, entry: Entry | None = None, starting: bool = False
    ) -> T:
        return await self._await_write(self._submit_write(fn, *args, entry=entry, starting=starting))

    def _submit_write(
        self, fn: Callable[..., Any], *args: Any, entry: Entry | None = None, starting: bool = False
    ) -> _Job:
        """Queue ``fn`` on the writer thread, behind every write job queued before (one thread, in order)."""
        if not starting:
            self.require_ready()
        elif self._closing or self._writer is None:
            raise errors.Unavailable("the node is shutting down")
        writer = self._writer
        assert writer is not None
        if len(self._write_jobs) >= self._queue_size:
            raise errors.Busy(f"database queue is full ({self._queue_size} writes waiting); retry shortly")
        job = _Job(asyncio.get_running_loop(), budget=self.limits.write_step_budget, entry=entry)
        with self._jobs_lock:
            self._write_jobs.append(job)
        writer.executor.submit(self._run_job, writer, job, fn, *args)
        return job

    async def _await_write(self, job: _Job) -> Any:
        try:
            # Awaited directly, not through asyncio.shield: the shield's outer future cost one more loop
            # round between the thread's result and this task (on every write and every apply). Cancelling
            # this task now cancels job.future, which only the loop side looks at: the thread's settle
            # ignores a future already done, and the job itself runs or is dropped as below.
            return await job.future
        except asyncio.CancelledError:
            # The client went away. A write that has not started is dropped; one that runs finishes (bounded
            # by its step budget): its outcome must not depend on a client's connection.
            with job.lock:
                if not job.started:
                    job.cancelled = True
            job.future.add_done_callback(_consume)  # nobody awaits it any more: no "never retrieved" noise
            raise
        finally:
            self._forget_write(job)

    def _unawaited(self, job: _Job) -> asyncio.Future[Any]:
        """The future of a write job its caller may never await (no task is made for it): the job leaves the
        queue's count when it ends, and a failure nobody looked at is not reported as never retrieved."""
        job.future.add_done_callback(lambda _: self._forget_write(job))
        job.future.add_done_callback(_consume)
        return job.future

    def _forget_write(self, job: _Job) -> None:
        with self._jobs_lock, contextlib.suppress(ValueError):
            self._write_jobs.remove(job)

    async def _read(self, client: str, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        self.require_ready()
        scheduler = self._scheduler
        assert scheduler is not None
        slot = await scheduler.acquire(client)
        if self._closing:
            scheduler.release(slot, client)
            raise errors.Unavailable("the node is shutting down")
        job = _Job(asyncio.get_running_loop())
        job.timeout_s = self.limits.statement_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()

        def finished(_: concurrent.futures.Future) -> None:
            loop.call_soon_threadsafe(scheduler.release, slot, client)  # only once the thread is done

        slot.executor.submit(self._run_job, slot, job, fn, slot, *args).add_done_callback(finished)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            with job.lock:
                job.cancelled = True
                running = job.started and not job.done
            if running:
                slot.interrupt()
            job.future.add_done_callback(_consume)
            raise

    def _run_job(self, slot: _Slot, job: _Job, fn: Callable[..., Any], *args: Any) -> None:
        """On the slot's thread: run ``fn`` unless the job was dropped, then settle the job's future."""
        with job.lock:
            if job.cancelled or job.started:
                return  # dropped, or already run as part of another job's group
            if self._closing:
                job.settle(exc=errors.Unavailable("the node is shutting down"))
                return
            job.started = True
        slot.job = job
        if job.timeout_s:
            job.deadline = time.monotonic() + job.timeout_s
        try:
            if slot.writer and self._staged is not None and fn != self._commit_staged:
                self._drop_staged()
            result = fn(job, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler, which maps it
            job.settle(exc=_settled_error(exc))
        else:
            job.settle(result)
        finally:
            slot.job = None
            with job.lock:
                job.done = True

    # --- public operations (event loop side) ---------------------------------------------------------------

    async def query(self, request: DbRequest, *, client: str = "") -> list[StatementResult]:
        """Read-only statements on a reader, raw results; ``client`` (a hash of the credential) bounds
        readers per client."""
        timeout = self.limits.statement_timeout_s
        if request.flags.db_timeout_s is not None:
            timeout = min(timeout, request.flags.db_timeout_s)
        return await self._read(
            client, self._run_query, request.statements, request.flags.transaction, timeout_s=timeout
        )

    async def apply(self, index: int, commands: Sequence[Command]) -> list[Applied] | None:
        """Apply the log entry ``index`` (its write commands); one outcome per command, or None if the entry
        was applied before (``index <= applied_index()``). Returns once the entry is committed (fsynced).

        Entries waiting together are applied in one transaction (see :mod:`node.storage.statemachine`);
        the caller hands them in log order.
        """
        return await self._write(self._apply_group, entry=Entry(index, tuple(commands)))

    async def apply_entries(
        self, entries: Sequence[Entry], *, starting: bool = False
    ) -> list[tuple[Applied, ...] | None]:
        """Apply log entries (in log order) in ONE transaction, as one job; per entry its commands' outcomes
        (None: applied before). Raises :class:`ApplyFailed` if the transaction did not commit: unlike
        :meth:`apply`, a local failure is never turned into per-statement results, because the entries are
        already durable in the log and will be applied (see node.service). ``starting``: during the replay
        at start, before the database serves."""
        return await self._write(self._apply_entries, tuple(entries), starting=starting)

    async def stage_entries(self, entries: Sequence[Entry]) -> Staged | None:
        """Run log entries not yet committed, the ones right after the applied index, in one transaction left
        open (:func:`node.storage.statemachine.stage`): a token and per entry its commands' outcomes, or None
        when nothing is left open (not the next entries, a local failure: the entries are then applied the
        usual way once committed). At most one group is staged: staging another, or any other write job,
        rolls it back first. Nothing of it is visible before :meth:`commit_staged`."""
        return await self._write(self._stage_entries, tuple(entries))

    async def commit_staged(
        self, token: object, then: Sequence[Entry] = ()
    ) -> tuple[bool, asyncio.Future[Staged | None] | None]:
        """COMMIT the group staged under ``token``, once the log has committed exactly its entries; False if
        it is no longer open (another write job rolled it back: apply its entries the usual way). Raises
        :class:`ApplyFailed` if the COMMIT fails (nothing applied).

        ``then`` (the entries right after the group) is staged by a second job queued right behind the
        COMMIT, so the writer thread goes on to it at once while the loop answers what was committed: the
        second value is that job's future (what :meth:`stage_entries` returns; None when not queued). If
        the COMMIT did not happen, that job finds the applied index elsewhere and stages nothing."""
        commit = self._submit_write(self._commit_staged, token)
        staging: asyncio.Future[Staged | None] | None = None
        if then:
            with contextlib.suppress(errors.NodeError):  # a full queue: nothing staged, applied as usual
                staging = self._unawaited(self._submit_write(self._stage_entries, tuple(then)))
        return await self._await_write(commit), staging

    async def applied_index(self, *, starting: bool = False) -> int:
        """The index of the last entry applied (0 for none), as stored with the data."""
        return await self._write(lambda job: statemachine.applied_index(self._ops(job)), starting=starting)

    async def ping(self) -> None:
        await self._read("\x00readyz", self._ping, timeout_s=self.limits.statement_timeout_s)

    async def disk_low(self) -> bool:
        """True if DATA_DIR has less than DISK_LOW_BYTES free, or the last write found the disk full."""
        if self.disk_full:
            return True
        try:
            st = await asyncio.to_thread(os.statvfs, self.data_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < DISK_LOW_BYTES

    async def backup(self) -> Path:
        """A consistent copy of the database in a new file (SQLite's backup API); the caller deletes it."""
        return (await self.backup_indexed())[0]

    async def backup_indexed(self) -> tuple[Path, int]:
        """:meth:`backup`, and the applied index the copy reflects: :meth:`copy_for_snapshot`, so a backup of
        a large database never holds up writes (the copy reads one WAL snapshot while they go on)."""
        target = self.temp_path("backup")
        index = await self.copy_for_snapshot(target)  # removes its partial copy on failure or cancellation
        return target, index

    def temp_path(self, kind: str) -> Path:
        """A fresh temporary file name in DATA_DIR (removed at the next start if left behind by a crash)."""
        self._temp_seq += 1
        return self.data_dir / f"{_TEMP_PREFIX}{kind}-{os.getpid()}-{self._temp_seq}"

    async def load_sqlite_file(
        self, source: Path, *, index: int, request: RequestRow | None = None, only_above: bool = False
    ) -> bool:
        """Replace the database with the SQLite file at ``source`` (checked first; the file is consumed).

        ``request``: the load's own request ID, recorded in the new file (with the index that loaded it) in
        the same stamping that clears the old ones, so a retry of a replicated load answers its first
        outcome instead of loading again. ``only_above``: a replicated load's entry, skipped (False
        returned, nothing changed) when the database already holds ``index`` (a snapshot installed meanwhile
        holds the load and what followed it), checked on the writer in the same job as the swap."""
        self.require_ready()
        return bool(await self._swap_in(self._load_sqlite, source, index, request, only_above))

    async def copy_for_snapshot(self, target: Path) -> int:
        """Write a consistent copy of the database to ``target`` (which must not exist) and return the applied
        index it holds. The writer is not blocked: the copy is ``VACUUM INTO`` on a private read-only
        connection in a worker thread, reading one WAL snapshot while writes go on. The copy is a
        self-contained rollback-journal file (no ``-wal``), fsynced. Only swaps wait for it (a load or an
        install must not replace the file under it). A full disk raises
        :class:`node.errors.InsufficientStorage`; on any failure or cancellation ``target`` is removed."""
        self.require_ready()
        copier = _SnapshotCopier(self, target)
        async with self._swap_lock:
            work = asyncio.ensure_future(asyncio.to_thread(copier.run))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                copier.cancelled = True
                copier.interrupt()
                # The thread removes the partial copy itself; the lock is held until it has ended so no
                # swap replaces the file under its connection.
                await asyncio.wait({work})
                raise

    async def install_snapshot(self, source: Path, index: int) -> None:
        """Replace the database by the snapshot file at ``source`` (holding ``index`` as its applied index).

        ``source`` is not consumed (it stays this node's snapshot): it is copied to a temp file in DATA_DIR
        and fsynced first; a copy whose applied index is not ``index`` raises :class:`SnapshotIndexMismatch`
        and nothing changes. The swap is :meth:`_swap_in`'s (crash argument in the module doc), without the
        stamping a load does: the snapshot's request IDs and staged load chunks are replicated state and are
        kept as the snapshot has them. A full disk raises :class:`node.errors.InsufficientStorage`."""
        self.require_ready()
        temp = self.temp_path("snapshot")
        try:
            await asyncio.to_thread(_copy_snapshot_file, source, temp, index)
            await self._swap_in(self._replace_file, temp)
        finally:
            # Gone after a swap (renamed); a failed or cancelled copy leaves it: removed on a worker thread.
            await asyncio.shield(asyncio.to_thread(temp.unlink, True))

    async def _swap_in(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (which replaces node.db, see :meth:`_replace_file`) on the writer with every reader
        closed, then reopen the readers on the new file."""
        # Readers must close before the swap: a last connection closing on the old file would delete the new
        # file's -wal by name. One swap at a time: another swap's readers must not reopen mid-swap, and no
        # snapshot copy may hold a connection to the old file.
        async with self._swap_lock:
            # Checked again here, under the lock close() takes too: the caller checked before its file copy,
            # and a stop may have closed the database during it (503, nothing swapped).
            self.require_ready()
            scheduler = self._scheduler
            assert scheduler is not None and self._writer is not None
            return await self._swap_in_locked(scheduler, fn, *args)

    async def _swap_in_locked(self, scheduler: ReadScheduler, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        await scheduler.pause()
        try:
            for slot in self._readers:
                await loop.run_in_executor(slot.executor, _close_conn, slot)
            return await self._write(fn, *args)
        finally:
            try:
                if self._writer is not None and not self._closing:
                    for slot in self._readers:
                        await loop.run_in_executor(slot.executor, self._open_reader, slot)
            finally:
                scheduler.resume()

    async def load_sqlite(self, data: bytes, *, index: int) -> None:
        """Replace the database with the SQLite file ``data`` (checked first)."""
        source = self.temp_path("load")
        await asyncio.to_thread(_write_file, source, data)
        try:
            await self.load_sqlite_file(source, index=index)
        finally:
            await asyncio.to_thread(source.unlink, True)

    async def load_dump_file(self, source: Path, *, time_ns: int, seed: int, index: int) -> int:
        """Run the SQL dump at ``source`` as one transaction (all or nothing) recording ``index`` as applied;
        returns the statements run. The dump is read, split and stamped on the writer thread."""
        return await self._write(self._load_dump, source, time_ns, seed, index)

    # --- connection threads --------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "DATA_DIR is not writable", str(self.data_dir))
        for stale in self.data_dir.glob(f"{_TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)  # left by a crash during a backup or load

    def _open_and_check(self) -> list[str] | None:
        """Open the writer and check the file. Returns None if it is sound, else quick_check's verdict lines."""
        quarantine = self.data_dir / QUARANTINE_DIR
        held = self.quarantine_corrupt and not self.path.exists()
        if held and quarantine.is_dir() and any(quarantine.iterdir()):
            raise _QuarantineHeld(
                f"{self.path} is absent and {quarantine} holds a quarantined database: not starting empty; "
                f"remove {quarantine} to start with an empty database (then restore a backup with /db/load)"
            )
        if self.path.exists() and self.path.stat().st_size == 0:
            self._emit("warning", "database_file_empty", path=str(self.path),
                       detail="node.db is 0 bytes; starting with an empty database")  # fmt: skip
        try:
            self._open_writer()
            assert self._writer is not None and self._writer.conn is not None
            verdict = [row[0] for row in self._writer.conn.execute("PRAGMA quick_check").fetchall()]
        except (apsw.CorruptError, apsw.NotADBError) as exc:
            return [_message(exc)]
        except apsw.SQLError as exc:
            # A damaged header (its format version bytes) reads as "unsupported file format": the file cannot
            # be served, and quarantining it keeps it for inspection, as for any other damage.
            if "unsupported file format" in str(exc):
                return [_message(exc)]
            raise
        if verdict != ["ok"]:
            return [str(v) for v in verdict]
        return None

    def _open_writer(self) -> None:
        slot = self._writer
        assert slot is not None
        self._schema_conn = None
        self._clock_db = apsw.Connection(":memory:")
        slot.conn = self._connect(slot, "PRAGMA journal_mode=WAL")
        for name in TIME_FUNCTIONS:
            slot.conn.create_scalar_function(name, partial(self._fn_time, name), -1, deterministic=True)
        slot.conn.create_scalar_function("random", self._fn_random, 0)
        slot.conn.create_scalar_function("randomblob", self._fn_randomblob, 1)

    def _open_reader(self, slot: _Slot) -> None:
        if slot.conn is None:
            slot.conn = self._connect(slot, "PRAGMA query_only=ON")

    def _close_writer(self) -> None:
        """Writer thread: close the write connection. As the last connection to the file, its close
        checkpoints the WAL into node.db and deletes it: a stop and a swap (:meth:`_replace_file`) rely on
        that, so an interrupt left pending by :meth:`begin_shutdown` is cleared first (and a staged group is
        rolled back: its entries are in the log)."""
        if self._writer is not None:
            if self._writer.conn is not None:
                _clear_interrupt(self._writer.conn)
                with contextlib.suppress(apsw.Error):
                    self._drop_staged()
            _close_conn(self._writer)
        if self._clock_db is not None:
            self._clock_db.close()
            self._clock_db = None

    def _shut_writer(self) -> bool:
        """Writer thread, at close: close the writer; True if a WAL is still beside node.db (it was not
        checkpointed: another connection had the file open)."""
        had_conn = self._writer is not None and self._writer.conn is not None
        self._close_writer()
        return had_conn and Path(f"{self.path}-wal").exists()

    def _quarantine(self) -> Path:
        target = self.data_dir / QUARANTINE_DIR / event_stamp()
        target.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                os.replace(source, target / source.name)
        _fsync_dir(self.data_dir)
        return target

    def _connect(self, slot: _Slot, setup: str) -> apsw.Connection:
        conn = apsw.Connection(str(self.path))
        conn.set_busy_timeout(5000)
        conn.execute(setup).fetchall()
        # The one switch (node.storage.statemachine.SYNCHRONOUS): NORMAL, the log is the durable record.
        conn.execute(f"PRAGMA synchronous={statemachine.SYNCHRONOUS}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.limit(apsw.SQLITE_LIMIT_LENGTH, self.limits.max_result_bytes)
        conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)
        conn.authorizer = partial(
            self._authorize, slot
        )  # last: the settings above are pragmas users may not set
        conn.set_progress_handler(partial(self._progress, slot), PROGRESS_STEPS)
        return conn

    def _ping(self, job: _Job, slot: _Slot) -> None:
        assert slot.conn is not None
        try:
            slot.conn.execute("SELECT 1").fetchall()
        except apsw.Error as exc:
            raise errors.Unavailable(f"database not ok: {_message(exc)}") from None

    def _authorize(
        self, slot: _Slot, action: int, one: str | None, two: str | None, db: str | None, trig: str | None
    ) -> int:
        if slot.internal:
            return apsw.SQLITE_OK
        refusal: str | None = None
        if action in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH):
            refusal = "ATTACH and DETACH are not allowed"
        elif action in _TX_ACTIONS:
            refusal = "transaction statements are not allowed; use the transaction flag"
        elif action in _TEMP_CREATE or (action in _CREATE and db == "temp"):
            refusal = f"TEMP objects are not allowed: {one} would outlive this request on a shared connection"
        elif action == apsw.SQLITE_PRAGMA and one is not None:
            refusal = pragmas.refusal(one, two)
        elif action != apsw.SQLITE_FUNCTION and (_internal_name(one) or _internal_name(two)):
            prefix = statemachine.INTERNAL_PREFIX
            refusal = f"names starting with {prefix} are reserved for the node's own tables"
        if refusal is None:
            return apsw.SQLITE_OK
        slot.denied = refusal
        slot.denied_internal = action not in (apsw.SQLITE_PRAGMA, *_TX_ACTIONS) and (
            _internal_name(one) or _internal_name(two)
        )
        return apsw.SQLITE_DENY

    def _progress(self, slot: _Slot) -> bool:
        if self._closing:
            return True
        job = slot.job
        if job is None or slot.internal:
            return False  # the node's own statements (savepoints, the applied index) use no client's budget
        if job.cancelled:
            return True
        if job.budget is not None:
            job.steps += PROGRESS_STEPS
            if job.steps > job.budget:
                job.over_budget = True
                return True
        return time.monotonic() > job.deadline

    # Deterministic replacements, used on the write connection only.

    def _stamp(self, seed: int | None, time_ns: int | None) -> None:
        """What random() and 'now' answer from here on: the command's seed and time (None: the real ones)."""
        self._seed, self._rng = seed, None
        self._now_ns, self._now_text = time_ns, None

    def _command_rng(self) -> random.Random:
        rng = self._rng
        if rng is None:
            # Seeded at the first use, before any other draw: the same values as seeding at the command's
            # start, since nothing else draws from it.
            rng = self._rng = random.Random(self._seed)
        return rng

    def _fn_random(self) -> int:
        return self._command_rng().getrandbits(64) - (1 << 63)

    def _fn_randomblob(self, n: Any) -> bytes:
        size = max(1, int(n)) if isinstance(n, int | float) else 1
        if size > self.limits.max_result_bytes:
            raise apsw.TooBigError("string or blob too big")
        return self._command_rng().randbytes(size)

    def _fn_time(self, name: str, *args: Any) -> Any:
        now = self._now_text
        if now is None:
            if self._now_ns is not None:
                now = self._now_text = utc_text(self._now_ns)
            else:
                now = _now_text(time.time_ns())
        if not args and name != "strftime":
            args = (now,)
        elif name == "strftime" and len(args) == 1:
            args = (args[0], now)
        else:
            args = tuple(now if isinstance(a, str) and a.strip().lower() == "now" else a for a in args)
        assert self._clock_db is not None
        placeholders = ", ".join("?" * len(args))
        return self._clock_db.execute(f"SELECT {name}({placeholders})", args).fetchall()[0][0]

    def _internal_sql(self, slot: _Slot, sql: str) -> None:
        assert slot.conn is not None
        slot.internal = True
        try:
            slot.conn.execute(sql, can_cache=False)
        finally:
            slot.internal = False

    def _rollback_if_open(self, slot: _Slot) -> None:
        if slot.conn is not None and slot.conn.in_transaction:
            self._internal_sql(slot, "ROLLBACK")

    def _ops(self, job: _Job) -> _WriterOps:
        assert self._writer is not None and self._writer.conn is not None
        return _WriterOps(self, self._writer, job)

    def _apply_group(self, job: _Job) -> list[Applied] | None:
        """On the writer thread: apply this job's entry and the entries queued right behind it, together."""
        group = [job, *self._take_followers(job)]
        slot = self._writer
        assert slot is not None and job.entry is not None
        slot.full = False
        try:
            entries = [g.entry for g in group if g.entry is not None]
            self._refuse_foreign_version(entries)
            done = statemachine.apply(self._ops(job), entries)
        except BaseException as exc:
            if isinstance(exc, apsw.Error) and not isinstance(exc, apsw.InterruptError):
                exc = self._job_failure(
                    exc,
                    full="the disk is full; nothing was written",
                    other=f"the write failed: {_message(exc)}; nothing was written",
                )
            for other in group[1:]:
                _finish(other, exc=_settled_error(exc))
            raise exc from None
        finally:
            self._stamp(None, None)
        full = slot.full or (done.commit_error is not None and is_disk_full(done.commit_error))
        if full:
            self.disk_full = True
        elif done.committed and any(
            x.ok for entry in done.outcomes if entry for a in entry for x in a.results
        ):
            self.disk_full = False
        for other, outcome in zip(group[1:], done.outcomes[1:], strict=True):
            _finish(other, result=None if outcome is None else list(outcome))
        first = done.outcomes[0]
        return None if first is None else list(first)

    def _refuse_foreign_version(self, entries: Sequence[Entry]) -> None:
        """Both apply paths (a single node's log and the Replicator's) check before anything runs."""
        other = statemachine.foreign_version([c for e in entries for c in e.commands], self.sqlite_version)
        if other is not None:
            self.apply_refused = (
                f"log entries were written under SQLite {other} and this node runs SQLite "
                f"{self.sqlite_version}: it applies nothing more until it runs SQLite {other}"
            )
            raise SqliteVersionRefused(self.apply_refused)
        self.apply_refused = None

    def _run_group(self, job: _Job, entries: tuple[Entry, ...], run: Callable[[Any, tuple[Entry, ...]], T]) -> T:
        """On the writer thread: ``run`` (statemachine.apply or stage) on the entries, after the version check;
        an SQLite error propagates, but an interrupt by a shutdown becomes _ShuttingDown."""
        slot = self._writer
        assert slot is not None
        slot.full = False
        self._refuse_foreign_version(entries)
        try:
            return run(self._ops(job), entries)
        except apsw.InterruptError:
            if self._closing:
                raise _ShuttingDown() from None
            raise
        finally:
            self._stamp(None, None)

    def _apply_entries(self, job: _Job, entries: tuple[Entry, ...]) -> list[tuple[Applied, ...] | None]:
        """On the writer thread: the entries in one transaction; raises ApplyFailed unless it committed, and
        SqliteVersionRefused (nothing run) for commands stamped under another SQLite version."""
        slot = self._writer
        assert slot is not None
        try:
            done = self._run_group(job, entries, statemachine.apply)
        except apsw.Error as exc:
            self.disk_full = self.disk_full or is_disk_full(exc)
            raise ApplyFailed(f"applying the log failed: {_message(exc)}") from None
        if not done.committed:
            self.disk_full = self.disk_full or slot.full or is_disk_full(done.commit_error)
            raise ApplyFailed(f"applying the log failed: COMMIT failed: {_message(done.commit_error)}")
        if slot.full:
            self.disk_full = True
        elif any(x.ok for entry in done.outcomes if entry for a in entry for x in a.results):
            self.disk_full = False
        return list(done.outcomes)

    def _stage_entries(self, job: _Job, entries: tuple[Entry, ...]) -> Staged | None:
        """On the writer thread: see :meth:`stage_entries`."""
        try:
            staged = self._run_group(job, entries, statemachine.stage)
        except apsw.Error:
            return None  # rolled back; the entries are applied after their commit, where a failure is retried
        if staged is None:
            return None
        token = self._staged = object()
        self._staged_ok = any(x.ok for entry in staged for a in entry for x in a.results)
        return token, list(staged)

    def _commit_staged(self, job: _Job, token: object) -> bool:
        """On the writer thread: see :meth:`commit_staged`."""
        slot = self._writer
        assert slot is not None and slot.conn is not None
        if self._staged is not token or not slot.conn.in_transaction:
            self._drop_staged()
            return False
        self._staged = None
        try:
            statemachine.commit_staged(self._ops(job))
        except apsw.Error as exc:
            self.disk_full = self.disk_full or slot.full or is_disk_full(exc)
            raise ApplyFailed(f"applying the log failed: COMMIT failed: {_message(exc)}") from None
        if slot.full:
            self.disk_full = True
        elif self._staged_ok:
            self.disk_full = False
        return True

    def _drop_staged(self) -> None:
        """On the writer thread: roll back the staged group, if any."""
        self._staged = None
        slot = self._writer
        if slot is not None:
            self._rollback_if_open(slot)

    def _take_followers(self, job: _Job) -> list[_Job]:
        """The entry jobs queued right after ``job`` (up to a barrier: any other write job), now started."""
        taken: list[_Job] = []
        commands = len(job.entry.commands) if job.entry is not None else 0
        with self._jobs_lock:
            behind = False
            for other in self._write_jobs:
                if other is job:
                    behind = True
                    continue
                if not behind:
                    continue
                if other.entry is None or commands + len(other.entry.commands) > MAX_GROUP_COMMANDS:
                    break
                with other.lock:
                    if other.cancelled or other.started:
                        continue
                    other.started = True
                taken.append(other)
                commands += len(other.entry.commands)
        return taken

    def _run_query(
        self, job: _Job, slot: _Slot, statements: tuple[Statement, ...], transaction: bool
    ) -> list[StatementResult]:
        """A read request on a reader: every statement's raw result (rows), bounded by the request's time."""
        results: list[StatementResult] = []
        failure: str | None = None  # why the transaction did not commit
        stopped: str | None = None  # why the remaining statements (autocommit) do not run
        job.bytes_left = self.limits.max_result_bytes
        try:
            if transaction:
                self._internal_sql(slot, "BEGIN")
            for number, statement in enumerate(statements, 1):
                if stopped is not None:
                    results.append(res.not_run(stopped))
                    continue
                result = self._run_statement(slot, job, Mode.QUERY, statement)
                results.append(result)
                if result.error is None:
                    continue
                if transaction:
                    failure = f"statement {number} failed: {result.error}"
                    break
                if time.monotonic() > job.deadline:
                    stopped = result.error
            if transaction and failure is None:
                try:
                    self._internal_sql(slot, "COMMIT")
                except apsw.Error as exc:
                    failure = f"COMMIT failed: {_message(exc)}"
        except apsw.Error as exc:
            if transaction:
                failure = failure or _message(exc)
            else:
                stopped = _message(exc)
                results.extend(res.not_run(stopped) for _ in range(len(statements) - len(results)))
        finally:
            self._rollback_if_open(slot)  # never leave a transaction open on a shared connection
        if transaction and failure is not None:
            return res.rolled_back(results, len(statements), failure)
        return results

    def _run_statement(self, slot: _Slot, job: _Job, mode: str, statement: Statement) -> StatementResult:
        """One statement's raw result. On the writer a full disk is noted (``slot.full``)."""
        conn = slot.conn
        assert conn is not None
        started = time.perf_counter()
        seen: dict[str, Any] = {"index": -1, "rows_at": None, "description": None}

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            seen["index"] += 1
            description = cursor.get_description()
            if description and seen["description"] is None:
                seen["description"], seen["rows_at"] = description, seen["index"]
            return not (mode == Mode.QUERY and not cursor.is_readonly)

        cursor = conn.cursor()
        cursor.exec_trace = trace
        slot.denied = None
        changes_before = conn.total_changes()
        rowid_before = conn.last_insert_rowid()
        counter = _RowCounter(seen, self.limits.max_result_rows, job, keep=mode != Mode.EXECUTE)
        error: str | None = None
        params = statement.params
        bindings = dict(params) if isinstance(params, dict) or hasattr(params, "keys") else params
        try:
            cursor.execute(statement.sql, bindings)
            counter.consume(cursor)
        except apsw.ExecTraceAbort:
            error = READ_ONLY_REFUSAL
        except apsw.InterruptError:
            if self._closing:
                raise _ShuttingDown() from None
            error = self._interrupt_reason(job)
        except apsw.AuthError as exc:
            error = slot.denied or _message(exc)
        except _ResultTooLarge as exc:
            error = str(exc)
        except apsw.FullError as exc:
            slot.full = True
            error = _message(exc)
        except (apsw.Error, ValueError, OverflowError, UnicodeError) as exc:
            error = _message(exc)
        except (KeyError, TypeError) as exc:  # apsw's binding errors the request checks missed: not a 500
            error = f"cannot bind the values: {type(exc).__name__} {exc}"
        finally:
            cursor.close(force=True)
        elapsed = time.perf_counter() - started
        if error is not None:
            return res.failed(error, time_s=elapsed)
        description = seen["description"]
        as_rows = mode == Mode.QUERY or (mode == Mode.REQUEST and description is not None)
        if as_rows:
            description = description or ()
            return StatementResult(
                columns=tuple(name for name, _ in description),
                decltypes=tuple(decltype for _, decltype in description),
                rows=tuple(counter.rows),
                has_blobs=counter.has_blobs,
                time_s=elapsed,
            )
        changed = conn.total_changes() - changes_before
        rowid = conn.last_insert_rowid()
        # The connection is shared, so SQLite's last rowid may be another request's: report it only if this
        # statement inserted (it moved, or an INSERT changed rows and reused the same rowid).
        inserted = rowid != rowid_before or (changed > 0 and _INSERT_WORDS.match(statement.sql))
        return StatementResult(
            last_insert_id=rowid if inserted and rowid != 0 else None,
            rows_affected=conn.changes() if changed > 0 and conn.changes() > 0 else None,
            time_s=elapsed,
        )

    def _run_load_statement(self, slot: _Slot, job: _Job, sql: str) -> tuple[bool, str | None]:
        """One statement of a replicated dump (already stamped): (counts as a statement, its error).

        As for a local load: a dump's own BEGIN/COMMIT are skipped, its foreign_keys pragma is counted but
        not run (the load checks foreign keys at its end), statements about the node's own tables are
        skipped, each statement has the write step budget. A full disk or an I/O error raises: that is a
        local failure, retried, never the load's result (other replicas would not share it).
        """
        if _TX_WORDS.match(sql):
            return False, None
        if _FK_PRAGMA.match(sql):
            return True, None
        conn = slot.conn
        assert conn is not None
        slot.denied, slot.denied_internal = None, False
        job.steps, job.over_budget = 0, False
        try:
            conn.execute(sql).fetchall()
        except apsw.AuthError as exc:
            if slot.denied_internal:
                return False, None  # a dump of a backup holds the node's own tables: this node keeps its own
            return False, slot.denied or _message(exc)
        except apsw.InterruptError:
            if self._closing:
                raise _ShuttingDown() from None
            return False, self._interrupt_reason(job)
        except apsw.FullError:
            slot.full = True
            raise
        except apsw.IOError:
            raise
        except apsw.Error as exc:
            return False, _message(exc)
        return True, None

    def _interrupt_reason(self, job: _Job) -> str:
        if job.over_budget:
            return (
                f"write budget exceeded: the request used more than {job.budget} SQLite VM steps "
                "(DB_WRITE_STEP_BUDGET)"
            )
        if job.cancelled:
            return "interrupted: the client went away"
        return f"interrupted: the request ran longer than {job.timeout_s:g} s"

    def _job_failure(self, exc: apsw.Error | OSError, *, full: str, other: str) -> Exception:
        """What a whole-database job (backup, load) that failed outside any statement answers."""
        if is_disk_full(exc):
            self.disk_full = True
            return errors.InsufficientStorage(full)
        if isinstance(exc, apsw.InterruptError) and self._closing:
            return _ShuttingDown()
        return errors.Unavailable(other)

    def _load_sqlite(
        self, job: _Job, source: Path, index: int, request: RequestRow | None = None, only_above: bool = False
    ) -> bool:
        if only_above and statemachine.applied_index(self._ops(job)) >= index:
            return False
        try:
            check = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                verdict = check.execute("PRAGMA quick_check").fetchall()
                check.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            except apsw.Error as exc:
                raise errors.BadRequest(f"invalid SQLite data: {_message(exc)}") from None
            finally:
                check.close()
            if verdict != [("ok",)]:
                raise errors.BadRequest("invalid SQLite data: integrity check failed")
            # The file is stamped with ``index`` BEFORE it is renamed into place, so the swap carries its
            # applied index atomically: a crash can never leave the loaded file with another database's
            # applied index (which would make the log's replay skip entries) or request IDs.
            _stamp_file(source, index, request)
            with open(source, "rb+") as f:
                os.fsync(f.fileno())
            self._replace_file(job, source)
        except OSError as exc:
            if is_disk_full(exc):
                raise errors.InsufficientStorage(
                    "not enough disk space in DATA_DIR to load the file"
                ) from None
            raise
        self._stamp_loaded(job, index, request)
        return True

    def _replace_file(self, job: _Job, source: Path) -> None:
        """Writer thread, readers closed: make the complete, fsynced file ``source`` (in DATA_DIR) the
        database, old or new whatever the crash point (module doc), and reopen the writer on it."""
        try:
            # Close, then swap files: the old WAL is checkpointed and removed at close, so it can never be
            # applied to the new file; a crash before the rename leaves the old database whole.
            self._close_writer()
            for sidecar in ("-wal", "-shm"):
                Path(str(self.path) + sidecar).unlink(missing_ok=True)
            _fsync_dir(self.data_dir)
            crash_point("swap-sidecars-removed")
            os.replace(source, self.path)
            crash_point("swap-replaced")
            _fsync_dir(self.data_dir)
            crash_point("swap-dir-synced")
        finally:
            if self._writer is not None and self._writer.conn is None:
                self._reopen_writer()

    def _stamp_loaded(self, job: _Job, index: int, request: RequestRow | None = None) -> None:
        """A loaded file brings its own tables: record ``index`` as applied in it and forget request IDs that
        another database recorded (they name other writes)."""
        ops = self._ops(job)
        try:
            ops.internal("BEGIN IMMEDIATE")
            statemachine.ensure_schema(ops)
            ops.internal(f"DELETE FROM {statemachine.REQUESTS_TABLE}")
            ops.internal(f"DELETE FROM {statemachine.LOADS_TABLE}")  # chunks another database staged
            if request is not None:
                ops.internal(_INSERT_REQUEST, request.params(index))
            statemachine.set_applied(ops, index)
            ops.internal("COMMIT")
        except apsw.Error as exc:
            raise self._job_failure(
                exc, full="the file was loaded, but the disk is full", other=f"load failed: {_message(exc)}"
            ) from None
        finally:
            if ops.in_transaction():
                ops.internal("ROLLBACK")

    def _reopen_writer(self) -> None:
        """After a swap: the new file must open, or the node stops serving (503) rather than crash requests."""
        try:
            self._open_writer()
        except (apsw.Error, OSError) as exc:
            self.state, self.state_detail = State.FAILED, f"cannot reopen the database: {_message(exc)}"
            self._emit("error", "database_unavailable", path=str(self.path), reason=self.state_detail)
            if is_disk_full(exc):
                raise errors.InsufficientStorage(f"the disk is full: {self.state_detail}") from None
            raise errors.Unavailable(self.state_detail) from None

    def _load_dump(self, job: _Job, source: Path, time_ns: int, seed: int, index: int) -> int:
        """A dump as one transaction. Its leading ``PRAGMA foreign_keys=OFF`` holds for this load only: it is
        applied before BEGIN (SQLite ignores it inside a transaction) and undone in ``finally``. Each
        statement has the write step budget (deterministic); any other refused pragma is a 400 naming it."""
        slot = self._writer
        assert slot is not None and slot.conn is not None
        self._stamp(seed, time_ns)
        try:
            # A load is not in the log (only its marker is), so the log cannot replay it: its COMMIT must be
            # durable by itself before it is acknowledged (FULL fsyncs the WAL), whatever SYNCHRONOUS says.
            self._internal_sql(slot, "PRAGMA synchronous=FULL")
            return self._load_dump_statements(slot, job, source, index)
        except apsw.Error as exc:  # outside a statement: BEGIN, COMMIT, the pragma before BEGIN
            raise self._job_failure(
                exc,
                full="load failed: the disk is full; nothing was loaded",
                other=f"load failed: {_message(exc)}; nothing was loaded",
            ) from None
        finally:
            self._rollback_if_open(slot)
            with contextlib.suppress(apsw.Error):
                self._internal_sql(slot, "PRAGMA foreign_keys=ON")
            with contextlib.suppress(apsw.Error):
                self._internal_sql(slot, f"PRAGMA synchronous={statemachine.SYNCHRONOUS}")
            self._stamp(None, None)

    def _load_dump_statements(self, slot: _Slot, job: _Job, source: Path, index: int) -> int:
        conn = slot.conn
        assert conn is not None
        count = 0
        begun = False
        for sql in dump_statements(source, MAX_DUMP_STATEMENT_CHARS):
            if _TX_WORDS.match(sql):
                continue  # a dump's own BEGIN/COMMIT: the load is one transaction already
            fk = _FK_PRAGMA.match(sql)
            if fk is not None:
                if not begun:
                    enabled = fk.group(1).lower() in ("1", "on", "true", "yes")
                    self._internal_sql(slot, f"PRAGMA foreign_keys={'ON' if enabled else 'OFF'}")
                count += 1
                continue  # inside the transaction SQLite ignores it; so do we
            if not begun:
                self._internal_sql(slot, "BEGIN IMMEDIATE")
                begun = True
                # The node's tables exist before the dump's statements run, so a dump's statements about
                # them are refused by the authorizer (and skipped) rather than failing as unknown tables.
                statemachine.ensure_schema(self._ops(job))
            slot.denied, slot.denied_internal = None, False
            job.steps, job.over_budget = 0, False
            try:
                conn.execute(rewrite_time_keywords(sql)).fetchall()
            except apsw.AuthError as exc:
                if slot.denied_internal:
                    continue  # a dump of a backup holds the node's own tables: this node keeps its own
                raise errors.BadRequest(f"load failed: {slot.denied or _message(exc)}") from None
            except apsw.InterruptError:
                if self._closing:
                    raise _ShuttingDown() from None
                raise errors.BadRequest(
                    f"load failed at statement {count + 1}: {self._interrupt_reason(job)}"
                ) from None
            except apsw.FullError:
                self.disk_full = True
                raise errors.InsufficientStorage(
                    f"load failed at statement {count + 1}: the disk is full; nothing was loaded"
                ) from None
            except apsw.Error as exc:
                raise errors.BadRequest(f"load failed at statement {count + 1}: {_message(exc)}") from None
            count += 1
        if not begun:
            self._internal_sql(slot, "BEGIN IMMEDIATE")
        # The load is one entry: its index is recorded in its own transaction, like any write's.
        ops = self._ops(job)
        statemachine.ensure_schema(ops)
        statemachine.set_applied(ops, index)
        try:
            self._internal_sql(slot, "COMMIT")
        except apsw.FullError:
            self.disk_full = True
            raise errors.InsufficientStorage("load failed: the disk is full; nothing was loaded") from None
        if count:
            self.disk_full = False
        return count


class _WriterOps:
    """The write connection as :mod:`node.storage.statemachine` uses it (writer thread only)."""

    __slots__ = ("cursor", "db", "job", "slot")

    def __init__(self, db: Database, slot: _Slot, job: _Job) -> None:
        self.db, self.slot, self.job = db, slot, job
        self.cursor: apsw.Cursor | None = None

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        slot = self.slot
        conn = slot.conn
        assert conn is not None
        # One cursor for all of them: a new cursor per statement costs as much as running a SAVEPOINT.
        cursor = self.cursor
        if cursor is None or cursor.connection is not conn:
            cursor = self.cursor = conn.cursor()
        slot.internal = True
        try:
            return cursor.execute(sql, params).fetchall()
        finally:
            slot.internal = False

    @property
    def schema_ready(self) -> bool:
        """The node's own tables were all seen committed on this connection (statemachine skips its lookup).
        A swap opens another connection, so a swapped-in file is looked at again."""
        return self.slot.conn is not None and self.db._schema_conn is self.slot.conn

    @schema_ready.setter
    def schema_ready(self, ready: bool) -> None:
        self.db._schema_conn = self.slot.conn if ready else None

    def message(self, exc: BaseException) -> str:
        return _message(exc)

    def in_transaction(self) -> bool:
        return self.slot.conn is not None and self.slot.conn.in_transaction

    def deferred_fk_pending(self) -> bool:
        assert self.slot.conn is not None
        return self.slot.conn.status(apsw.SQLITE_DBSTATUS_DEFERRED_FKS)[0] > 0

    def start_command(self, write: WriteCommand) -> None:
        # One budget, one byte limit, one seed and one time per command: its outcome is its own.
        self.db._stamp(write.seed, write.time_ns)
        self.job.steps, self.job.over_budget = 0, False
        self.job.bytes_left = self.db.limits.max_result_bytes

    def over_budget(self) -> bool:
        return self.job.over_budget

    def run(self, mode: str, statement: Statement) -> StatementResult:
        return self.db._run_statement(self.slot, self.job, mode, statement)

    def run_load_statement(self, sql: str) -> tuple[bool, str | None]:
        return self.db._run_load_statement(self.slot, self.job, sql)


def _settled_error(exc: BaseException) -> BaseException:
    """What a job's awaiting handler receives for ``exc`` raised on a connection thread."""
    if isinstance(exc, _ShuttingDown) or (isinstance(exc, apsw.InterruptError)):
        return errors.Unavailable("the node is shutting down; the request was interrupted")
    return exc


def _finish(job: _Job, *, result: Any = None, exc: BaseException | None = None) -> None:
    job.settle(result, exc)
    with job.lock:
        job.done = True


def _internal_name(name: str | None) -> bool:
    prefix = statemachine.INTERNAL_PREFIX
    return name is not None and name[: len(prefix)].lower() == prefix


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _clear_interrupt(conn: apsw.Connection) -> None:
    """Forget an interrupt that no statement consumed, so that closing ``conn`` checkpoints the WAL.

    :meth:`Database.begin_shutdown` interrupts the writer while a job runs on it. If that job was between
    statements at that moment (in Python code, or just ending after its COMMIT), SQLite keeps the interrupt
    pending until a statement starts; the checkpoint that closing the last connection runs honours it and
    gives up silently, leaving the WAL beside node.db (a swap would then delete that WAL by hand). SQLite
    clears a pending interrupt whenever a statement starts with none running, so one trivial statement does,
    with the progress handler removed first (it stops every statement while shutting down)."""
    if not conn.is_interrupted:
        return
    conn.set_progress_handler(None)
    with contextlib.suppress(apsw.Error):
        conn.execute("SELECT 1").fetchall()


def _close_conn(slot: _Slot) -> None:
    if slot.conn is not None:
        slot.conn.close()
        slot.conn = None


class _RowCounter:
    """Reads a cursor's rows within the row and byte limits (bytes counted as rqlite's JSON would hold them:
    base64 for BLOBs), keeping the rows of the first statement that has columns."""

    __slots__ = ("has_blobs", "job", "keep", "max_rows", "rows", "seen")

    def __init__(self, seen: dict[str, Any], max_rows: int, job: _Job, *, keep: bool) -> None:
        self.seen = seen
        self.max_rows = max_rows
        self.job = job
        self.keep = keep
        self.rows: list[tuple[Any, ...]] = []
        self.has_blobs = False

    def consume(self, cursor: apsw.Cursor) -> None:
        seen, job = self.seen, self.job
        count = 0
        for row in cursor:
            if seen["index"] != seen["rows_at"]:
                continue  # rows of a later statement in the same string: the first with columns answers
            count += 1
            if count > self.max_rows:
                raise _ResultTooLarge(f"result too large: more than {self.max_rows} rows")
            for value in row:
                if isinstance(value, bytes):
                    job.bytes_left -= (len(value) + 2) // 3 * 4 + 2
                    self.has_blobs = True
                elif isinstance(value, str):
                    job.bytes_left -= len(value) + 2
                else:
                    job.bytes_left -= 8
            if job.bytes_left < 0:
                raise _ResultTooLarge("result too large: the results of this request exceed the byte limit")
            if self.keep:
                self.rows.append(row)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, apsw.FullError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    )


def check_sqlite_file(path: Path) -> None:
    """Blocking: raise 400 unless ``path`` (an upload: this node's own copy) is an SQLite database that
    passes ``PRAGMA quick_check``; then switch it to a rollback journal, so that every later read-only
    open of it or of its copies (each replica checks its copy again before the swap) finds a self-contained
    file and leaves no ``-wal``/``-shm`` beside it. A private connection without the authorizer."""
    try:
        check = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    except apsw.Error as exc:
        raise errors.BadRequest(f"invalid SQLite data: {_message(exc)}") from None
    try:
        verdict = check.execute("PRAGMA quick_check").fetchall()
        check.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        if verdict == [("ok",)]:
            check.execute("PRAGMA journal_mode=DELETE").fetchall()
    except apsw.Error as exc:
        if is_disk_full(exc):
            raise errors.InsufficientStorage("not enough disk space in DATA_DIR to check the file") from None
        raise errors.BadRequest(f"invalid SQLite data: {_message(exc)}") from None
    finally:
        check.close()
    if verdict != [("ok",)]:
        raise errors.BadRequest("invalid SQLite data: integrity check failed")


@dataclass(frozen=True, slots=True)
class RequestRow:
    """A load's own request ID as the requests table keeps it (see ``statemachine``: at-most-once)."""

    client: str
    request_id: str
    digest: bytes
    results: bytes

    def params(self, index: int) -> tuple:
        return (self.client, self.request_id, index, 1, self.digest, self.results)


_INSERT_REQUEST = (
    f"INSERT OR REPLACE INTO {statemachine.REQUESTS_TABLE}(client, request_id, idx, seq, digest, results) "
    "VALUES(?, ?, ?, ?, ?, ?)"
)


def _stamp_file(path: Path, index: int, request: RequestRow | None = None) -> None:
    """Record ``index`` as applied in the SQLite file at ``path`` and forget its request IDs (they name
    another database's writes), keeping only ``request`` (the load's own). A private connection (no
    authorizer); its COMMIT is fully synced."""
    conn = apsw.Connection(str(path))
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statemachine.SCHEMA:
                conn.execute(sql)
            conn.execute(f"DELETE FROM {statemachine.REQUESTS_TABLE}")
            if request is not None:
                conn.execute(_INSERT_REQUEST, request.params(index))
            conn.execute(
                f"INSERT OR REPLACE INTO {statemachine.STATE_TABLE}(key, value) VALUES(?, ?)",
                (statemachine.APPLIED_KEY, index),
            )
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except apsw.Error as exc:
        if is_disk_full(exc):
            raise errors.InsufficientStorage("not enough disk space in DATA_DIR to load the file") from None
        raise errors.BadRequest(f"invalid SQLite data: {_message(exc)}") from None
    finally:
        conn.close()


class SnapshotIndexMismatch(ValueError):
    """A snapshot file's applied index is not the one it was installed as: nothing was changed."""


class _ConnOps:
    """A private connection as :func:`statemachine.applied_index` reads it."""

    __slots__ = ("conn",)

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()


def file_applied_index(path: Path) -> int:
    """The applied index stored in the SQLite file at ``path`` (0 if it has none); a private read-only
    connection, blocking."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return statemachine.applied_index(_ConnOps(conn))
    finally:
        conn.close()


class _SnapshotCopier:
    """``VACUUM INTO`` on a connection of its own (worker thread), interruptible from the loop."""

    def __init__(self, db: Database, target: Path) -> None:
        self.db = db
        self.target = target
        self.conn: apsw.Connection | None = None
        self.cancelled = False

    def interrupt(self) -> None:
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(apsw.Error):
                conn.interrupt()  # thread-safe by SQLite's contract

    def run(self) -> int:
        if self.target.exists():
            raise FileExistsError(f"snapshot copy target {self.target} exists already")
        made = False
        try:
            conn = apsw.Connection(str(self.db.path), flags=apsw.SQLITE_OPEN_READONLY)
            # Never checkpoint from here (the writer owns the WAL), and stop at cancel or shutdown.
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            conn.set_progress_handler(lambda: self.cancelled or self.db._closing, PROGRESS_STEPS)
            conn.set_busy_timeout(5000)
            self.conn = conn
            try:
                if self.cancelled:
                    raise apsw.InterruptError("cancelled")
                made = True
                conn.execute("VACUUM INTO ?", (str(self.target),)).fetchall()
            finally:
                self.conn = None
                conn.close()
            copy = apsw.Connection(str(self.target))
            try:
                # VACUUM INTO writes a rollback-journal file already; say so explicitly (no -wal to carry).
                copy.execute("PRAGMA journal_mode=DELETE").fetchall()
                index = statemachine.applied_index(_ConnOps(copy))
            finally:
                copy.close()
            with open(self.target, "rb") as f:
                os.fsync(f.fileno())
            return index
        except BaseException as exc:
            if made:
                self.target.unlink(missing_ok=True)
                for suffix in ("-journal", "-wal", "-shm"):
                    Path(str(self.target) + suffix).unlink(missing_ok=True)
            if is_disk_full(exc):
                raise errors.InsufficientStorage(
                    "not enough disk space in DATA_DIR for a snapshot copy of the database"
                ) from None
            if isinstance(exc, apsw.InterruptError):
                raise errors.Unavailable(
                    "the snapshot copy was interrupted (cancelled or shutting down)"
                ) from None
            raise


def _copy_snapshot_file(source: Path, target: Path, index: int) -> None:
    """Copy ``source`` to ``target`` (fsynced) and check the copy holds ``index``; on any failure the copy is
    removed. Blocking."""
    created = False
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            created = True
            # Each round copies one piece or ends at end of file: bounded by the file size.
            while chunk := src.read(FILE_CHUNK_BYTES):
                dst.write(chunk)
            dst.flush()
            crash_point("install-copied")
            os.fsync(dst.fileno())
        crash_point("install-synced")
        try:
            held = file_applied_index(target)
        except apsw.Error as exc:
            raise SnapshotIndexMismatch(
                f"snapshot {source} is not a readable SQLite file: {_message(exc)}"
            ) from None
        if held != index:
            raise SnapshotIndexMismatch(
                f"snapshot {source} holds applied index {held}, not {index}: not installed"
            )
    except BaseException as exc:
        if created:
            target.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise errors.InsufficientStorage(
                "not enough disk space in DATA_DIR to install the snapshot"
            ) from None
        raise


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _message(exc: BaseException) -> str:
    text = str(exc)
    # apsw prefixes some messages with the exception class ("SQLError: ..."); rqlite clients see SQLite's.
    name = type(exc).__name__
    if text.startswith(name + ": "):
        text = text[len(name) + 2 :]
    return text or name


def _now_text(time_ns: int) -> str:
    return WriteCommand((), False, time_ns, 0).now_text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
