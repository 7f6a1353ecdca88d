"""The log as the durable record of a single node's writes (node.service.LogBackedDataService).

Every write is appended and fsynced in DATA_DIR/log before it is applied and answered; at start the entries
past SQLite's applied index are replayed before the database serves. These tests drive the service in
process over a real Database and a real log: SQLite losing its last transactions, a log written under another
SQLite, an unknown entry format, a damaged log, a database from the release before the log, loads, the disk
reserve, and clients that go away.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import Statement
from node.service import LocalDataService, LogBackedDataService, WriteRequest
from node.storage import command_codec as codec
from node.storage import log as logmod
from node.storage.log import LOG_DIR_NAME, DurableLog, LogEntry
from node.storage.sqlite import ApplyFailed, Database, Limits, State
from node.storage.statemachine import SYNCHRONOUS
from tests.support.dbapi import QuietLog

CREATE = WriteRequest((Statement("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"),))


def _insert(v: str, request_id: str | None = None) -> WriteRequest:
    return WriteRequest((Statement("INSERT INTO t(v) VALUES(?)", (v,)),), request_id=request_id)


class Events:
    """Collects the service's log lines (event name and fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.seen.append((level, event, fields))

    def named(self, name: str) -> list[dict]:
        return [f for _, e, f in self.seen if e == name]


async def _service(data_dir: Path, *, reserve: int = 0, sqlite_version: str | None = None, emit=None):
    database = Database(data_dir, limits=Limits(), queue_size=64, log=QuietLog())
    await database.prepare()
    service = LogBackedDataService(
        database, log_reserve_bytes=reserve, emit=emit or Events(), sqlite_version=sqlite_version
    )
    await service.start()
    return service


def _rows(data_dir: Path) -> list[str]:
    conn = apsw.Connection(str(data_dir / "node.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY id")]
    finally:
        conn.close()


def _log_entries(data_dir: Path) -> list[LogEntry]:
    log = DurableLog.open(data_dir / LOG_DIR_NAME)
    try:
        return log.read(log.first_index, 1 << 30) if log.last()[1] >= log.first_index else []
    finally:
        log.close()


def _copy_db(data_dir: Path, target: Path) -> None:
    """A consistent copy of the (closed) database, its WAL included (SQLite's backup API)."""
    source = apsw.Connection(str(data_dir / "node.db"))
    dest = apsw.Connection(str(target))
    try:
        with dest.backup("main", source, "main") as copy:
            copy.step(-1)
        dest.execute("PRAGMA journal_mode=DELETE")
    finally:
        dest.close()
        source.close()


def _lose_sqlite_to(data_dir: Path, older: Path) -> None:
    """What a power loss with synchronous=NORMAL may leave: an older database, the log intact."""
    for suffix in ("-wal", "-shm"):
        Path(str(data_dir / "node.db") + suffix).unlink(missing_ok=True)
    shutil.copyfile(older, data_dir / "node.db")


async def test_sqlite_applies_at_normal_because_the_log_is_durable(tmp_path):
    assert SYNCHRONOUS == "NORMAL"
    service = await _service(tmp_path)
    try:
        assert service.database.is_open
        await service.submit(CREATE, "c")
        outcome = await service.submit(_insert("a"), "c")
        assert outcome.index == 2 and outcome.results[0].ok
    finally:
        await service.close()
    entries = _log_entries(tmp_path)
    assert [e.index for e in entries] == [1, 2]
    assert all(e.kind == codec.KIND_COMMANDS for e in entries)
    (command,) = codec.decode_commands(entries[1].payload)
    assert command.write.statements[0].params == ("a",) and command.client == "c"


async def test_concurrent_writes_share_log_batches_and_apply_in_log_order(tmp_path):
    service = await _service(tmp_path)
    try:
        await service.submit(CREATE, "c")
        applies: list[list[int]] = []
        apply_entries = service.database.apply_entries

        async def counting(entries, **kw):
            applies.append([e.index for e in entries])
            return await apply_entries(entries, **kw)

        service.database.apply_entries = counting  # type: ignore[method-assign]
        assert service.log is not None
        before = dict(service.log.stats)
        outcomes = await asyncio.gather(*(service.submit(_insert(f"v{i}"), "c") for i in range(64)))
        assert sorted(o.index for o in outcomes) == list(range(2, 66))
        batches = service.log.stats["batches"] - before["batches"]
        assert batches < 64  # some appends shared one write and one fsync
        # One group per apply, consecutive entries in log order, no more applies than log batches.
        assert [i for group in applies for i in group] == list(range(2, 66))
        assert len(applies) <= batches
    finally:
        await service.close()
    by_index = sorted(outcomes, key=lambda o: o.index)
    # Rows were inserted in log order: the rowid order is the index order.
    assert [o.results[0].last_insert_id for o in by_index] == list(range(1, 65))


async def test_a_write_whose_client_went_away_is_still_applied_in_order(tmp_path, monkeypatch):
    service = await _service(tmp_path)
    gate_entered, release = threading.Event(), threading.Event()
    real_fdatasync = logmod.os.fdatasync

    def gated(fd: int) -> None:  # the orphan's log fsync waits (bounded) until its client is gone
        gate_entered.set()
        assert release.wait(30), "the gate was never released"
        real_fdatasync(fd)

    try:
        await service.submit(CREATE, "c")
        monkeypatch.setattr(logmod.os, "fdatasync", gated)
        task = asyncio.create_task(service.submit(_insert("orphan"), "c"))
        for _ in range(10_000):  # until the entry is in the log's fsync: numbered, accepted, not done
            if gate_entered.is_set():
                break
            await asyncio.sleep(0.001)
        assert gate_entered.is_set() and not task.done()
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(logmod.os, "fdatasync", real_fdatasync)
        later = await service.submit(_insert("later"), "c")
        assert later.index == 3
    finally:
        release.set()
        await service.close()
    assert _rows(tmp_path) == ["orphan", "later"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.text(max_size=8), min_size=1, max_size=25), data=st.data())
def test_replay_after_sqlite_lost_its_last_transactions_restores_everything_once(
    tmp_path_factory, values, data
):
    """Whatever SQLite loses after the log's fsync (here: back to any earlier copy), the restart replays it:
    every acknowledged write exactly once, the request IDs included."""
    data_dir = tmp_path_factory.mktemp("replay")
    cut = data.draw(st.integers(0, len(values)), label="writes before the older copy")

    async def scenario() -> None:
        service = await _service(data_dir)
        await service.submit(CREATE, "c")
        for i, v in enumerate(values[:cut]):
            await service.submit(_insert(v, f"id-{i}"), "c")
        await service.close()
        _copy_db(data_dir, data_dir / "older.db")
        service = await _service(data_dir)
        for i, v in enumerate(values[cut:], cut):
            await service.submit(_insert(v, f"id-{i}"), "c")
        await service.close()
        _lose_sqlite_to(data_dir, data_dir / "older.db")

        service = await _service(data_dir)
        try:
            assert service.database.is_open, service.database.state_detail
            assert service.replayed == len(values) - cut
            # The request IDs came back with the replay: a retry is not applied again.
            again = await service.submit(_insert(values[-1], f"id-{len(values) - 1}"), "c")
            assert again.duplicate and again.index == len(values) + 1
        finally:
            await service.close()

    asyncio.run(scenario())
    assert _rows(data_dir) == values


async def test_entries_written_under_another_sqlite_are_not_replayed(tmp_path):
    service = await _service(tmp_path, sqlite_version="3.0.1")
    await service.submit(CREATE, "c")
    await service.close()
    _copy_db(tmp_path, tmp_path / "older.db")
    service = await _service(tmp_path, sqlite_version="3.0.1")
    await service.submit(_insert("x"), "c")
    await service.close()
    _lose_sqlite_to(tmp_path, tmp_path / "older.db")

    service = await _service(tmp_path)  # the running SQLite
    try:
        assert service.database.state == State.FAILED
        detail = service.database.state_detail
        assert "SQLite 3.0.1" in detail and apsw.sqlite_lib_version() in detail
        with pytest.raises(errors.Unavailable):
            await service.submit(_insert("y"), "c")
    finally:
        await service.close()
    # Nothing was applied under the other version; with the version that wrote it, replay proceeds.
    service = await _service(tmp_path, sqlite_version="3.0.1")
    try:
        assert service.database.is_open and service.replayed == 1
    finally:
        await service.close()
    assert _rows(tmp_path) == ["x"]


async def test_an_entry_of_an_unknown_format_version_is_refused(tmp_path):
    service = await _service(tmp_path)
    await service.submit(CREATE, "c")
    await service.close()
    log = DurableLog.open(tmp_path / LOG_DIR_NAME)
    log.append([LogEntry(0, 2, codec.KIND_COMMANDS, b"\x09" + codec.encode_commands([])[1:])])
    log.sync()
    log.close()
    service = await _service(tmp_path)
    try:
        assert service.database.state == State.FAILED
        assert "format version 9 is unknown" in service.database.state_detail
    finally:
        await service.close()


async def test_a_corrupt_log_is_quarantined_and_a_restart_starts_a_new_log(tmp_path):
    events = Events()
    service = await _service(tmp_path)
    await service.submit(CREATE, "c")
    for i in range(5):
        await service.submit(_insert(f"v{i}"), "c")
    await service.close()
    (segment,) = sorted((tmp_path / LOG_DIR_NAME).iterdir())
    data = bytearray(segment.read_bytes())
    data[64 + 30] ^= 0xFF  # inside the first record; valid records follow: damage, not a torn tail
    segment.write_bytes(bytes(data))

    service = await _service(tmp_path, emit=events)
    try:
        assert service.database.state == State.CORRUPT
        assert "moved to" in service.database.state_detail
        (event,) = events.named("log_corrupt")
        quarantined = Path(event["path"])
        assert quarantined.parent.parent == tmp_path / "quarantine"
        assert (quarantined / segment.name).read_bytes() == bytes(data)
        assert "restart" in event["advice"]
        with pytest.raises(errors.DatabaseCorrupt):
            await service.submit(_insert("x"), "c")
    finally:
        await service.close()
    assert not (tmp_path / LOG_DIR_NAME).exists()

    service = await _service(tmp_path)  # the operator restarts: a new log after the applied index
    try:
        assert service.database.is_open
        assert (await service.submit(_insert("after"), "c")).index == 7
    finally:
        await service.close()
    assert _rows(tmp_path) == [f"v{i}" for i in range(5)] + ["after"]


async def test_a_database_from_the_release_before_the_log_keeps_its_data(tmp_path):
    database = Database(tmp_path, limits=Limits(), queue_size=8)
    await database.open()
    old = LocalDataService(database)
    await old.submit(CREATE, "c")
    for i in range(3):
        await old.submit(_insert(f"old{i}", f"r{i}"), "c")
    await database.close()
    assert not (tmp_path / LOG_DIR_NAME).exists()

    service = await _service(tmp_path)
    try:
        assert service.database.is_open and service.replayed == 0
        assert service.log is not None and service.log.first_index == 5
        new = await service.submit(_insert("new"), "c")
        assert new.index == 5
        retry = await service.submit(_insert("old2", "r2"), "c")  # request IDs of the old release still hold
        assert retry.duplicate and retry.index == 4
    finally:
        await service.close()
    assert _rows(tmp_path) == ["old0", "old1", "old2", "new"]
    assert [e.index for e in _log_entries(tmp_path)] == [5, 6]  # a duplicate is logged, applied once


async def test_loads_are_markers_that_replay_skips(tmp_path):
    service = await _service(tmp_path)
    try:
        await service.submit(CREATE, "c")
        dump = tmp_path / "dump.sql"
        dump.write_text("CREATE TABLE d (x);\nINSERT INTO d VALUES (1);\nINSERT INTO d VALUES (2);\n")
        loaded = await service.load_dump_file(dump)
        assert loaded.index == 2 and loaded.statements == 3
        after = await service.submit(_insert("after-load"), "c")
        assert after.index == 3
    finally:
        await service.close()
    kinds = [(e.index, e.kind) for e in _log_entries(tmp_path)]
    assert kinds == [(1, codec.KIND_COMMANDS), (2, codec.KIND_LOAD_MARKER), (3, codec.KIND_COMMANDS)]
    service = await _service(tmp_path)
    try:
        assert service.database.is_open and service.replayed == 0
    finally:
        await service.close()


async def test_a_marker_whose_load_never_committed_is_skipped(tmp_path):
    """A crash between the marker's fsync and the load's COMMIT: the load was never acknowledged."""
    service = await _service(tmp_path)
    await service.submit(CREATE, "c")
    await service.close()
    log = DurableLog.open(tmp_path / LOG_DIR_NAME)
    log.append([
        LogEntry(0, 2, codec.KIND_LOAD_MARKER, codec.encode_load_marker("dump")),
        LogEntry(0, 3, codec.KIND_COMMANDS, codec.encode_commands([])),
    ])  # fmt: skip
    log.sync()
    log.close()
    service = await _service(tmp_path)
    try:
        assert service.database.is_open, service.database.state_detail
        assert service.replayed == 2
        assert (await service.submit(_insert("x"), "c")).index == 4
    finally:
        await service.close()


async def test_a_failed_load_answers_its_error_and_writes_go_on(tmp_path):
    service = await _service(tmp_path)
    try:
        await service.submit(CREATE, "c")
        bad = tmp_path / "bad.sql"
        bad.write_text("INSERT INTO nowhere VALUES (1);\n")
        with pytest.raises(errors.BadRequest):
            await service.load_dump_file(bad)
        assert (await service.submit(_insert("x"), "c")).index == 3
    finally:
        await service.close()
    assert _rows(tmp_path) == ["x"]


async def test_writes_are_refused_with_507_before_the_disk_fills(tmp_path):
    service = await _service(tmp_path, reserve=1 << 62)
    try:
        with pytest.raises(errors.InsufficientStorage, match="LOG_RESERVE_BYTES"):
            await service.submit(CREATE, "c")
        results = await asyncio.gather(
            *(service.submit(_insert("x"), "c") for _ in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, errors.InsufficientStorage) for r in results), results
        assert service.log is not None and service.log.last[1] == 0
    finally:
        await service.close()


async def test_a_database_ahead_of_its_log_is_refused(tmp_path):
    service = await _service(tmp_path)
    await service.submit(CREATE, "c")
    await service.submit(_insert("x"), "c")
    await service.close()
    shutil.rmtree(tmp_path / LOG_DIR_NAME)
    DurableLog.open(tmp_path / LOG_DIR_NAME).close()  # an empty log from index 1: not this database's
    service = await _service(tmp_path)
    try:
        assert service.database.state == State.FAILED
        assert "do not belong together" in service.database.state_detail
    finally:
        await service.close()


async def test_a_local_apply_failure_is_retried_never_answered(tmp_path):
    """SQLite failing to COMMIT (disk full, I/O error) is not the write's answer: the entry is durable, so
    the pipeline pauses (new writes 503), retries, and the waiting client gets the real result."""
    service = await _service(tmp_path)
    try:
        await service.submit(CREATE, "c")
        failures = 3
        apply_entries = service.database.apply_entries

        async def flaky(entries, **kw):
            nonlocal failures
            if failures:
                failures -= 1
                raise ApplyFailed("applying the log failed: COMMIT failed: database or disk is full")
            return await apply_entries(entries, **kw)

        service.database.apply_entries = flaky  # type: ignore[method-assign]
        waiting = asyncio.create_task(service.submit(_insert("kept"), "c"))
        for _ in range(2000):  # until the pipeline reports the stall
            if service.stalled is not None:
                break
            await asyncio.sleep(0.001)
        assert service.stalled is not None and "COMMIT failed" in service.stalled
        with pytest.raises(errors.Unavailable, match="writes are paused"):
            await service.submit(_insert("refused"), "c")
        outcome = await asyncio.wait_for(waiting, 10)
        assert outcome.results[0].ok and outcome.index == 2
        assert service.stalled is None and failures == 0
    finally:
        await service.close()
    assert _rows(tmp_path) == ["kept"]


async def test_a_database_older_than_the_logs_first_entry_is_refused(tmp_path):
    DurableLog.open(tmp_path / LOG_DIR_NAME, first_index=10).close()  # entries 1..9 are not in this log
    service = await _service(tmp_path)
    try:
        assert service.database.state == State.FAILED
        assert "entries 1..9 are missing" in service.database.state_detail
    finally:
        await service.close()
