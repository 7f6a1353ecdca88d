"""A write command replays identically: the property replication will rely on."""

from __future__ import annotations

import pytest

from node.core import sqlreq as q
from node.storage.dump import split_sql
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import execute, query

NONDETERMINISTIC = [
    "CREATE TABLE t (id INTEGER PRIMARY KEY, r, b, ts DEFAULT CURRENT_TIMESTAMP, d DEFAULT (date('now')), tm)",
    "INSERT INTO t(r, b, tm) VALUES(random(), randomblob(16), CURRENT_TIME)",
    "INSERT INTO t(r, b, tm) VALUES(abs(random()) % 1000, hex(randomblob(8)), datetime('now', '+1 day'))",
    "INSERT INTO t(r, b, tm) VALUES(julianday('now'), unixepoch(), strftime('%Y-%m-%d %H:%M:%f', 'now'))",
    "INSERT INTO t(r, b, tm) VALUES(datetime(), time(), date('NOW'))",
    "INSERT INTO t(r, b, tm) SELECT random(), randomblob(4), CURRENT_DATE FROM t",
]


async def _run_on_fresh_database(tmp_path, name, command) -> list:
    database = Database(tmp_path / name, limits=Limits(), queue_size=4)
    await database.open()
    try:
        results = await execute(database, command, q.Flags())
        assert all("error" not in r for r in results), results
        rows = await query(database, q.DbRequest((q.Statement("SELECT * FROM t ORDER BY id"),), q.Flags()))
        return rows[0]["values"]
    finally:
        await database.close()


def _command(time_ns: int, seed: int) -> q.WriteCommand:
    request = q.DbRequest(q.parse_statements(NONDETERMINISTIC, max_statements=100), q.Flags(transaction=True))
    return q.stamp_write(request, time_ns=time_ns, seed=seed)


async def test_same_command_on_two_fresh_databases_gives_identical_rows(tmp_path):
    command = _command(1_700_000_000_123_456_789, 42)
    first = await _run_on_fresh_database(tmp_path, "a", command)
    second = await _run_on_fresh_database(tmp_path, "b", command)
    assert first == second
    assert len(first) == 8
    assert first[0][3] == "2023-11-14 22:13:20"  # CURRENT_TIMESTAMP came from the command, not the clock
    assert first[0][4] == "2023-11-14"
    assert first[1][5] == "2023-11-15 22:13:20"
    assert first[2][5] == "2023-11-14 22:13:20.123"
    assert first[3][5] == "2023-11-14"


async def test_another_seed_or_time_gives_other_values(tmp_path):
    base = await _run_on_fresh_database(tmp_path, "a", _command(1_700_000_000_000_000_000, 1))
    reseeded = await _run_on_fresh_database(tmp_path, "b", _command(1_700_000_000_000_000_000, 2))
    later = await _run_on_fresh_database(tmp_path, "c", _command(1_800_000_000_000_000_000, 1))
    assert base[0][1] != reseeded[0][1]
    assert base[0][1] == later[0][1] and base[0][3] != later[0][3]


async def test_reads_still_see_the_real_clock(tmp_path):
    database = Database(tmp_path / "r", limits=Limits(), queue_size=4)
    await database.open()
    try:
        results = await query(database,
            q.DbRequest((q.Statement("SELECT date('now') > '2024-01-01'"),), q.Flags())
        )
        assert results[0]["values"] == [[1]]
    finally:
        await database.close()


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("a; b;", ["a;", " b;"]),
        ("INSERT INTO t VALUES('x;y'); c", ["INSERT INTO t VALUES('x;y');", " c"]),
        (
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END; x;",
            ["CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;", " x;"],
        ),
        (";;  ;", []),
    ],
)
def test_split_sql(script, expected):
    assert list(split_sql(script)) == expected
