"""Honest results: one result per statement, and no result claims a change that is not stored."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import execute, query

SCHEMA = (
    "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE t (x INTEGER UNIQUE)",
    "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
)


def _command(sqls, *, transaction: bool) -> q.WriteCommand:
    request = q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags(transaction=transaction))
    return q.stamp_write(request, time_ns=1_700_000_000_000_000_000, seed=5)


async def _fresh(path) -> Database:
    database = Database(path, limits=Limits(write_step_budget=500_000), queue_size=8)
    await database.open()
    assert all(
        "error" not in r for r in await execute(database, _command(SCHEMA, transaction=False), q.Flags())
    )
    return database


async def _rows(database: Database) -> int:
    request = q.DbRequest(
        (q.Statement("SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM child)"),), q.Flags()
    )
    return (await query(database, request))[0]["values"][0][0]


async def test_a_failed_commit_reports_every_statement_as_rolled_back(tmp_path):
    database = await _fresh(tmp_path)
    try:
        # The deferred foreign key is checked at COMMIT, which therefore fails after both inserts succeeded.
        results = await execute(database,
            _command(["INSERT INTO t VALUES (1)", "INSERT INTO child VALUES (99)"], transaction=True),
            q.Flags(),
        )
        assert results == [
            {"error": "rolled back: COMMIT failed: FOREIGN KEY constraint failed"},
            {"error": "rolled back: COMMIT failed: FOREIGN KEY constraint failed"},
        ]
        assert await _rows(database) == 0
    finally:
        await database.close()


STATEMENTS = st.sampled_from(
    [
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (2)",
        "INSERT INTO t VALUES (abs(random()) % 1000 + 10)",
        "INSERT INTO child VALUES (99)",  # fails only at COMMIT (deferred foreign key)
        "INSERT INTO child VALUES (NULL)",
        "SELECT * FROM t",
        "INSERT INTO nowhere VALUES (1)",
        "PRAGMA foreign_keys=OFF",
        "INSERT INTO t SELECT n + 5000 FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) "
        "SELECT n FROM r)",  # exceeds the step budget
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(sqls=st.lists(STATEMENTS, min_size=1, max_size=6), transaction=st.booleans())
def test_results_match_statements_and_what_is_stored(tmp_path_factory, sqls, transaction):
    async def run() -> None:
        database = await _fresh(tmp_path_factory.mktemp("honest"))
        try:
            results = await execute(database, _command(sqls, transaction=transaction), q.Flags())
            stored = await _rows(database)
        finally:
            await database.close()
        assert len(results) == len(sqls)
        claimed = sum(r.get("rows_affected", 0) for r in results)
        if transaction and any("error" in r for r in results):
            assert all("error" in r for r in results), results
            assert stored == 0
        else:
            assert stored == claimed, (results, stored)

    asyncio.run(run())
