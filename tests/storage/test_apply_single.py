"""Applying a command of one statement (its command's savepoint is the statement's), and the command's seed and
time, made only when SQL asks for them: the outcomes are those of the general paths."""

from __future__ import annotations

import random

from node.core import sqlreq as q
from node.storage import results as res
from node.storage import statemachine as sm
from node.storage.sqlite import Database
from tests.storage import test_statemachine as base
from tests.storage.test_statemachine import TIME_NS, _command
from tests.support.dbapi import query

SCHEMA = (*base.SCHEMA, "CREATE TABLE r (n INTEGER PRIMARY KEY, v)")


async def _fresh(path) -> Database:
    return await base._fresh(path, schema=SCHEMA)


async def _rows(database: Database, sql: str) -> list:
    (result,) = await query(database, q.DbRequest((q.Statement(sql),), q.Flags()))
    return result.get("values", [])


async def test_a_failing_single_statement_undoes_only_itself_in_a_group(tmp_path):
    database = await _fresh(tmp_path)
    try:
        (outcomes,) = await database.apply_entries([sm.Entry(2, (
            _command(["INSERT INTO t VALUES (1)"]),
            # One statement holding two: the first one's row must go when the second fails.
            _command(["INSERT INTO t VALUES (2); INSERT INTO nowhere VALUES (1)"]),
            _command(["INSERT INTO t VALUES (3); INSERT INTO child VALUES (99)"]),  # deferred FK left violated
            _command(["INSERT INTO t VALUES (4); INSERT OR ROLLBACK INTO t VALUES (1)"]),  # drops the transaction
            _command(["INSERT INTO parent VALUES (7); INSERT INTO child VALUES (7)"]),
            _command(["INSERT INTO t VALUES (5)"]),
        ))])  # fmt: skip
        first, missing, fk, or_rollback, fk_ok, last = (o.results for o in outcomes)
        assert first[0].ok and last[0].ok and fk_ok[0].ok
        assert "no such table: nowhere" in missing[0].error
        assert fk[0].error == "FOREIGN KEY constraint failed"
        assert "UNIQUE constraint failed" in or_rollback[0].error
        assert await _rows(database, "SELECT x FROM t ORDER BY x") == [[1], [5]]
        assert await _rows(database, "SELECT p FROM child") == [[7]]
        assert await _rows(database, "SELECT id FROM parent") == [[7]]
        assert await database.applied_index() == 2
    finally:
        await database.close()


async def test_a_failed_single_statement_with_a_request_id_is_recorded_and_answered_again(tmp_path):
    database = await _fresh(tmp_path)
    try:
        failing = _command(
            ["INSERT INTO t VALUES (8); INSERT INTO child VALUES (98)"], client="c", request_id="a"
        )
        first, other = await database.apply(2, [failing, _command(["INSERT INTO t VALUES (9)"])])
        (again,) = await database.apply(3, [failing])
        assert first.results[0].error == "FOREIGN KEY constraint failed" and other.results[0].ok
        assert again.duplicate and again.index == 2 and again.results == first.results
        assert await _rows(database, "SELECT x FROM t ORDER BY x") == [[9]]
    finally:
        await database.close()


def _expected_random(seed: int, draws: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) - (1 << 63) for _ in range(draws)]


async def test_random_values_come_from_each_commands_own_seed(tmp_path):
    database = await _fresh(tmp_path)
    try:
        await database.apply_entries([
            sm.Entry(2, (
                _command(["INSERT INTO r VALUES (1, random())"], seed=11),
                # random() only in the second statement: still the seed's first value.
                _command(["INSERT INTO t VALUES (1)", "INSERT INTO r VALUES (2, random())",
                          "INSERT INTO r VALUES (3, random())"], seed=11),
                _command(["INSERT INTO t VALUES (2)"], seed=12),  # draws nothing
                _command(["INSERT INTO r VALUES (4, hex(randomblob(4))), (5, random())"], seed=13),
            )),
            sm.Entry(3, (_command(["INSERT INTO r VALUES (6, random())"], seed=11),)),
        ])  # fmt: skip
        values = dict(await _rows(database, "SELECT n, v FROM r"))
        first, second = _expected_random(11, 2)
        assert [values[1], values[2], values[3], values[6]] == [first, first, second, first]
        rng = random.Random(13)
        assert values[4] == rng.randbytes(4).hex().upper()
        assert values[5] == rng.getrandbits(64) - (1 << 63)
    finally:
        await database.close()


async def test_the_time_is_each_commands_own(tmp_path):
    database = await _fresh(tmp_path)
    later = TIME_NS + 86_400 * 10**9 + 1_500_000
    try:
        await database.apply_entries([sm.Entry(2, (
            _command(["INSERT INTO r VALUES (1, datetime('now'))"]),
            _command(["INSERT INTO r VALUES (2, strftime('%Y-%m-%d %H:%M:%f', 'now'))"], time_ns=later),
            _command(["INSERT INTO r VALUES (3, CURRENT_TIMESTAMP)"]),
        ))])  # fmt: skip
        values = dict(await _rows(database, "SELECT n, v FROM r"))
        assert values == {1: "2023-11-14 22:13:20", 2: "2023-11-15 22:13:20.001", 3: "2023-11-14 22:13:20"}
    finally:
        await database.close()


async def test_a_single_statement_over_the_budget_fails_alone(tmp_path):
    database = await _fresh(tmp_path)
    loop = (
        "INSERT INTO t SELECT n + 100000 FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c) "
        "SELECT n FROM c)"
    )
    try:
        (outcomes,) = await database.apply_entries([sm.Entry(2, (
            _command(["INSERT INTO t VALUES (1)"]), _command([loop]), _command(["INSERT INTO t VALUES (2)"]),
        ))])  # fmt: skip
        assert outcomes[1].results[0].status is res.Status.FAILED
        assert outcomes[1].results[0].error.startswith("write budget exceeded")
        assert await _rows(database, "SELECT x FROM t ORDER BY x") == [[1], [2]]
    finally:
        await database.close()


async def test_a_failing_first_statement_undoes_only_itself_and_later_ones_run(tmp_path):
    database = await _fresh(tmp_path)
    try:
        (outcomes,) = await database.apply_entries([sm.Entry(2, (
            _command(["INSERT INTO t VALUES (1)"]),
            _command([
                "INSERT INTO t VALUES (10); INSERT INTO child VALUES (97)",  # deferred FK: fails, undone whole
                "INSERT INTO t VALUES (11)",
                "INSERT INTO t VALUES (12); INSERT INTO nowhere VALUES (1)",
                "INSERT INTO t VALUES (13)",
            ]),
            _command(["INSERT INTO t VALUES (20); INSERT INTO nowhere VALUES (1)", "INSERT INTO t VALUES (21)"]),
        ))])  # fmt: skip
        first, mixed, failing_first = (o.results for o in outcomes)
        assert first[0].ok
        assert [r.error for r in mixed][:2] == ["FOREIGN KEY constraint failed", None]
        assert "no such table: nowhere" in mixed[2].error and mixed[3].ok
        assert "no such table: nowhere" in failing_first[0].error and failing_first[1].ok
        assert await _rows(database, "SELECT x FROM t ORDER BY x") == [[1], [11], [13], [21]]
        assert await _rows(database, "SELECT p FROM child") == []
    finally:
        await database.close()
