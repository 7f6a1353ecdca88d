"""Snapshot figures for a database of a given size: copy (VACUUM INTO), store.add (sha256 + fsync), receive
(finish_incoming: verify + fsync), install (copy + swap), and the applies/s the writer kept up during the copy.

Not a test: it asserts nothing and prints figures (MB/s of database size).

    .venv/bin/python bench/snapshot_bench.py [--mb 100] [--dir /path/on/the/real/disk]

``--dir`` should be on the disk that will hold DATA_DIR (the default temporary directory may be a tmpfs).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import apsw  # noqa: E402

from node.core import sqlreq as q  # noqa: E402
from node.storage import statemachine as sm  # noqa: E402
from node.storage.snapshots import SnapshotStore  # noqa: E402
from node.storage.sqlite import Database, Limits  # noqa: E402

VERSION = apsw.sqlite_lib_version()
ROW_BYTES = 1 << 20
MAX_WRITES = 1_000_000


def write(sql: str) -> sm.Command:
    request = q.DbRequest((q.Statement(sql),), q.Flags())
    return sm.Command(
        q.stamp_write(request, time_ns=1_700_000_000_000_000_000, seed=1), sqlite_version=VERSION
    )


async def run(root: Path, megabytes: int) -> None:
    database = Database(root / "data", limits=Limits(readers=2), queue_size=256)
    await database.open()
    store = SnapshotStore(root / "data")
    await asyncio.to_thread(store.open)
    try:
        await database.apply(1, [write("CREATE TABLE t (b BLOB)")])
        await database.apply(2, [write("CREATE TABLE w (n INTEGER)")])
        index = 2
        for _ in range(megabytes):
            index += 1
            await database.apply(index, [write(f"INSERT INTO t VALUES (randomblob({ROW_BYTES}))")])
        size_mb = (root / "data" / "node.db").stat().st_size / 1e6

        stop = asyncio.Event()
        writes = 0

        async def writer() -> None:
            nonlocal index, writes
            for _ in range(MAX_WRITES):
                if stop.is_set():
                    return
                index += 1
                await database.apply(index, [write("INSERT INTO w VALUES (1)")])
                writes += 1

        task = asyncio.create_task(writer())
        tmp = store.temp_path()
        start = time.perf_counter()
        try:
            snap_index = await database.copy_for_snapshot(tmp)
            copy_s = time.perf_counter() - start
        finally:
            stop.set()
            await task
        copy_writes = writes
        start = time.perf_counter()
        meta = await asyncio.to_thread(
            store.add, tmp, cluster="bench", epoch=1, index=snap_index, config=b"{}", sqlite_version=VERSION
        )
        add_s = time.perf_counter() - start
        snap_mb = meta.size_bytes / 1e6

        other = SnapshotStore(root / "receiver")
        await asyncio.to_thread(other.open)
        await asyncio.to_thread(shutil.copyfile, store.path_of(meta), other.incoming_part(meta))
        start = time.perf_counter()
        await asyncio.to_thread(other.finish_incoming, meta)
        receive_s = time.perf_counter() - start

        start = time.perf_counter()
        await database.install_snapshot(store.path_of(meta), meta.index)
        install_s = time.perf_counter() - start
    finally:
        await database.close()

    print(f"database {size_mb:.1f} MB, snapshot {snap_mb:.1f} MB")
    print(
        f"copy_for_snapshot  {copy_s:6.2f} s  {snap_mb / copy_s:7.1f} MB/s  ({copy_writes} applies meanwhile)"
    )
    print(f"store.add          {add_s:6.2f} s  {snap_mb / add_s:7.1f} MB/s  (sha256 + fsync + rename)")
    print(
        f"finish_incoming    {receive_s:6.2f} s  {snap_mb / receive_s:7.1f} MB/s  (verify + fsync + rename)"
    )
    print(f"install_snapshot   {install_s:6.2f} s  {snap_mb / install_s:7.1f} MB/s  (copy + fsync + swap)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="database size in MiB of blobs")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the database (a real disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        asyncio.run(run(Path(root), args.mb))


if __name__ == "__main__":
    main()
