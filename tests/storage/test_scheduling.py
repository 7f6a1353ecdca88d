"""Bounded work per request, no starvation: readers per client, round-robin waiting, cancellation, and a
deterministic step budget for writes. Ordering is checked with events, never with timing."""

from __future__ import annotations

import asyncio
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import sqlreq as q
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import execute, query
from tests.support.wait import until

RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r"


def _read(*sqls: str, **flags) -> q.DbRequest:
    return q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags(**flags))


def _command(*sqls: str, transaction: bool = False) -> q.WriteCommand:
    request = q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags(transaction=transaction))
    return q.stamp_write(request, time_ns=1_700_000_000_000_000_000, seed=3)


def _blocking(release: threading.Event, started: list[str], name: str):
    def fn(job, slot):
        started.append(name)
        assert release.wait(30)
        return name

    return fn


async def open_database(path, **limits) -> Database:
    database = Database(path, limits=Limits(**limits), queue_size=limits.pop("queue_size", 64))
    await database.open()
    return database


async def test_a_runaway_read_request_does_not_delay_another_clients_select_1(tmp_path):
    database = await open_database(tmp_path, statement_timeout_s=120, readers=4)
    try:
        # Client A: one request of twelve runaway statements, and more of them queued behind its cap.
        runaway = [asyncio.create_task(query(database, _read(*[RUNAWAY] * 12), client="A")) for _ in range(6)]
        await until(lambda: database.snapshot()["reads_running"] == 2, "A to hold its two readers")
        await until(lambda: database.snapshot()["reads_waiting"] == 4, "A's backlog to queue")
        # Client B is served by a free reader while all of A's work is still running or waiting.
        result = await asyncio.wait_for(query(database, _read("SELECT 1"), client="B"), timeout=60)
        assert result == [{"columns": ["1"], "types": [""], "values": [[1]]}]
        assert not any(task.done() for task in runaway)
        for task in runaway:
            task.cancel()
        await asyncio.gather(*runaway, return_exceptions=True)
        await until(lambda: database.snapshot()["reads_running"] == 0, "cancelled reads to stop")
    finally:
        await database.close()


async def test_the_time_limit_bounds_the_whole_read_request(tmp_path):
    database = await open_database(tmp_path, statement_timeout_s=0.3)
    try:
        results = await query(database, _read(*[RUNAWAY] * 12), client="A")
        assert len(results) == 12
        assert results[0]["error"] == "interrupted: the request ran longer than 0.3 s"
        # Statements after the limit do not start (one limit per request, not one per statement).
        assert all(r["error"].startswith("not run: interrupted") for r in results[1:])
    finally:
        await database.close()


async def test_per_client_cap_and_a_waiting_client_gets_the_next_free_reader(tmp_path):
    database = await open_database(tmp_path, readers=2, readers_per_client=2)
    release_a = [threading.Event() for _ in range(2)]
    started: list[str] = []
    try:
        a_running = [
            asyncio.create_task(database._read("A", _blocking(release_a[i], started, f"A{i}")))
            for i in range(2)
        ]
        await until(lambda: len(started) == 2, "A to hold both readers")
        backlog_release = threading.Event()
        a_backlog = [
            asyncio.create_task(database._read("A", _blocking(backlog_release, started, f"A-queued-{i}")))
            for i in range(5)
        ]
        await until(lambda: database.snapshot()["reads_waiting"] == 5, "A's backlog")
        b = asyncio.create_task(database._read("B", lambda job, slot: started.append("B")))
        await until(lambda: database.snapshot()["reads_waiting"] == 6, "B to wait")
        release_a[0].set()  # one reader becomes free: it goes to B, not to A's older backlog
        await asyncio.wait_for(b, timeout=30)
        assert sorted(started[:2]) == ["A0", "A1"] and started[2] == "B"
        release_a[1].set()
        backlog_release.set()
        assert sorted(await asyncio.gather(*a_backlog)) == [f"A-queued-{i}" for i in range(5)]
        await asyncio.gather(*a_running)
    finally:
        for event in release_a:
            event.set()
        await database.close()


async def test_a_client_holds_at_most_its_cap(tmp_path):
    database = await open_database(tmp_path, readers=4, readers_per_client=1)
    release = threading.Event()
    started: list[str] = []
    try:
        tasks = [
            asyncio.create_task(database._read("A", _blocking(release, started, f"A{i}"))) for i in range(3)
        ]
        await until(lambda: database.snapshot()["reads_waiting"] == 2, "two of A's reads to wait")
        assert started == ["A0"] and database.snapshot()["reads_running"] == 1
        release.set()
        assert sorted(await asyncio.gather(*tasks)) == ["A0", "A1", "A2"]
    finally:
        release.set()
        await database.close()


async def test_a_cancelled_queued_read_never_runs_and_a_running_one_is_interrupted(tmp_path):
    database = await open_database(tmp_path, readers=1, statement_timeout_s=120)
    release = threading.Event()
    started: list[str] = []
    try:
        holder = asyncio.create_task(database._read("A", _blocking(release, started, "holder")))
        await until(lambda: started == ["holder"], "the reader to be held")
        queued = asyncio.create_task(database._read("B", _blocking(release, started, "queued")))
        after = asyncio.create_task(database._read("C", _blocking(release, started, "after")))
        await until(lambda: database.snapshot()["reads_waiting"] == 2, "two reads to wait")
        queued.cancel()
        await asyncio.wait([queued])
        release.set()
        assert await holder == "holder" and await after == "after"
        assert started == ["holder", "after"]
        assert queued.cancelled()

        running = asyncio.create_task(query(database, _read(RUNAWAY), client="A"))
        await until(lambda: database.snapshot()["reads_running"] == 1, "the runaway read to run")
        running.cancel()
        await until(lambda: database.snapshot()["reads_running"] == 0, "the cancelled read to stop")
        assert (await query(database, _read("SELECT 2"), client="A"))[0]["values"] == [[2]]
    finally:
        release.set()
        await database.close()


async def test_a_cancelled_queued_write_never_runs(tmp_path):
    database = await open_database(tmp_path)
    release = threading.Event()
    started: list[str] = []
    try:
        await execute(database, _command("CREATE TABLE t (x)"), q.Flags())
        holder = asyncio.create_task(database._write(lambda job: _blocking(release, started, "w")(job, None)))
        await until(lambda: started == ["w"], "the writer to be held")
        dropped = asyncio.create_task(execute(database, _command("INSERT INTO t VALUES (1)"), q.Flags()))
        kept = asyncio.create_task(execute(database, _command("INSERT INTO t VALUES (2)"), q.Flags()))
        await until(lambda: database.snapshot()["writes_queued"] == 3, "two writes to queue")
        dropped.cancel()
        await asyncio.wait([dropped])  # the cancellation is handled before the writer frees up
        release.set()
        await holder
        assert await kept == [{"last_insert_id": 1, "rows_affected": 1}]
        assert (await query(database, _read("SELECT x FROM t")))[0]["values"] == [[2]]
    finally:
        release.set()
        await database.close()


async def test_a_cancelled_running_write_finishes_and_its_result_is_dropped_quietly(tmp_path):
    """The write path awaits the job's future itself (no shield): cancelling the waiter cancels that future,
    and the thread's result, arriving later, must be ignored without an error, the job having run to its
    end (its outcome does not depend on the client's connection)."""
    database = await open_database(tmp_path)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    release = threading.Event()
    started: list[str] = []
    finished: list[str] = []

    def job_fn(job):
        _blocking(release, started, "w")(job, None)
        database._ops(job).internal("CREATE TABLE kept (x)", ())
        finished.append("w")
        return "w"

    try:
        running = asyncio.create_task(database._write(job_fn))
        await until(lambda: started == ["w"], "the write to run")
        running.cancel()
        await asyncio.wait([running])
        assert running.cancelled()
        release.set()
        # The writer takes the next job only after the cancelled one ended: its table is there.
        assert await database._write(lambda job: database._ops(job).internal(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'kept'", ()
        )) == [(1,)]  # fmt: skip
        assert finished == ["w"]
        # The cancelled job's late result was delivered before this one's (one thread, in order): quietly.
        assert errors == []
    finally:
        release.set()
        loop.set_exception_handler(None)
        await database.close()


LOOP_INSERT = (
    "INSERT INTO t SELECT n FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r WHERE n < {n}) "
    "SELECT n FROM r)"
)


async def _outcome(path, budget: int, command: q.WriteCommand) -> tuple[list, list]:
    database = await open_database(path, write_step_budget=budget)
    try:
        await execute(database, _command("CREATE TABLE t (x)"), q.Flags())
        results = await execute(database, command, q.Flags())
        rows = await query(database, _read("SELECT count(*), sum(x) FROM t"))
        return results, rows
    finally:
        await database.close()


async def test_the_write_budget_stops_a_runaway_write_and_rolls_back_its_transaction(tmp_path):
    command = _command("INSERT INTO t VALUES (1)", LOOP_INSERT.format(n=10**9), "INSERT INTO t VALUES (3)",
                       transaction=True)  # fmt: skip
    results, rows = await _outcome(tmp_path / "a", 200_000, command)
    assert len(results) == 3
    assert results[0]["error"].startswith("rolled back: statement 2 failed: write budget exceeded")
    assert results[1]["error"].startswith(
        "write budget exceeded: the request used more than 200000 SQLite VM"
    )
    assert results[2]["error"].startswith("not run: statement 2 failed: write budget exceeded")
    assert rows[0]["values"] == [[0, None]]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    budget=st.integers(min_value=1_000, max_value=300_000),
    sizes=st.lists(st.integers(min_value=1, max_value=20_000), min_size=1, max_size=4),
    transaction=st.booleans(),
)
def test_the_write_budget_is_deterministic(tmp_path_factory, budget, sizes, transaction):
    """The same command on two fresh databases: the same results (errors included) and the same rows."""
    command = _command(*(LOOP_INSERT.format(n=n) for n in sizes), transaction=transaction)
    base = tmp_path_factory.mktemp("budget")
    first = asyncio.run(_outcome(base / "a", budget, command))
    second = asyncio.run(_outcome(base / "b", budget, command))
    assert first == second
    results, _ = first
    assert len(results) == len(sizes)
