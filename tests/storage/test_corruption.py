"""A database file damaged anywhere is either sound by SQLite's own check, or quarantined and never served."""

from __future__ import annotations

import asyncio
import random

import apsw
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node import errors
from node.core import sqlreq as q
from node.storage.sqlite import DB_FILE_NAME, Database, Limits, State
from tests.support.dbapi import query


def _make(path, rows: int = 3000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=DELETE")
    with conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE INDEX t_name ON t(name)")
        conn.executemany(
            "INSERT INTO t(name) VALUES (?)", ((f"name-{i:06d}-" + "y" * 40,) for i in range(rows))
        )
    conn.close()


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **fields: self.events.append((level, event, fields))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@example(where=6.103515625e-05, length=24, seed=0)  # the header's format bytes: "unsupported file format"
@given(
    where=st.floats(min_value=0.0, max_value=0.999), length=st.integers(1, 8192), seed=st.integers(0, 2**32)
)
def test_damage_anywhere_is_never_served(tmp_path_factory, where, length, seed):
    data_dir = tmp_path_factory.mktemp("corrupt") / "data"
    db = data_dir / DB_FILE_NAME
    _make(db)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(int(size * where))
        f.write(random.Random(seed).randbytes(length))
    # What SQLite itself says about the damaged file, checked independently of the node.
    try:
        conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            sound = conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        finally:
            conn.close()
    except apsw.Error:
        sound = False

    async def run() -> None:
        log = _Log()
        database = Database(data_dir, limits=Limits(), queue_size=4, log=log)
        await database.prepare()
        await database.start()
        try:
            if sound:
                assert database.state == State.READY
                return
            assert database.state == State.CORRUPT, database.state_detail
            assert not db.exists()
            assert list((data_dir / "quarantine").glob(f"*/{DB_FILE_NAME}"))
            assert [e for level, e, _ in log.events if level == "error"] == ["database_corrupt"]
            try:
                await query(database, q.DbRequest((q.Statement("SELECT 1"),), q.Flags()))
            except errors.DatabaseCorrupt as exc:
                assert exc.status == 503
            else:
                raise AssertionError("a corrupt database answered a query")
        finally:
            await database.close()

    asyncio.run(run())
