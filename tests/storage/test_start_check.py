"""While the start-up integrity check runs, data calls answer 503 ``database_checking`` and /readyz is 503."""

from __future__ import annotations

import asyncio
import threading

import pytest

from node import errors
from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits, State
from tests.support.dbapi import query


async def test_data_calls_wait_for_the_check(tmp_path, monkeypatch):
    gate = threading.Event()
    original = Database._open_and_check

    def slow_check(self):
        assert gate.wait(30)
        return original(self)

    monkeypatch.setattr(Database, "_open_and_check", slow_check)
    database = Database(tmp_path, limits=Limits(), queue_size=4)
    await database.prepare()
    starting = asyncio.create_task(database.start())
    try:
        for _ in range(100):
            if database.state == State.CHECKING:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(errors.DatabaseChecking) as info:
            await query(database, q.DbRequest((q.Statement("SELECT 1"),), q.Flags()))
        assert info.value.status == 503 and info.value.body()["code"] == "database_checking"
        assert not database.is_open
        gate.set()
        await asyncio.wait_for(starting, 30)
        assert database.is_open
        assert (await query(database, q.DbRequest((q.Statement("SELECT 1"),), q.Flags())))[0]["values"] == [
            [1]
        ]
    finally:
        gate.set()
        await starting
        await database.close()


async def test_shutdown_during_the_check_stops_cleanly(tmp_path, monkeypatch):
    gate = threading.Event()
    original = Database._open_and_check

    def slow_check(self):
        assert gate.wait(30)
        return original(self)

    monkeypatch.setattr(Database, "_open_and_check", slow_check)
    database = Database(tmp_path, limits=Limits(), queue_size=4)
    await database.prepare()
    starting = asyncio.create_task(database.start())
    await asyncio.sleep(0)
    closing = asyncio.create_task(database.close())
    gate.set()
    await asyncio.wait_for(asyncio.gather(starting, closing), 30)
    assert database.state == State.CLOSED
