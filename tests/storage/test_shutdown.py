"""Shutting down is not held up by a slow statement or a backlog (a node promises to exit in 2 s)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import execute, query
from tests.support.wait import until

# A recursive CTE that counts to a billion: runs for minutes unless interrupted.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) SELECT max(x) FROM c"
ENDLESS_WRITE = (
    "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT max(x) FROM c"
)


def _query(sql: str) -> q.DbRequest:
    return q.DbRequest((q.Statement(sql),), q.Flags())


def _write(sql: str) -> q.WriteCommand:
    return q.stamp_write(_query(sql), time_ns=1, seed=1)


async def test_begin_shutdown_interrupts_running_work_and_refuses_the_backlog(tmp_path):
    database = Database(
        tmp_path,
        limits=Limits(statement_timeout_s=120, write_step_budget=10**12, readers=2, readers_per_client=1),
        queue_size=300,
    )
    await database.open()
    await execute(database, _write("CREATE TABLE t(x)"), q.Flags())
    running = asyncio.create_task(query(database, _query(ENDLESS), client="a"))
    writing = asyncio.create_task(execute(database, _write(ENDLESS_WRITE), q.Flags()))
    await until(
        lambda: database.snapshot()["reads_running"] == 1 and database.snapshot()["write_running"] == 1,
        "the endless read and write to run",
    )
    # A backlog: 250 reads of one client (above its cap of one reader) and 40 writes.
    queued = [asyncio.create_task(query(database, _query("SELECT 1"), client="a")) for _ in range(150)]
    queued += [
        asyncio.create_task(execute(database, _write("INSERT INTO t VALUES(1)"), q.Flags())) for _ in range(40)
    ]
    await until(lambda: database.snapshot()["reads_waiting"] == 150, "the reads to queue")
    assert database.snapshot()["writes_queued"] == 41  # the running one stays listed until it ends

    database.begin_shutdown()
    for task in [running, writing, *queued]:
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await asyncio.wait_for(task, timeout=30)
    await asyncio.wait_for(database.close(), timeout=30)
    # Nothing queued ran: the table holds no row from the 40 queued inserts.
    await database.open()
    try:
        assert (await query(database, _query("SELECT count(*) FROM t")))[0]["values"] == [[0]]
    finally:
        await database.close()


async def test_a_closed_database_can_be_opened_again(tmp_path):
    database = Database(tmp_path, limits=Limits(), queue_size=4)
    await database.open()
    await database.close()
    await database.open()
    try:
        assert (await query(database, _query("SELECT 42")))[0]["values"] == [[42]]
    finally:
        await database.close()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    reads=st.integers(0, 60),
    writes=st.integers(0, 30),
    clients=st.integers(1, 5),
    runaway_write=st.booleans(),
)
def test_shutdown_answers_every_backlog(tmp_path_factory, reads, writes, clients, runaway_write):
    """Whatever is queued or running, begin_shutdown settles every request at once: a result or a 503."""

    async def run() -> None:
        database = Database(
            tmp_path_factory.mktemp("shutdown"),
            limits=Limits(statement_timeout_s=120, write_step_budget=10**12, readers=2),
            queue_size=200,
        )
        await database.open()
        await execute(database, _write("CREATE TABLE t(x)"), q.Flags())
        tasks = [
            asyncio.create_task(query(database, _query(ENDLESS), client=str(i % clients)))
            for i in range(reads)
        ]
        if runaway_write:
            tasks.append(asyncio.create_task(execute(database, _write(ENDLESS_WRITE), q.Flags())))
        tasks += [
            asyncio.create_task(execute(database, _write("INSERT INTO t VALUES(1)"), q.Flags()))
            for _ in range(writes)
        ]
        await asyncio.sleep(0)  # let every request reach the database
        database.begin_shutdown()
        done, pending = await asyncio.wait(tasks, timeout=30) if tasks else (set(), set())
        assert not pending
        for task in done:
            exc = task.exception()
            assert exc is None or isinstance(exc, errors.Unavailable), exc
        await asyncio.wait_for(database.close(), timeout=30)

    asyncio.run(run())
