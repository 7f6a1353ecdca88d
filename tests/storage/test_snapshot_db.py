"""Database snapshots: a consistent copy taken while writes go on, and an install that swaps it in whole.

Every write applied here is a real log entry (``Database.apply``) inserting its own index, so a copy is
consistent exactly when its applied index equals the largest index in its rows and the number of rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading

import apsw
import pytest

from node import errors
from node.core import sqlreq as q
from node.storage import sqlite as sqlite_module
from node.storage import statemachine as sm
from node.storage.durable import free_bytes
from node.storage.sqlite import Database, Limits, SnapshotIndexMismatch, file_applied_index
from tests.support.dbapi import query
from tests.support.tmpfs import small_tmpfs

VERSION = apsw.sqlite_lib_version()
T0 = 1_700_000_000_000_000_000


def write(sql: str, *, client: str = "", request_id: str | None = None) -> sm.Command:
    request = q.DbRequest((q.Statement(sql),), q.Flags())
    return sm.Command(
        q.stamp_write(request, time_ns=T0, seed=3),
        client=client,
        request_id=request_id,
        sqlite_version=VERSION,
    )


def read(sql: str) -> q.DbRequest:
    return q.DbRequest((q.Statement(sql),), q.Flags())


async def opened(path, readers: int = 2) -> Database:
    database = Database(path, limits=Limits(readers=readers), queue_size=256)
    await database.open()
    return database


def file_rows(path, sql: str) -> list[tuple]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def assert_consistent_copy(path) -> int:
    """The copy holds exactly the entries up to its applied index; returns that index."""
    index = file_applied_index(path)
    count, top = file_rows(path, "SELECT count(*), coalesce(max(idx), 0) FROM t")[0]
    assert count == top == index, (count, top, index)
    assert file_rows(path, "PRAGMA integrity_check") == [("ok",)]
    header = path.read_bytes()[:20]
    assert header[18:20] == b"\x01\x01", "a snapshot must be a rollback-journal file, not WAL"
    assert not path.with_name(path.name + "-wal").exists()
    return index


async def test_copy_for_snapshot_while_writes_go_on_is_consistent_and_does_not_block_them(tmp_path):
    database = await opened(tmp_path / "data")
    try:
        await database.apply(1, [write("CREATE TABLE t (idx INTEGER PRIMARY KEY, pad BLOB)")])
        # Padding makes a copy take long enough that writes visibly complete while it runs.
        await database.apply(2, [write("CREATE TABLE pad (b BLOB)")])
        for i in range(3, 40):
            await database.apply(i, [write("INSERT INTO pad VALUES (randomblob(1000000))")])
        await database.apply(40, [write("DELETE FROM t")])
        base = 40
        # From here every entry i inserts i into t (rows count from base + 1).
        stop = asyncio.Event()
        applied: list[int] = []

        async def writer() -> None:
            index = base
            for _ in range(100_000):  # bounded; ends when the copies are done
                if stop.is_set():
                    return
                index += 1
                await database.apply(
                    index, [write(f"INSERT INTO t VALUES ({index - base}, randomblob(100))")]
                )
                applied.append(index)

        task = asyncio.create_task(writer())
        try:
            during: list[int] = []
            indices = []
            for n in range(3):
                target = tmp_path / f"copy{n}.db"
                before = len(applied)
                index = await database.copy_for_snapshot(target)
                during.append(len(applied) - before)
                indices.append(index)
                count, top = file_rows(target, "SELECT count(*), coalesce(max(idx), 0) FROM t")[0]
                assert count == top == index - base, (count, top, index)
                assert file_applied_index(target) == index
                assert file_rows(target, "PRAGMA integrity_check") == [("ok",)]
                assert target.read_bytes()[18:20] == b"\x01\x01"
                assert not target.with_name(target.name + "-wal").exists()
        finally:
            stop.set()
            await task
        assert indices == sorted(indices)
        print("writes completed during each copy:", during)
        assert sum(during) > 0, "no write completed while a copy ran: the copy blocked the writer"
    finally:
        await database.close()


async def test_copy_for_snapshot_of_a_database_without_the_node_tables_is_index_zero(tmp_path):
    database = await opened(tmp_path / "data")
    try:
        target = tmp_path / "copy.db"
        assert await database.copy_for_snapshot(target) == 0
        with pytest.raises(FileExistsError):
            await database.copy_for_snapshot(target)
        assert target.exists()  # an existing file is never removed by a refused copy
    finally:
        await database.close()


async def test_copy_for_snapshot_on_a_full_disk_removes_the_partial_copy(tmp_path):
    with small_tmpfs(tmp_path, "6m") as disk:
        database = await opened(disk / "data")
        try:
            await database.apply(1, [write("CREATE TABLE t (b BLOB)")])
            for i in range(2, 5):
                await database.apply(i, [write("INSERT INTO t VALUES (randomblob(1000000))")])
            # Leave 1 MiB free: less than the 3 MB copy needs.
            (disk / "ballast").write_bytes(bytes(free_bytes(disk) - (1 << 20)))
            target = disk / "data" / "snapshot-copy"
            with pytest.raises(errors.InsufficientStorage):
                await database.copy_for_snapshot(target)
            assert not target.exists()
            assert [p.name for p in (disk / "data").iterdir() if "copy" in p.name] == []
            # The database still serves.
            result = await query(database, read("SELECT count(*) FROM t"))
            assert result[0]["values"] == [[3]]
        finally:
            await database.close()


async def make_snapshot(path, marker: str, rows: int, *, index: int, request_ids: list[str]) -> None:
    """A snapshot file of a database at ``index`` holding ``rows`` rows of ``marker`` and the given request IDs."""
    source = await opened(path.parent / f"src-{marker}")
    try:
        await source.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
        for k, rid in enumerate(request_ids):
            await source.apply(
                2 + k, [write(f"INSERT INTO m VALUES ('{marker}-req', {k})", client="c", request_id=rid)]
            )
        sql = f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {rows}) "
        sql += f"INSERT INTO m SELECT '{marker}', n FROM s"
        await source.apply(index, [write(sql)])
        assert await source.copy_for_snapshot(path) == index
    finally:
        await source.close()


async def test_install_snapshot_swaps_the_database_and_keeps_the_snapshot_request_ids(tmp_path):
    snapshot = tmp_path / "snap.db"
    await make_snapshot(snapshot, "new", 500, index=50, request_ids=["r1", "r2"])
    digest = hashlib.sha256(snapshot.read_bytes()).hexdigest()
    database = await opened(tmp_path / "data", readers=3)
    try:
        await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
        await database.apply(2, [write("INSERT INTO m VALUES ('old', 1)", client="c", request_id="old-req")])
        assert (await query(database, read("SELECT marker FROM m")))[0]["values"] == [["old"]]

        await database.install_snapshot(snapshot, 50)

        assert await database.applied_index() == 50
        result = await query(database, read("SELECT marker, count(*) FROM m GROUP BY marker ORDER BY marker"))
        assert result[0]["values"] == [["new", 500], ["new-req", 2]]
        # The snapshot is not consumed: still there, byte for byte.
        assert hashlib.sha256(snapshot.read_bytes()).hexdigest() == digest
        # Writes go on at the next index; a retried request ID of the snapshot is answered as a duplicate.
        again = await database.apply(
            51, [write("INSERT INTO m VALUES ('x', 0)", client="c", request_id="r1")]
        )
        assert again is not None and again[0].duplicate and again[0].index == 2
        assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".tmp-")]
    finally:
        await database.close()
    # Request IDs as the snapshot had them, not stamped away like a /db/load's.
    ids = file_rows(tmp_path / "data" / "node.db", f"SELECT request_id FROM {sm.REQUESTS_TABLE} ORDER BY 1")
    assert ids == [("r1",), ("r2",)]


async def test_install_snapshot_with_another_index_changes_nothing(tmp_path):
    snapshot = tmp_path / "snap.db"
    await make_snapshot(snapshot, "new", 10, index=20, request_ids=[])
    database = await opened(tmp_path / "data")
    try:
        await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
        await database.apply(2, [write("INSERT INTO m VALUES ('old', 1)")])
        with pytest.raises(SnapshotIndexMismatch, match="20.*21|21.*20"):
            await database.install_snapshot(snapshot, 21)
        assert await database.applied_index() == 2
        assert (await query(database, read("SELECT marker FROM m")))[0]["values"] == [["old"]]
        assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".tmp-")]
        assert snapshot.exists()
    finally:
        await database.close()


async def test_readers_during_an_install_see_the_old_or_the_new_database_whole(tmp_path):
    snapshots = []
    for k in range(3):
        path = tmp_path / f"snap{k}.db"
        await make_snapshot(path, f"file-{k}", 1000 + k, index=100 + k, request_ids=[])
        snapshots.append(path)
    database = await opened(tmp_path / "data", readers=3)
    try:
        await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])

        async def reader(n: int) -> list:
            out = []
            for _ in range(15):
                result = await query(
                    database, read("SELECT marker, count(*) FROM m GROUP BY marker"), client=str(n)
                )
                out.append(result[0])
            return out

        async def installs() -> None:
            for k, path in enumerate(snapshots):
                await database.install_snapshot(path, 100 + k)

        results = await asyncio.gather(installs(), *(reader(n) for n in range(3)))
        for batch in results[1:]:
            for result in batch:
                values = result.get("values", [])
                assert (
                    "error" in result
                    or values == []
                    or (len(values) == 1 and values[0][1] == 1000 + int(values[0][0][5:]))
                ), result
        final = await query(database, read("SELECT marker, count(*) FROM m GROUP BY marker"))
        assert final[0]["values"] == [["file-2", 1002]]
        assert await database.applied_index() == 102
    finally:
        await database.close()


async def test_a_cancelled_copy_removes_its_file_and_frees_swaps(tmp_path):
    database = await opened(tmp_path / "data")
    try:
        await database.apply(1, [write("CREATE TABLE pad (b BLOB)")])
        for i in range(2, 60):
            await database.apply(i, [write("INSERT INTO pad VALUES (randomblob(1000000))")])
        target = tmp_path / "copy.db"
        task = asyncio.create_task(database.copy_for_snapshot(target))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Bounded wait (time and count) for the copy to have started writing.
        for _ in range(30_000):
            if target.exists() or task.done() or loop.time() > deadline:
                break
            await asyncio.sleep(0.001)
        assert target.exists() and not task.done(), "the copy did not start, or finished before the cancel"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not target.exists()
        # The swap lock is free again: an install or another copy goes ahead.
        assert await database.copy_for_snapshot(tmp_path / "again.db") == 59
    finally:
        await database.close()


async def test_install_snapshot_on_a_full_disk_changes_nothing(tmp_path):
    snapshot = tmp_path / "snap.db"
    await make_snapshot(snapshot, "new", 200_000, index=30, request_ids=[])
    with small_tmpfs(tmp_path, "16m") as disk:
        database = await opened(disk / "data")
        try:
            await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
            await database.apply(2, [write("INSERT INTO m VALUES ('old', 1)")])
            kept = disk / "snap.db"
            kept.write_bytes(snapshot.read_bytes())
            (disk / "ballast").write_bytes(bytes(free_bytes(disk) - kept.stat().st_size // 2))
            with pytest.raises(errors.InsufficientStorage):
                await database.install_snapshot(kept, 30)
            assert await database.applied_index() == 2
            assert (await query(database, read("SELECT marker FROM m")))[0]["values"] == [["old"]]
            assert not [p for p in (disk / "data").iterdir() if p.name.startswith(".tmp-")]
        finally:
            await database.close()


# --- a stop during a swap's preparation: 503, nothing swapped (not an assertion error) -----------------------


async def test_a_database_closed_while_an_install_copies_its_file_answers_503_and_swaps_nothing(
    tmp_path, monkeypatch
):
    """Regression: install_snapshot checked the database before copying the snapshot file, not after; a stop
    that closed the database during the copy met an assertion in the swap instead of the shutdown's 503."""
    snapshot = tmp_path / "snap.db"
    await make_snapshot(snapshot, "new", 10, index=20, request_ids=[])
    copying, release = threading.Event(), threading.Event()
    real_copy = sqlite_module._copy_snapshot_file

    def gated_copy(source, target, index):
        copying.set()
        assert release.wait(30), "the test never released the copy"
        real_copy(source, target, index)

    monkeypatch.setattr(sqlite_module, "_copy_snapshot_file", gated_copy)
    database = await opened(tmp_path / "data")
    await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
    await database.apply(2, [write("INSERT INTO m VALUES ('old', 1)")])
    install = asyncio.create_task(database.install_snapshot(snapshot, 20))
    try:
        # The copy runs on a worker thread: wait for it there, bounded (a threading.Event, not the loop's).
        assert await asyncio.to_thread(copying.wait, 30), "the install never started its copy"
        async with asyncio.timeout(30):
            await database.close()
    finally:
        release.set()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        async with asyncio.timeout(30):
            await install
    assert file_rows(tmp_path / "data" / "node.db", "SELECT marker FROM m") == [("old",)]
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("kind", ["install", "load"])
async def test_a_swap_waiting_for_another_while_the_database_closes_answers_503(tmp_path, kind):
    """The class: whatever a swap waited for (its own copy, another swap or snapshot copy holding the lock),
    it checks the database again once it may swap."""
    snapshot = tmp_path / "snap.db"
    await make_snapshot(snapshot, "new", 10, index=20, request_ids=[])
    database = await opened(tmp_path / "data")
    await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
    await database.apply(2, [write("INSERT INTO m VALUES ('old', 1)")])
    upload = tmp_path / "upload.db"
    upload.write_bytes(snapshot.read_bytes())
    await database._swap_lock.acquire()  # another swap (or a snapshot copy) is running
    try:
        swap = asyncio.create_task(
            database.install_snapshot(snapshot, 20)
            if kind == "install"
            else database.load_sqlite_file(upload, index=3)
        )
        for _ in range(200):  # until the swap waits for the lock (bounded)
            if database._swap_lock._waiters:
                break
            await asyncio.sleep(0.005)
        assert database._swap_lock._waiters, "the swap never reached the lock"
        closing = asyncio.create_task(database.close())
        for _ in range(200):  # until close has begun the shutdown and waits for the lock too
            if len(database._swap_lock._waiters) >= 2:
                break
            await asyncio.sleep(0.005)
    finally:
        database._swap_lock.release()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        async with asyncio.timeout(30):
            await swap
    async with asyncio.timeout(30):
        await closing
    assert file_rows(tmp_path / "data" / "node.db", "SELECT marker FROM m") == [("old",)]
