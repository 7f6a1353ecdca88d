"""Replicated /db/load on one replica's state machine: chunks stage, the end applies all or nothing.

Each test drives a real :class:`Database` with the commands a leader would replicate (through the codec, as
a follower decodes them), so what is checked is what every replica does at the same log index.
"""

from __future__ import annotations

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import sqlreq as q
from node.replication import codec
from node.storage import results as res
from node.storage import statemachine as sm
from node.storage.dump import chunk_statements
from node.storage.sqlite import Database, Limits, SqliteVersionRefused

VERSION = apsw.sqlite_lib_version()
T0 = 1_700_000_000_000_000_000


def _wire(command: sm.Command) -> sm.Command:
    """What a replica applies: the command after a trip through the payload codec."""
    return codec.decode_command(codec.encode_command(command))


def load_commands(
    statements: list[str], load_id: str = "L1", *, chunk_bytes: int = 80, request_id: str | None = None,
    client: str = "c", drop: int | None = None,
) -> list[sm.Command]:  # fmt: skip
    """The chunk commands and the end command a leader ships for ``statements`` (chunk ``drop`` lost)."""
    chunks = list(chunk_statements(statements, chunk_bytes, 1 << 20))
    digest = sm.LoadDigest()
    out = []
    for seq, chunk in enumerate(chunks):
        digest.update(chunk)
        if seq != drop:
            part = sm.LoadChunk(load_id, seq, tuple(chunk))
            out.append(_wire(sm.Command(q.WriteCommand((), False, 0, 0), sqlite_version=VERSION, load=part)))
    end = sm.LoadEnd(load_id, len(chunks), len(statements), digest.hexdigest())
    out.append(
        _wire(
            sm.Command(
                q.WriteCommand((), False, T0, 7), client=client, request_id=request_id, sqlite_version=VERSION,
                load=end,
            )  # fmt: skip
        )
    )
    return out


def write(sql: str) -> sm.Command:
    request = q.DbRequest((q.Statement(sql),), q.Flags())
    return _wire(sm.Command(q.stamp_write(request, time_ns=T0, seed=3), sqlite_version=VERSION))


async def fresh(path) -> Database:
    database = Database(path, limits=Limits(write_step_budget=200_000), queue_size=64)
    await database.open()
    return database


async def rows(database: Database, sql: str) -> list[tuple]:
    def run(job):
        return database._ops(job).internal(sql)

    return await database._write(run)


async def apply_all(database: Database, commands: list[sm.Command], first: int = 1):
    outcomes = []
    for i, command in enumerate(commands):
        (applied,) = await database.apply(first + i, [command])
        outcomes.append(applied)
    return outcomes


DUMP = [
    "PRAGMA foreign_keys=OFF;",
    "BEGIN TRANSACTION;",
    "CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);",
    "CREATE TABLE child (id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id));",
    "INSERT INTO child VALUES (1, 2);",  # before its parent: foreign keys are checked at the load's end
    "INSERT INTO parent VALUES (2, 'x;y');",
    "INSERT INTO parent VALUES (3, (datetime('now')));",
    "COMMIT;",
]


async def test_chunks_stage_only_and_the_end_applies_everything(tmp_path):
    database = await fresh(tmp_path)
    try:
        commands = load_commands(DUMP)
        assert len(commands) > 3, "the test needs several chunks"
        outcomes = await apply_all(database, commands[:-1])
        assert all(o.results == () for o in outcomes)
        assert await rows(database, "SELECT count(*) FROM sqlite_schema WHERE name = 'parent'") == [(0,)]
        (end,) = await apply_all(database, commands[-1:], first=len(commands))
        (result,) = end.results
        assert result.ok and result.rows_affected == 6  # the pragma counts; BEGIN and COMMIT are skipped
        assert await rows(database, "SELECT id, name FROM parent ORDER BY id") == [
            (2, "x;y"), (3, "2023-11-14 22:13:20"),
        ]  # fmt: skip
        assert await rows(database, f"SELECT count(*) FROM {sm.LOADS_TABLE}") == [(0,)]
        assert await database.applied_index() == len(commands)
    finally:
        await database.close()


async def test_a_failing_statement_in_a_later_chunk_leaves_nothing(tmp_path):
    database = await fresh(tmp_path)
    try:
        (before,) = await database.apply(1, [write("CREATE TABLE keep (x)")])
        assert before.results[0].ok
        dump = [*DUMP[2:6], "INSERT INTO parent VALUES (2, 'duplicate');"]
        commands = load_commands(dump, chunk_bytes=60)
        outcomes = await apply_all(database, commands, first=2)
        (result,) = outcomes[-1].results
        assert result.error is not None and "statement 5" in result.error and "nothing was loaded" in result.error
        assert await rows(database, "SELECT name FROM sqlite_schema WHERE name NOT LIKE '\\_%' ESCAPE '\\'") == [
            ("keep",)
        ]
        assert await rows(database, f"SELECT count(*) FROM {sm.LOADS_TABLE}") == [(0,)]
        assert await database.applied_index() == 1 + len(commands)  # the failed load still took its index
    finally:
        await database.close()


async def test_a_lost_chunk_fails_the_load_as_a_whole(tmp_path):
    database = await fresh(tmp_path)
    try:
        commands = load_commands(DUMP, drop=1)
        outcomes = await apply_all(database, commands)
        (result,) = outcomes[-1].results
        assert result.status is res.Status.ROLLED_BACK and "chunks" in result.error
        assert await rows(database, "SELECT count(*) FROM sqlite_schema WHERE name = 'parent'") == [(0,)]
    finally:
        await database.close()


async def test_a_foreign_key_violation_left_at_the_end_fails_the_load(tmp_path):
    database = await fresh(tmp_path)
    try:
        dump = [*DUMP[2:5]]  # the child row's parent never comes
        outcomes = await apply_all(database, load_commands(dump))
        (result,) = outcomes[-1].results
        assert result.error is not None and "FOREIGN KEY" in result.error
    finally:
        await database.close()


async def test_an_unfinished_load_is_dropped_by_the_next_and_writes_land_around_loads(tmp_path):
    database = await fresh(tmp_path)
    try:
        stale = load_commands(DUMP, "OLD")[:-2]  # its end never came (a leader change)
        index = len(stale)
        await apply_all(database, stale)
        assert (await rows(database, f"SELECT count(*) FROM {sm.LOADS_TABLE}"))[0][0] == len(stale)
        fresh_load = load_commands(["CREATE TABLE t (x);", "INSERT INTO t VALUES (1);"], "NEW")
        # An ordinary write between the chunks and the end sees nothing of the load.
        await apply_all(database, fresh_load[:-1], first=index + 1)
        index += len(fresh_load) - 1
        (w,) = await apply_all(database, [write("SELECT count(*) FROM t")], first=index + 1)
        assert w.results[0].error is not None and "no such table" in w.results[0].error
        await apply_all(database, fresh_load[-1:], first=index + 2)
        assert await rows(database, "SELECT x FROM t") == [(1,)]
        assert await rows(database, f"SELECT count(*) FROM {sm.LOADS_TABLE}") == [(0,)]
    finally:
        await database.close()


async def test_a_retried_load_with_the_same_request_id_applies_once(tmp_path):
    database = await fresh(tmp_path)
    try:
        dump = ["CREATE TABLE IF NOT EXISTS t (x);", "INSERT INTO t VALUES (1);"]
        first = await apply_all(database, load_commands(dump, "A", request_id="r-1"))
        second = await apply_all(database, load_commands(dump, "B", request_id="r-1"), first=10)
        assert not first[-1].duplicate and second[-1].duplicate
        assert second[-1].results == first[-1].results and second[-1].index == first[-1].index
        assert await rows(database, "SELECT count(*) FROM t") == [(1,)]
        assert await rows(database, f"SELECT count(*) FROM {sm.LOADS_TABLE}") == [(0,)]
        other = await apply_all(database, load_commands([*dump, "SELECT 1;"], "C", request_id="r-1"), first=20)
        assert other[-1].duplicate and "different request" in other[-1].results[0].error
    finally:
        await database.close()


async def test_commands_of_another_sqlite_version_are_refused_until_it_matches(tmp_path):
    database = await fresh(tmp_path)
    try:
        foreign = sm.Command(write("CREATE TABLE t (x)").write, sqlite_version="3.0.1")
        with pytest.raises(SqliteVersionRefused, match="3.0.1"):
            await database.apply(1, [foreign])
        assert database.apply_refused is not None and "3.0.1" in database.apply_refused
        assert await database.applied_index() == 0
        assert await rows(database, "SELECT count(*) FROM sqlite_schema WHERE name = 't'") == [(0,)]
        database.sqlite_version = "3.0.1"  # as if the node now ran that release
        (applied,) = await database.apply(1, [foreign])
        assert applied.results[0].ok and database.apply_refused is None
    finally:
        await database.close()


statement = st.sampled_from(
    [
        "INSERT INTO t VALUES (1);", "INSERT INTO t VALUES ('a;b');", "UPDATE t SET x = x + 1;",
        "DELETE FROM t WHERE x > 3;", "INSERT INTO t VALUES (abs(random()) % 10);",
        "INSERT INTO nowhere VALUES (1);", "INSERT INTO t VALUES (datetime('now'));",
    ]
)  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(statement, max_size=12), st.integers(30, 200))
async def test_a_load_is_all_or_nothing_and_independent_of_chunking(tmp_path_factory, dump, chunk_bytes):
    """Whatever the chunk size, the end gives the same outcome as running the dump as one transaction."""
    database = await fresh(tmp_path_factory.mktemp("db"))
    try:
        await database.apply(1, [write("CREATE TABLE t (x)")])
        outcomes = await apply_all(database, load_commands(dump, chunk_bytes=chunk_bytes), first=2)
        (result,) = outcomes[-1].results
        count = (await rows(database, "SELECT count(*) FROM t"))[0][0]
        expect_failure = any("nowhere" in s for s in dump)
        assert (result.error is not None) == expect_failure
        if expect_failure:
            assert count == 0
        else:
            assert result.rows_affected == len(dump)
    finally:
        await database.close()
