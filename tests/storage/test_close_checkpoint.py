"""Closing the database while a write job still runs on the writer thread: the job ends with its own
outcome, writes after the close began are refused, and the WAL is checkpointed into node.db.

Before: begin_shutdown interrupted the writer connection while the job was between statements (here: held
on a gate after its COMMIT; in a node: the replication applier's job finishing 0.1 ms after its answer).
SQLite kept that interrupt pending, and the checkpoint run by closing the last connection honoured it and
gave up silently, so node.db-wal stayed (tests/replication/test_start_quarantine found it, 2 runs in 12).
Ordering is checked with events, never with timing.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.storage import sqlite
from node.storage.sqlite import DB_FILE_NAME, Database, Limits
from tests.support.wait import until

GATE_S = 30.0  # a gated job waits at most this long (a test that forgot to open the gate fails, not hangs)
BOUND_S = 30.0  # every await on the database is bounded by this


class JobFailed(Exception):
    """A job's own failure: its awaiting caller must receive exactly this."""


def _wal(path: Path) -> Path:
    return path / f"{DB_FILE_NAME}-wal"


def _rows_in_file(path: Path) -> list[int]:
    """What node.db alone holds, read through a connection that does not open the WAL (read-only, immutable):
    rows only in an uncheckpointed WAL are not seen."""
    flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    conn = apsw.Connection(f"file:{path / DB_FILE_NAME}?immutable=1", flags=flags)
    try:
        return [row[0] for row in conn.execute("SELECT k FROM t ORDER BY k")]
    finally:
        conn.close()


async def _open(path: Path) -> Database:
    database = Database(path, limits=Limits(readers=1), queue_size=64)
    await database.open()
    await database._write(lambda job: database._ops(job).internal("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
    return database


def _insert_job(database: Database, k: int, *, fail: bool = False, gate: threading.Event | None = None,
                started: threading.Event | None = None):  # fmt: skip
    """A write job (writer thread): insert ``k`` in a transaction; fail before COMMIT (rolled back) if asked;
    after COMMIT wait on ``gate`` (no statement running: the window begin_shutdown's interrupt hit)."""

    def fn(job) -> int:
        if started is not None:
            started.set()
        ops = database._ops(job)
        ops.internal("BEGIN IMMEDIATE")
        try:
            ops.internal("INSERT INTO t(k) VALUES(?)", (k,))
            if fail:
                raise JobFailed(k)
            ops.internal("COMMIT")
        finally:
            if ops.in_transaction():
                ops.internal("ROLLBACK")
        if gate is not None:
            assert gate.wait(GATE_S), "the test never opened the gate"
        return k

    return fn


async def _held_write(database: Database, k: int, gate: threading.Event) -> asyncio.Task:
    """A write job of ``k``, started on the writer thread and held on ``gate`` after its COMMIT."""
    started = threading.Event()
    running = asyncio.create_task(database._write(_insert_job(database, k, gate=gate, started=started)))
    await until(started.is_set, "the write job to start on the writer thread")
    return running


async def _begun_close(database: Database) -> asyncio.Task:
    """close() as a task, once it has begun the shutdown (it may still wait for the writer)."""
    closing = asyncio.create_task(database.close())
    await until(lambda: database._closing, "close() to begin the shutdown")
    return closing


async def test_close_waits_for_the_running_write_and_checkpoints_the_wal(tmp_path):
    database = await _open(tmp_path)
    gate = threading.Event()
    try:
        running = await _held_write(database, 7, gate)
        await until(lambda: database.snapshot()["write_running"] == 1, "the job to hold the writer")
        closing = await _begun_close(database)
        # Refused with the existing error once the close began, and never run.
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await database._write(_insert_job(database, 8))
        await asyncio.sleep(0)  # close() is waiting for the writer: it must not finish while the job runs
        assert not closing.done() and not running.done()
        gate.set()
        assert await asyncio.wait_for(running, BOUND_S) == 7  # the job's own result
        await asyncio.wait_for(closing, BOUND_S)
    finally:
        gate.set()
        await database.close()
    assert not _wal(tmp_path).exists(), "close() left the WAL: it was not checkpointed into node.db"
    assert await asyncio.to_thread(_rows_in_file, tmp_path) == [7]


async def test_every_job_accepted_before_close_has_settled_when_close_returns(tmp_path):
    database = await _open(tmp_path)
    gate = threading.Event()
    try:
        running = await _held_write(database, 1, gate)
        closing = await _begun_close(database)
        gate.set()
        await asyncio.wait_for(closing, BOUND_S)
        # Settled by the time close() returned: its outcome arrived before the close job's (one thread).
        assert running.done()
    finally:
        gate.set()
        await database.close()
    assert running.result() == 1


class _ObservedLock(asyncio.Lock):
    """An asyncio.Lock that says when someone waits for it (close() behind a snapshot copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.contended = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.contended.set()
        return await super().acquire()


def _held_copy(gate: threading.Event, opened: threading.Event):
    """Stands in for _SnapshotCopier.run: a copy holding its read connection (and a read transaction) on
    node.db until ``gate`` opens."""

    def run(copier) -> int:
        conn = apsw.Connection(str(copier.db.path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM t").fetchall()
            opened.set()
            assert gate.wait(GATE_S), "the test never opened the gate"
            conn.execute("COMMIT")
        finally:
            conn.close()
        return 0

    return run


async def _closed_or_waiting(closing: asyncio.Task, lock: _ObservedLock) -> None:
    """Until close() waits behind the copy (the fix) or has finished with the copy's connection open."""
    contended = asyncio.create_task(lock.contended.wait())
    await asyncio.wait({closing, contended}, timeout=BOUND_S, return_when=asyncio.FIRST_COMPLETED)
    contended.cancel()
    assert closing.done() or lock.contended.is_set(), "close() neither finished nor waited"


async def test_close_waits_for_a_snapshot_copy_connection_before_closing_the_writer(tmp_path, monkeypatch):
    """A snapshot copy reads node.db on a connection of its own; while it is open the writer's close is not
    the last one and SQLite keeps the WAL. Before: close() did not wait for it (the node's Replicator may
    still be copying a snapshot when the database closes)."""
    database = await _open(tmp_path)
    await database._write(_insert_job(database, 5))
    gate, opened = threading.Event(), threading.Event()
    monkeypatch.setattr(sqlite._SnapshotCopier, "run", _held_copy(gate, opened))
    lock = database._swap_lock = _ObservedLock()
    copying = asyncio.create_task(database.copy_for_snapshot(tmp_path / "copy.db"))
    try:
        await until(opened.is_set, "the copy to open its connection")
        closing = asyncio.create_task(database.close())
        await _closed_or_waiting(closing, lock)
        gate.set()
        await asyncio.wait_for(closing, BOUND_S)
        assert await asyncio.wait_for(copying, BOUND_S) == 0
    finally:
        gate.set()
        await database.close()
    assert not _wal(tmp_path).exists(), "close() left the WAL: a copy's connection was still open"
    assert await asyncio.to_thread(_rows_in_file, tmp_path) == [5]


JOB_KINDS = ("fast", "slow", "fail")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    kinds=st.lists(st.sampled_from(JOB_KINDS), min_size=1, max_size=10),
    copy=st.booleans(),
    data=st.data(),
)
def test_close_at_any_point_settles_every_accepted_write_and_checkpoints(
    tmp_path_factory, monkeypatch, kinds, copy, data
):
    """N write jobs (fast, slow: held on a gate after COMMIT, failing: rolled back) and a close() at a random
    point: at once, or once job ``m`` has started on the writer thread; slow jobs are released before or
    after it began, more jobs are submitted after it began, and a snapshot copy may hold its own connection
    meanwhile. Every job accepted before the close settles with its result, its own exception or the
    shutdown refusal (queued when the shutdown began: never ran); none hangs; close returns; no WAL is left;
    reopened, the database holds exactly the writes whose jobs returned."""
    close_at = data.draw(st.integers(0, len(kinds)), label="jobs submitted before close")
    started_job = data.draw(
        st.none() | st.integers(0, close_at - 1) if close_at else st.none(),
        label="close once this job started",
    )
    released_late = data.draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
    # The jobs before ``started_job`` must be able to end, or it never starts: their gates open early.
    late = [flag and (started_job is None or k >= started_job) for k, flag in enumerate(released_late)]
    path = tmp_path_factory.mktemp("close")
    copy_gate, copy_opened = threading.Event(), threading.Event()
    monkeypatch.setattr(sqlite._SnapshotCopier, "run", _held_copy(copy_gate, copy_opened))

    async def run() -> set[int]:
        database = await _open(path)
        lock = database._swap_lock = _ObservedLock()
        gates = [threading.Event() for _ in kinds]
        started = [threading.Event() for _ in kinds]
        accepted: list[asyncio.Task] = []
        copying: asyncio.Task | None = None
        try:
            if copy:
                copying = asyncio.create_task(database.copy_for_snapshot(path / "copy.db"))
                await until(copy_opened.is_set, "the copy to open its connection")
            for gate, is_late in zip(gates, late, strict=True):
                if not is_late:
                    gate.set()
            for k, kind in enumerate(kinds[:close_at]):
                fn = _insert_job(database, k, fail=kind == "fail", gate=gates[k] if kind == "slow" else None,
                                 started=started[k])  # fmt: skip
                accepted.append(asyncio.create_task(database._write(fn)))
            if started_job is not None:
                await until(started[started_job].is_set, f"job {started_job} to start")
            closing = await _begun_close(database)
            for k in range(close_at, len(kinds)):
                with pytest.raises(errors.Unavailable, match="shutting down"):
                    await database._write(_insert_job(database, k, fail=kinds[k] == "fail"))
            for gate in gates:
                gate.set()
            if copying is not None:
                await _closed_or_waiting(closing, lock)
                copy_gate.set()
                assert await asyncio.wait_for(copying, BOUND_S) == 0
            await asyncio.wait_for(closing, BOUND_S)
            done, pending = await asyncio.wait(accepted, timeout=BOUND_S) if accepted else (set(), set())
            assert not pending, "an accepted job never settled"
        finally:
            for gate in (*gates, copy_gate):
                gate.set()
            await database.close()
        committed: set[int] = set()
        for k, task in enumerate(accepted):
            exc = task.exception()
            if exc is None:
                assert task.result() == k
                committed.add(k)
            elif isinstance(exc, JobFailed):
                assert kinds[k] == "fail" and exc.args == (k,)
            else:
                # Queued when the shutdown began (refused, never ran), or interrupted and rolled back;
                # never an error about a connection closed under the job.
                assert isinstance(exc, errors.Unavailable) and "shutting down" in str(exc), repr(exc)
        if started_job is not None and kinds[started_job] != "fail":
            assert started_job in committed  # it had started: it ran to its end, its COMMIT before the gate
        assert not _wal(path).exists(), "close() left the WAL: it was not checkpointed into node.db"
        assert set(await asyncio.to_thread(_rows_in_file, path)) == committed
        return committed

    committed = asyncio.run(run())

    async def reopen() -> list[int]:
        database = Database(path, limits=Limits(readers=1), queue_size=64)
        await database.open()
        try:
            return [row[0] for row in await database._write(
                lambda job: database._ops(job).internal("SELECT k FROM t ORDER BY k")
            )]  # fmt: skip
        finally:
            await database.close()

    assert set(asyncio.run(reopen())) == committed
