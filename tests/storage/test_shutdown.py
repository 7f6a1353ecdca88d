"""Closing the database is not held up by a slow statement or a backlog (a node promises to exit in 2 s)."""

from __future__ import annotations

import asyncio
import time

import pytest

from node import errors
from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits

# A recursive CTE that counts to a billion: runs for minutes unless interrupted.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) SELECT max(x) FROM c"


def _query(sql: str) -> q.DbRequest:
    return q.DbRequest((q.Statement(sql),), q.Flags())


async def test_close_interrupts_the_running_statement_and_refuses_the_queued_ones(tmp_path):
    database = Database(tmp_path, limits=Limits(statement_timeout_s=120), queue_size=16)
    await database.open()
    running = asyncio.create_task(database.query(_query(ENDLESS)))
    queued = [asyncio.create_task(database.query(_query("SELECT 1"))) for _ in range(5)]
    deadline = time.monotonic() + 10
    # Wait until all six are with the database thread and the endless statement is stepping (its deadline set).
    while (database._pending < 6 or database._deadline == float("inf")) and time.monotonic() < deadline:  # noqa: ASYNC110 - state of another thread
        await asyncio.sleep(0.01)
    assert database._pending == 6 and database._deadline != float("inf")

    await asyncio.wait_for(database.close(), timeout=30)

    first = await running
    assert "interrupted" in first[0]["error"]
    for task in queued:
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await task


async def test_a_closed_database_can_be_opened_again(tmp_path):
    database = Database(tmp_path, limits=Limits(), queue_size=4)
    await database.open()
    await database.close()
    await database.open()
    try:
        assert (await database.query(_query("SELECT 42")))[0]["values"] == [[42]]
    finally:
        await database.close()
