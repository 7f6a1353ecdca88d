"""Replacing the database file while readers read and other loads run: no mixed or damaged database."""

from __future__ import annotations

import asyncio

import apsw

from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import query


def _make(path, marker: str, rows: int) -> None:
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute("CREATE TABLE m (marker TEXT, n INTEGER)")
        conn.executemany("INSERT INTO m VALUES (?, ?)", ((marker, i) for i in range(rows)))
    conn.close()


def _read(sql: str) -> q.DbRequest:
    return q.DbRequest((q.Statement(sql),), q.Flags())


async def test_concurrent_loads_and_reads(tmp_path):
    database = Database(tmp_path / "data", limits=Limits(readers=3), queue_size=64)
    await database.open()
    try:
        sources = []
        for i in range(4):
            source = tmp_path / f"src{i}.db"
            _make(source, f"file-{i}", 1000 + i)
            sources.append(source)

        async def load(i: int) -> None:
            copy = database.temp_path("test")
            await asyncio.to_thread(copy.write_bytes, sources[i].read_bytes())
            await database.load_sqlite_file(copy, index=100 + i)

        async def reader(n: int) -> list:
            out = []
            for _ in range(10):
                result = await query(database,
                    _read("SELECT marker, count(*) FROM m GROUP BY marker"), client=str(n)
                )
                out.append(result[0])
            return out

        results = await asyncio.gather(*(load(i) for i in range(4)), *(reader(n) for n in range(4)))
        for batch in results[4:]:
            for result in batch:
                # Every read saw one whole file (or none yet), never a mix.
                assert "error" in result or (
                    len(result["values"]) == 1
                    and result["values"][0][1] == 1000 + int(result["values"][0][0][5:])
                ), result
        final = await query(database, _read("PRAGMA integrity_check"))
        assert final[0]["values"] == [["ok"]]
        assert (await query(database, _read("SELECT count(DISTINCT marker) FROM m")))[0]["values"] == [[1]]
    finally:
        await database.close()
