"""Crashes for real while a snapshot is taken, received and installed: a child process SIGKILLs itself.

The child runs what a node does (take: copy_for_snapshot + SnapshotStore.add; receive and install:
finish_incoming, install_snapshot, log reset) with the ``durable._crash_point`` hook set to SIGKILL itself at
one named step, the n-th time it is passed. A first run records every step; then one run per step. After
each kill the directory is reopened the way a node starts: the snapshot store opens without problems, the
database is wholly the old one or wholly the new one (checked by content, applied index and request IDs,
and which one is fixed by the step), the log opens as one of the states log.py allows, and running the
operation again to its end gives the new state.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from node.core import sqlreq as q
from node.storage import statemachine as sm
from node.storage.log import DurableLog, LogEntry
from node.storage.snapshots import SnapshotMeta, SnapshotStore, snapshot_stem
from node.storage.sqlite import Database, Limits

VERSION = apsw.sqlite_lib_version()
T0 = 1_700_000_000_000_000_000
OLD_INDEX, NEW_INDEX, NEW_EPOCH = 40, 120, 3
OLD_ROWS, NEW_ROWS = 300, 500
LOG_ENTRIES = 60
CHILD_TIMEOUT_S = 120

CHILD = r"""
import asyncio, os, signal, sys
from pathlib import Path
from node.storage import durable
from node.storage.log import DurableLog
from node.storage.snapshots import SnapshotMeta, SnapshotStore
from node.storage.sqlite import Database, Limits

mode, data_dir, meta_file, target, nth = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
counts = {}

def hook(step):
    counts[step] = counts.get(step, 0) + 1
    print("step", step, counts[step], flush=True)
    if step == target and counts[step] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

def reset_log(index, epoch):
    log = DurableLog.open(data_dir / "log")
    try:
        log.reset(index, epoch)
    finally:
        log.close()

async def main():
    store = SnapshotStore(data_dir)
    await asyncio.to_thread(store.open)
    db = Database(data_dir, limits=Limits(readers=2), queue_size=16)
    await db.open()
    durable._crash_point = hook
    try:
        if mode == "take":
            tmp = store.temp_path()
            index = await db.copy_for_snapshot(tmp)
            await asyncio.to_thread(
                store.add, tmp, cluster="c1", epoch=2, index=index, config=b"{}", sqlite_version=db.sqlite_version
            )
        else:
            meta = SnapshotMeta.decode(meta_file.read_bytes())
            if store.newest() != meta:
                path = await asyncio.to_thread(store.finish_incoming, meta)
            else:
                path = store.path_of(meta)  # received before a crash: install it
            await db.install_snapshot(path, meta.index)
            await asyncio.to_thread(reset_log, meta.index, meta.epoch)
    finally:
        durable._crash_point = None
        await db.close()
    print("done", flush=True)

asyncio.run(main())
"""


def write(sql: str, *, request_id: str | None = None) -> sm.Command:
    request = q.DbRequest((q.Statement(sql),), q.Flags())
    return sm.Command(
        q.stamp_write(request, time_ns=T0, seed=3), client="c", request_id=request_id, sqlite_version=VERSION
    )


async def fill(database: Database, marker: str, rows: int, index: int) -> None:
    await database.apply(1, [write("CREATE TABLE m (marker TEXT, n INTEGER)")])
    await database.apply(2, [write(f"INSERT INTO m VALUES ('{marker}-req', 0)", request_id=f"{marker}-req")])
    sql = f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {rows}) "
    await database.apply(index, [write(sql + f"INSERT INTO m SELECT '{marker}', n FROM s")])


async def build_template(root: Path) -> tuple[Path, Path]:
    """DATA_DIR with the old database, two older snapshots, a multi-segment log and a received (not yet
    finished) transfer of the new snapshot; and the file holding that snapshot's meta."""
    data = root / "data"
    old = Database(data, limits=Limits(readers=1), queue_size=16)
    await old.open()
    await fill(old, "old", OLD_ROWS, OLD_INDEX)
    await old.close()
    source = Database(root / "source", limits=Limits(readers=1), queue_size=16)
    await source.open()
    await fill(source, "new", NEW_ROWS, NEW_INDEX)
    copy = root / "new.db"
    assert await source.copy_for_snapshot(copy) == NEW_INDEX
    await source.close()
    store = SnapshotStore(data)
    store.open()
    for index in (10, 20):
        tmp = store.temp_path()
        tmp.write_bytes(b"an older snapshot %d" % index)
        store.add(tmp, cluster="c1", epoch=1, index=index, config=b"{}", sqlite_version=VERSION)
    body = copy.read_bytes()
    meta = SnapshotMeta(
        "c1", NEW_EPOCH, NEW_INDEX, b"{}", hashlib.sha256(body).hexdigest(), len(body), VERSION
    )
    store.incoming_part(meta).write_bytes(body)
    meta_file = root / "meta.json"
    meta_file.write_bytes(meta.encode())
    log = DurableLog.open(data / "log", segment_bytes=300)
    for i in range(1, LOG_ENTRIES + 1):
        log.append([LogEntry(1 + i // 25, i, 0, b"entry %d" % i * 5)])
    log.sync()
    assert len(log.segments()) >= 4
    log.close()
    return data, meta_file


def run_child(
    mode: str, data: Path, meta_file: Path, target: str = "", nth: int = 0
) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(data), str(meta_file), target, str(nth)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    lines = done.stdout.splitlines()
    if done.returncode not in (0, -9):
        raise AssertionError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.returncode, lines


def steps_of(lines: list[str]) -> list[tuple[str, int]]:
    return [(line.split()[1], int(line.split()[2])) for line in lines if line.startswith("step ")]


async def database_state(data: Path) -> str:
    """'old' or 'new' by content, applied index and request IDs (an AssertionError for anything else)."""
    database = Database(data, limits=Limits(readers=1), queue_size=16)
    await database.open()
    try:
        index = await database.applied_index()
    finally:
        await database.close()
    conn = apsw.Connection(str(data / "node.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        groups = dict(conn.execute("SELECT marker, count(*) FROM m GROUP BY marker").fetchall())
        ids = [r[0] for r in conn.execute(f"SELECT request_id FROM {sm.REQUESTS_TABLE}").fetchall()]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    for name, rows, applied in (("old", OLD_ROWS, OLD_INDEX), ("new", NEW_ROWS, NEW_INDEX)):
        if groups == {name: rows, f"{name}-req": 1}:
            assert index == applied and ids == [f"{name}-req"], (name, index, ids)
            return name
    raise AssertionError(f"a mixed or damaged database: {groups}, applied {index}, request IDs {ids}")


def log_state(data: Path) -> str:
    log = DurableLog.open(data / "log")
    try:
        first, (epoch, last) = log.first_index, log.last()
        if (first, epoch, last) == (NEW_INDEX + 1, NEW_EPOCH, NEW_INDEX):
            return "new"
        if last < first:
            return "empty"
        entries = log.read(first, 1 << 20)
        assert [e.index for e in entries] == list(range(first, LOG_ENTRIES + 1)), (
            "not a suffix of the old log"
        )
        assert all(e.payload == b"entry %d" % e.index * 5 for e in entries)
        return "old" if first == 1 else "suffix"
    finally:
        log.close()


def store_state(data: Path, meta: SnapshotMeta) -> set[int]:
    store = SnapshotStore(data)
    contents = store.open()
    assert contents.problems == ()
    for m in contents.snapshots:
        assert store.path_of(m).stat().st_size == m.size_bytes
        if m.index >= NEW_INDEX - 100:
            assert hashlib.sha256(store.path_of(m).read_bytes()).hexdigest() == m.sha256
    part = store.incoming_part(meta)
    if part.exists():  # kept for the retry: the transfer's bytes are intact
        assert hashlib.sha256(part.read_bytes()).hexdigest() == meta.sha256
    assert not [p for p in store.directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    return {m.index for m in contents.snapshots}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshot-crash")
    data, meta_file = asyncio.run(build_template(root))
    return data, meta_file


def fresh_copy(template, tmp_path: Path, name: str) -> tuple[Path, Path, SnapshotMeta]:
    data, meta_file = template
    target = tmp_path / name
    shutil.copytree(data.parent, target, symlinks=True)
    return target / "data", target / "meta.json", SnapshotMeta.decode(meta_file.read_bytes())


def test_receive_and_install_killed_at_every_step_leave_old_or_new_never_a_mix(template, tmp_path):
    data, meta_file, meta = fresh_copy(template, tmp_path, "record")
    code, lines = run_child("install", data, meta_file)
    assert code == 0 and lines[-1] == "done"
    steps = steps_of(lines)
    names = [s for s, _ in steps]
    for expected in ("snapshot-incoming-verified", "snapshot-incoming-renamed", "snapshot-incoming-meta-written",
                     "snapshot-pruned", "install-copied", "install-synced", "swap-sidecars-removed",
                     "swap-replaced", "swap-dir-synced", "log-reset-temp-written", "log-reset-renamed"):  # fmt: skip
        assert expected in names, names
    assert names.count("log-reset-unlinked") >= 4  # between segment deletions
    assert asyncio.run(database_state(data)) == "new" and log_state(data) == "new"
    replaced_at = names.index("swap-replaced")
    renamed_at = names.index("log-reset-renamed")
    received_at = names.index("snapshot-incoming-meta-written")

    for position, (step, nth) in enumerate(steps):
        data, meta_file, meta = fresh_copy(template, tmp_path, f"kill-{position}")
        code, lines = run_child("install", data, meta_file, step, nth)
        assert code == -9 and steps_of(lines)[-1] == (step, nth), (step, nth, lines[-3:])
        snapshots = store_state(data, meta)
        assert (NEW_INDEX in snapshots) == (position >= received_at), (step, snapshots)
        db = asyncio.run(database_state(data))
        assert db == ("new" if position >= replaced_at else "old"), (step, nth, db)
        log = log_state(data)
        if position < replaced_at:
            assert log == "old", (step, log)
        elif position >= renamed_at:
            assert log == "new", (step, log)
        store = SnapshotStore(data)
        if NEW_INDEX not in snapshots and not store.incoming_part(meta).exists():
            # Killed between renaming the part and writing the meta: the .db without meta was removed at
            # open, so the node fetches the snapshot again (here: the same bytes put back).
            assert step == "snapshot-incoming-renamed", step
            source = SnapshotStore(template[0]).incoming_part(meta)
            shutil.copyfile(source, store.incoming_part(meta))
        # Recovery: doing it again (as the node's start-up would) ends in the new state.
        code, lines = run_child("install", data, meta_file)
        assert code == 0 and lines[-1] == "done", lines[-3:]
        assert asyncio.run(database_state(data)) == "new" and log_state(data) == "new"
        assert store_state(data, meta) >= {NEW_INDEX}


def test_taking_a_snapshot_killed_at_every_step_leaves_no_partial_snapshot(template, tmp_path):
    data, meta_file, meta = fresh_copy(template, tmp_path, "record")
    code, lines = run_child("take", data, meta_file)
    assert code == 0 and lines[-1] == "done"
    steps = steps_of(lines)
    names = [s for s, _ in steps]
    assert names == [
        "snapshot-add-synced",
        "snapshot-add-renamed",
        "snapshot-add-meta-written",
        "snapshot-pruned",
    ]
    for position, (step, nth) in enumerate(steps):
        data, meta_file, meta = fresh_copy(template, tmp_path, f"kill-{position}")
        code, _ = run_child("take", data, meta_file, step, nth)
        assert code == -9
        snapshots = store_state(data, meta)
        taken = OLD_INDEX in snapshots
        assert taken == (position >= names.index("snapshot-add-meta-written")), (step, snapshots)
        if taken:
            store = SnapshotStore(data)
            store.open()
            (new,) = [m for m in store.snapshots() if m.index == OLD_INDEX]
            path = store.path_of(new)
            conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                assert dict(conn.execute("SELECT marker, count(*) FROM m GROUP BY marker").fetchall()) == {
                    "old": OLD_ROWS,
                    "old-req": 1,
                }
            finally:
                conn.close()
            assert new.stem == snapshot_stem(OLD_INDEX, 2)
        assert asyncio.run(database_state(data)) == "old"
        assert log_state(data) == "old"
