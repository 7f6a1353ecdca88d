"""The state machine: entries applied once, in one transaction per group, each client's outcome its own.

The central property: applying commands together in one group (one transaction) gives every command the
same results, and the database the same rows, as applying them one by one in entries of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.core import sqlreq as q
from node.storage import results as res
from node.storage import statemachine as sm
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import query

SCHEMA = (
    "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE t (x INTEGER UNIQUE)",
    "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
)
LOOP_INSERT = (
    "INSERT INTO t SELECT n + 100000 FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) "
    "SELECT n FROM r)"
)  # never ends: exceeds the step budget, which makes SQLite roll back the whole transaction
STATEMENTS = [
    "INSERT INTO t VALUES (1)",
    "INSERT INTO t VALUES (2)",
    "INSERT INTO t VALUES (abs(random()) % 1000 + 10)",
    "INSERT INTO child VALUES (99)",  # a deferred foreign key: fails at its own COMMIT
    "INSERT INTO parent VALUES (99)",
    "INSERT INTO child VALUES (NULL)",
    "INSERT OR ROLLBACK INTO t VALUES (1)",  # on conflict: rolls back the whole transaction
    "UPDATE t SET x = x + 1 WHERE x > 500",
    "DELETE FROM t WHERE x = 2",
    "SELECT count(*) FROM t",
    "INSERT INTO nowhere VALUES (1)",
    LOOP_INSERT,
]


TIME_NS = 1_700_000_000_000_000_000


def _command(
    sqls, *, transaction=False, seed=5, time_ns=TIME_NS, unified=False, client="", request_id=None
) -> sm.Command:
    request = q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags(transaction=transaction))
    write = q.stamp_write(request, time_ns=time_ns, seed=seed)
    return sm.Command(write, unified=unified, client=client, request_id=request_id)


async def _fresh(path, schema=SCHEMA, **limits) -> Database:
    database = Database(path, limits=Limits(write_step_budget=200_000, **limits), queue_size=64)
    await database.open()
    (created,) = await database.apply(1, [_command(schema)])
    assert all(r.ok for r in created.results)
    return database


async def _state(database: Database) -> list:
    request = q.DbRequest(
        (
            q.Statement("SELECT x FROM t ORDER BY x"),
            q.Statement("SELECT p FROM child ORDER BY p"),
            q.Statement("SELECT id FROM parent ORDER BY id"),
        ),
        q.Flags(),
    )
    return [r["values"] if "values" in r else [] for r in await query(database, request)]


def _timeless(results) -> list:
    return [dataclasses.replace(r, time_s=None) for r in results]


async def test_the_applied_index_is_stored_with_the_data_and_survives_a_restart(tmp_path):
    database = await _fresh(tmp_path)
    try:
        assert await database.applied_index() == 1
        (out,) = await database.apply(7, [_command(["INSERT INTO t VALUES (1)"])])
        assert out.index == 7 and out.results[0].rows_affected == 1
        assert await database.applied_index() == 7
    finally:
        await database.close()
    await database.open()
    try:
        assert await database.applied_index() == 7
        # An entry at or below the applied index is skipped: nothing runs, nothing changes.
        assert await database.apply(7, [_command(["INSERT INTO t VALUES (2)"])]) is None
        assert await database.apply(3, [_command(["INSERT INTO t VALUES (3)"])]) is None
        assert await _state(database) == [[[1]], [], []]
        assert await database.applied_index() == 7
    finally:
        await database.close()


async def test_an_empty_database_stays_empty_until_the_first_write(tmp_path):
    database = Database(tmp_path, limits=Limits(), queue_size=4)
    await database.open()
    try:
        assert await database.applied_index() == 0
        objects = await query(
            database, q.DbRequest((q.Statement("SELECT count(*) FROM sqlite_schema"),), q.Flags())
        )
        assert objects[0]["values"] == [[0]]
    finally:
        await database.close()


async def test_a_runaway_command_does_not_undo_another_clients_command_in_the_same_group(tmp_path):
    """Regression: the step budget interrupts a statement, and SQLite then rolls back the whole transaction."""
    database = await _fresh(tmp_path)
    try:
        outcomes = await database.apply(
            2,
            [
                _command(["INSERT INTO t VALUES (1)"]),
                _command(["INSERT INTO t VALUES (2)", LOOP_INSERT, "INSERT INTO t VALUES (3)"]),
                _command(["INSERT INTO t VALUES (4)", LOOP_INSERT], transaction=True),
                _command(["INSERT INTO t VALUES (5)", "INSERT OR ROLLBACK INTO t VALUES (5)"]),
                _command(["INSERT INTO t VALUES (6)"]),
            ],
        )
        first, runaway, runaway_tx, or_rollback, last = (o.results for o in outcomes)
        assert first[0].rows_affected == 1 and last[0].rows_affected == 1
        assert runaway[0].ok and runaway[1].error.startswith("write budget exceeded")
        assert runaway[2].status is res.Status.NOT_RUN
        assert all(r.status is not res.Status.DONE for r in runaway_tx)
        assert or_rollback[0].ok and "UNIQUE constraint failed" in or_rollback[1].error
        assert await _state(database) == [[[1], [2], [5], [6]], [], []]
        assert await database.applied_index() == 2
    finally:
        await database.close()


async def test_a_deferred_foreign_key_fails_only_its_own_command(tmp_path):
    database = await _fresh(tmp_path)
    try:
        outcomes = await database.apply(
            2,
            [
                _command(["INSERT INTO t VALUES (1)", "INSERT INTO child VALUES (99)"], transaction=True),
                _command(
                    ["INSERT INTO t VALUES (2)", "INSERT INTO child VALUES (98)", "INSERT INTO t VALUES (3)"]
                ),
                _command(
                    ["INSERT INTO parent VALUES (97)", "INSERT INTO child VALUES (97)"], transaction=True
                ),
            ],
        )
        tx_fail, auto, tx_ok = (o.results for o in outcomes)
        assert [r.error for r in tx_fail] == ["rolled back: COMMIT failed: FOREIGN KEY constraint failed"] * 2
        assert [r.error for r in auto] == [None, "FOREIGN KEY constraint failed", None]
        assert all(r.ok for r in tx_ok)
        assert await _state(database) == [[[2], [3]], [[97]], [[97]]]
    finally:
        await database.close()


async def _grouped_and_alone(base, commands) -> tuple[list, list]:
    together = await _fresh(base / "together")
    alone = await _fresh(base / "alone")
    try:
        grouped = await together.apply(2, commands)
        one_by_one = []
        for offset, command in enumerate(commands):
            (outcome,) = await alone.apply(2 + offset, [command])
            one_by_one.append(outcome)
        return (
            [_timeless(o.results) for o in grouped] + [await _state(together)],
            [_timeless(o.results) for o in one_by_one] + [await _state(alone)],
        )
    finally:
        await together.close()
        await alone.close()


async def _staged_then_committed(base, commands) -> tuple[list, list, list]:
    """Per command its results and the final state, staged (one entry per command) then committed; and the
    state another connection saw while the group was staged."""
    database = await _fresh(base / "staged")
    try:
        before = await _state(database)
        token, outcomes = await database.stage_entries(
            [sm.Entry(2 + i, (command,)) for i, command in enumerate(commands)]
        )
        during = await _state(database)  # a reader: nothing staged is visible
        assert (await database.commit_staged(token))[0]
        assert await database.applied_index() == 1 + len(commands)
        return [_timeless(o.results) for (o,) in outcomes] + [await _state(database)], during, before
    finally:
        await database.close()


COMMANDS = st.lists(
    st.tuples(
        st.lists(st.sampled_from(STATEMENTS), min_size=1, max_size=4),
        st.booleans(),
        st.integers(0, 3),
        st.none() | st.sampled_from(("a", "b", "c")),  # request IDs: retries, reuses, and a window of 1
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(commands=COMMANDS)
def test_a_group_gives_each_command_what_it_would_get_alone(tmp_path_factory, commands):
    built = [
        _command(sqls, transaction=tx, seed=seed, client="c", request_id=rid)
        for sqls, tx, seed, rid in commands
    ]
    with mock.patch.object(sm, "REQUEST_ID_WINDOW", 1):
        grouped, alone = asyncio.run(_grouped_and_alone(tmp_path_factory.mktemp("group"), built))
        staged, during, before = asyncio.run(_staged_then_committed(tmp_path_factory.mktemp("staged"), built))
    assert grouped == alone
    assert staged == alone  # a leader's staged group answers and stores what an apply after commit would
    assert during == before


async def test_any_other_write_rolls_a_staged_group_back(tmp_path):
    database = await _fresh(tmp_path)
    try:
        token, _ = await database.stage_entries([sm.Entry(2, (_command(["INSERT INTO t VALUES (7)"]),))])
        # Another leader's entry 2 committed instead (this node lost the lead): applied as usual.
        (other,) = await database.apply(2, [_command(["INSERT INTO t VALUES (8)"])])
        assert other.results[0].ok
        assert not (await database.commit_staged(token))[0]  # rolled back: nothing of it was applied
        assert (await _state(database))[0] == [[8]]
        assert await database.applied_index() == 2
    finally:
        await database.close()


async def test_staging_runs_only_the_entries_right_after_the_applied_index(tmp_path):
    database = await _fresh(tmp_path)
    try:
        insert = _command(["INSERT INTO t VALUES (7)"])
        assert await database.stage_entries([sm.Entry(3, (insert,))]) is None  # entry 2 is not applied
        assert await database.stage_entries([sm.Entry(1, (insert,))]) is None  # applied already
        token, _ = await database.stage_entries([sm.Entry(2, (insert,))])
        again, _ = await database.stage_entries([sm.Entry(2, (insert,))])  # replaces the first
        assert (await database.commit_staged(again))[0]
        assert not (await database.commit_staged(token))[0]  # replaced, so rolled back: never committed
        assert (await _state(database))[0] == [[7]]
        assert await database.applied_index() == 2
    finally:
        await database.close()


async def test_a_commit_queues_the_staging_of_the_next_group_right_behind_it(tmp_path):
    database = await _fresh(tmp_path)
    try:
        token, _ = await database.stage_entries([sm.Entry(2, (_command(["INSERT INTO t VALUES (7)"]),))])
        # Not right after the group committed: nothing staged, and the commit stands.
        committed, staging = await database.commit_staged(token, [sm.Entry(4, (_command(["SELECT 1"]),))])
        assert committed and await staging is None
        token, _ = await database.stage_entries([sm.Entry(3, (_command(["INSERT INTO t VALUES (8)"]),))])
        committed, staging = await database.commit_staged(
            token, [sm.Entry(4, (_command(["INSERT INTO t VALUES (8)"]),))]
        )
        then, (outcome,) = await staging
        assert committed and "UNIQUE constraint failed" in outcome[0].results[0].error  # ran after entry 3
        assert (await _state(database))[0] == [[7], [8]]  # entry 4 staged, not visible
        assert (await database.commit_staged(then))[0]
        assert await database.applied_index() == 4
        # A COMMIT that does not happen (the group was rolled back): the next group finds entry 5 missing.
        token, _ = await database.stage_entries([sm.Entry(5, (_command(["INSERT INTO t VALUES (9)"]),))])
        await database.apply(5, [_command(["INSERT INTO t VALUES (10)"])])
        committed, staging = await database.commit_staged(token, [sm.Entry(6, (_command(["SELECT 1"]),))])
        assert not committed and await staging is not None  # entry 6 is next after the apply of 5
        assert (await _state(database))[0] == [[7], [8], [10]]
    finally:
        await database.close()


async def test_a_staged_group_is_gone_after_a_close(tmp_path):
    database = await _fresh(tmp_path)
    await database.stage_entries([sm.Entry(2, (_command(["INSERT INTO t VALUES (7)"]),))])
    await database.close()
    database = Database(tmp_path, limits=Limits(write_step_budget=200_000), queue_size=64)
    await database.open()
    try:
        assert await database.applied_index() == 1
        assert (await _state(database))[0] == []
    finally:
        await database.close()


async def test_concurrent_entries_are_grouped_and_applied_in_order(tmp_path):
    database = await _fresh(tmp_path)
    try:
        tasks = [
            asyncio.create_task(database.apply(10 + i, [_command([f"INSERT INTO t VALUES ({i})"])]))
            for i in range(50)
        ]
        outcomes = await asyncio.gather(*tasks)
        assert [o[0].index for o in outcomes] == list(range(10, 60))
        assert all(o[0].results[0].rows_affected == 1 for o in outcomes)
        assert await database.applied_index() == 59
        assert (await _state(database))[0] == [[i] for i in range(50)]
    finally:
        await database.close()


async def test_shutdown_during_a_write_records_nothing(tmp_path):
    database = Database(tmp_path, limits=Limits(write_step_budget=10**12), queue_size=8)
    await database.open()
    await database.apply(1, [_command(["CREATE TABLE t (x)"])])
    running = asyncio.create_task(database.apply(2, [_command([LOOP_INSERT])]))
    for _ in range(2000):
        if database.snapshot()["write_running"]:
            break
        await asyncio.sleep(0.005)
    database.begin_shutdown()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await asyncio.wait_for(running, 30)
    await database.close()
    await database.open()
    try:
        assert await database.applied_index() == 1
    finally:
        await database.close()


# --- request IDs -------------------------------------------------------------------------------------------


async def test_a_retry_with_the_same_request_id_is_applied_once(tmp_path):
    database = await _fresh(tmp_path)
    try:
        insert = ["INSERT INTO t VALUES (abs(random()) % 1000 + 10)", "SELECT x FROM t"]
        (first,) = await database.apply(2, [_command(insert, client="alice", request_id="r-1", unified=True)])
        (again,) = await database.apply(3, [_command(insert, client="alice", request_id="r-1", unified=True)])
        assert again.duplicate and again.index == 2 and again.results == first.results
        assert len((await _state(database))[0]) == 1
        # Another credential with the same ID is another request.
        (other,) = await database.apply(4, [_command(insert, seed=9, client="bob", request_id="r-1")])
        assert not other.duplicate and other.index == 4
        assert len((await _state(database))[0]) == 2
        # The same ID for other statements is refused, statement by statement, and changes nothing.
        (reused,) = await database.apply(5, [_command(["DELETE FROM t"], client="alice", request_id="r-1")])
        assert reused.duplicate and "already used for a different request" in reused.results[0].error
        assert len((await _state(database))[0]) == 2
    finally:
        await database.close()


async def test_duplicates_in_one_group_apply_once(tmp_path):
    database = await _fresh(tmp_path)
    try:
        command = _command(
            ["INSERT INTO t VALUES (abs(random()) % 1000 + 10)"], client="c", request_id="same"
        )
        tasks = [asyncio.create_task(database.apply(2 + i, [command])) for i in range(8)]
        outcomes = [o[0] for o in await asyncio.gather(*tasks)]
        assert sum(not o.duplicate for o in outcomes) == 1
        assert {o.index for o in outcomes} == {2}
        assert len({o.results for o in outcomes}) == 1
        assert len((await _state(database))[0]) == 1
    finally:
        await database.close()


async def test_request_ids_are_forgotten_in_apply_order_beyond_the_window(tmp_path, monkeypatch):
    monkeypatch.setattr(sm, "REQUEST_ID_WINDOW", 3)
    database = await _fresh(tmp_path)
    try:
        for i in range(5):
            await database.apply(
                2 + i, [_command([f"INSERT INTO t VALUES ({i})"], client="c", request_id=f"id{i}")]
            )
        (old,) = await database.apply(
            10, [_command(["INSERT INTO t VALUES (0)"], client="c", request_id="id0")]
        )
        assert not old.duplicate and "UNIQUE constraint failed" in old.results[0].error  # applied again
        (kept,) = await database.apply(
            11, [_command(["INSERT INTO t VALUES (4)"], client="c", request_id="id4")]
        )
        assert kept.duplicate and kept.index == 6
    finally:
        await database.close()


async def test_the_request_id_window_does_not_depend_on_how_entries_are_grouped(tmp_path, monkeypatch):
    """A retry just past the window: forgotten whether the entries before it were applied one by one (each
    group prunes the window at its end) or together with it in one group (pruned only after it)."""
    monkeypatch.setattr(sm, "REQUEST_ID_WINDOW", 3)
    entries = [
        sm.Entry(2 + i, (_command([f"INSERT INTO t VALUES ({i})"], client="c", request_id=f"id{i}"),))
        for i in range(5)
    ]
    entries += [
        sm.Entry(7, (_command(["INSERT INTO t VALUES (0)"], client="c", request_id="id0"),)),  # forgotten
        sm.Entry(8, (_command(["INSERT INTO t VALUES (4)"], client="c", request_id="id4"),)),  # kept
    ]
    seen = []
    for grouping in ([entries], [[e] for e in entries]):
        database = await _fresh(tmp_path / f"g{len(grouping)}")
        try:
            outcomes = [o for group in grouping for o in await database.apply_entries(group)]
            seen.append(([(a.duplicate, a.index, _timeless(a.results)) for o in outcomes for a in o],
                         await _state(database)))  # fmt: skip
        finally:
            await database.close()
    assert seen[0] == seen[1]
    forgotten, kept = seen[0][0][5:]
    assert not forgotten[0] and "UNIQUE constraint failed" in forgotten[2][0].error
    assert kept[:2] == (True, 6)


async def test_user_sql_cannot_touch_the_nodes_own_tables(tmp_path):
    database = await _fresh(tmp_path)
    try:
        (out,) = await database.apply(
            2,
            [
                _command(
                    [
                        f"DELETE FROM {sm.STATE_TABLE}",
                        f"UPDATE {sm.REQUESTS_TABLE} SET idx = 0",
                        f"DROP TABLE {sm.STATE_TABLE}",
                        "CREATE TABLE _talentnest_mine (x)",
                        f"SELECT * FROM {sm.STATE_TABLE}",
                    ]
                )
            ],
        )
        assert all("reserved for the node's own tables" in r.error for r in out.results), out.results
        read = await database.query(q.DbRequest((q.Statement(f"SELECT * FROM {sm.STATE_TABLE}"),), q.Flags()))
        assert "reserved" in read[0].error
        assert await database.applied_index() == 2
    finally:
        await database.close()


VALUES = st.one_of(
    st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=False), st.text(), st.binary()
)


@given(
    results=st.lists(
        st.builds(
            res.StatementResult,
            status=st.sampled_from(res.Status),
            error=st.none() | st.text(),
            columns=st.none() | st.tuples(st.text(), st.text()),
            decltypes=st.tuples(st.none() | st.text()),
            rows=st.lists(st.tuples(VALUES, VALUES), max_size=3).map(tuple),
            rows_affected=st.none() | st.integers(0, 1 << 40),
            last_insert_id=st.none() | st.integers(-(1 << 63), (1 << 63) - 1),
            time_s=st.none() | st.floats(0, 100),
        ),
        max_size=4,
    )
)
def test_kept_results_decode_to_what_was_encoded(results):
    results = [
        dataclasses.replace(r, has_blobs=any(isinstance(v, bytes) for row in r.rows for v in row))
        for r in results
    ]
    encoded = res.encode_results(results)
    assert res.decode_results(encoded) == results
    assert res.encode_results(res.decode_results(encoded)) == encoded


async def test_a_retry_answers_infinities_and_blobs_exactly(tmp_path):
    """Regression: kept results went through JSON, where an infinity (SQLite's 1e999) became null."""
    database = await _fresh(tmp_path)
    try:
        sql = ["INSERT INTO t VALUES (7)", "SELECT 1e999, -1e999, x'00ff', 'text', 2.5"]
        (first,) = await database.apply(2, [_command(sql, client="c", request_id="inf", unified=True)])
        (again,) = await database.apply(3, [_command(sql, client="c", request_id="inf", unified=True)])
        assert again.duplicate
        assert (
            again.results[1].rows
            == first.results[1].rows
            == ((float("inf"), float("-inf"), b"\x00\xff", "text", 2.5),)
        )
    finally:
        await database.close()
