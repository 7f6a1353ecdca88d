"""One request must not change the database for the requests after it (pragmas, TEMP objects).

The probe reads each connection's settings directly on its own thread (bypassing the authorizer), so a
change that the API hides would still show.
"""

from __future__ import annotations

import asyncio
import contextlib

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import sqlreq as q
from node.storage import pragmas
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import execute, query

PROBED_SETTINGS = (
    "foreign_keys", "ignore_check_constraints", "max_page_count", "cache_size", "recursive_triggers",
    "reverse_unordered_selects", "query_only", "defer_foreign_keys", "automatic_index", "journal_mode",
    "synchronous", "legacy_alter_table", "trusted_schema", "cell_size_check", "secure_delete", "temp_store",
    "busy_timeout", "mmap_size", "locking_mode", "wal_autocheckpoint", "soft_heap_limit", "hard_heap_limit",
    "threads", "analysis_limit", "writable_schema", "journal_size_limit", "cache_spill", "count_changes",
    "full_column_names", "short_column_names", "empty_result_callbacks", "page_size", "encoding",
    "auto_vacuum", "schema_version",
)  # fmt: skip

with contextlib.closing(apsw.Connection(":memory:")) as _conn:
    SQLITE_PRAGMAS = sorted(row[0] for row in _conn.execute("PRAGMA pragma_list"))


def _probe_conn(conn: apsw.Connection) -> dict[str, object]:
    state: dict[str, object] = {}
    for name in PROBED_SETTINGS:
        state[name] = conn.execute(f"PRAGMA {name}").fetchall()
    state["like_is_case_insensitive"] = conn.execute("SELECT 'a' LIKE 'A'").fetchall()
    state["temp_objects"] = conn.execute("SELECT count(*) FROM temp.sqlite_schema").fetchall()
    state["main_objects"] = conn.execute("SELECT type, name FROM sqlite_schema ORDER BY name").fetchall()
    return state


def _probe_slot(slot) -> dict[str, object]:
    slot.internal = True  # the probe itself may read anything
    try:
        return _probe_conn(slot.conn)
    finally:
        slot.internal = False


async def probe(database: Database) -> dict[str, object]:
    """Every connection's state: the writer's, and each reader's (held at once, so each is probed)."""
    writer = await database._write(lambda job: _probe_slot(database._writer))
    readers = await asyncio.gather(
        *(
            database._read(f"probe-{i}", lambda job, slot: _probe_slot(slot))
            for i in range(len(database._readers))
        )
    )
    return {"writer": writer, "readers": sorted(map(repr, readers))}


def _command(*sqls: str) -> q.WriteCommand:
    request = q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags())
    return q.stamp_write(request, time_ns=1_700_000_000_000_000_000, seed=7)


def _read(*sqls: str) -> q.DbRequest:
    return q.DbRequest(tuple(q.Statement(s) for s in sqls), q.Flags())


@pytest.fixture
async def database(tmp_path):
    db = Database(tmp_path / "data", limits=Limits(readers=2, readers_per_client=2), queue_size=16)
    await db.open()
    await execute(db,
        _command(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE child (id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id), n INT CHECK (n > 0))",
            "CREATE TABLE words (w TEXT)",
            "INSERT INTO words VALUES ('Apple'), ('apple')",
        ),
        q.Flags(),
    )
    try:
        yield db
    finally:
        await db.close()


async def test_a_write_client_cannot_turn_off_constraints_for_everyone(database):
    results = await execute(database,
        _command("PRAGMA foreign_keys=OFF", "PRAGMA ignore_check_constraints=ON"), q.Flags()
    )
    assert results == [
        {"error": "pragma foreign_keys cannot be set: it changes the connection for every client"},
        {
            "error": "pragma ignore_check_constraints cannot be set: it changes the connection for every client"
        },
    ]
    # Another request afterwards: both constraints still hold.
    results = await execute(database,
        _command("INSERT INTO child(p, n) VALUES (42, 1)", "INSERT INTO child(p, n) VALUES (NULL, -1)"),
        q.Flags(),
    )
    assert "FOREIGN KEY constraint failed" in results[0]["error"]
    assert "CHECK constraint failed" in results[1]["error"]


async def test_max_page_count_cannot_make_later_writes_fail(database):
    results = await execute(database, _command("PRAGMA max_page_count=1"), q.Flags())
    assert "pragma max_page_count cannot be set" in results[0]["error"]
    results = await execute(database,
        _command("INSERT INTO words SELECT hex(randomblob(1000)) FROM words, words, words, words, words"),
        q.Flags(),
    )
    assert results == [{"last_insert_id": 34, "rows_affected": 32}]


async def test_a_read_client_cannot_change_like_for_other_readers(database):
    for value in ("ON", "OFF", "1", "true"):
        for form in (f"PRAGMA case_sensitive_like={value}", f"PRAGMA case_sensitive_like({value})"):
            results = await query(database, _read(form), client="a")
            assert results[0]["error"].startswith("pragma case_sensitive_like cannot be set"), form
    results = await query(database, _read("SELECT count(*) FROM words WHERE w LIKE 'apple'"), client="b")
    assert results[0]["values"] == [[2]]


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA cache_size=1",
        "PRAGMA cache_size(1)",
        "PRAGMA main.cache_size=1",
        "PRAGMA main.cache_size(-4000)",
        "PRAGMA recursive_triggers=ON",
        "PRAGMA query_only=OFF",
        "PRAGMA reverse_unordered_selects=1",
        "PRAGMA journal_mode=DELETE",
        "PRAGMA optimize",
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "PRAGMA shrink_memory",
        "PRAGMA no_such_pragma=1",
        "PRAGMA incremental_vacuum",
        "CREATE TEMP TABLE words (w)",
        "CREATE TABLE temp.words (w)",
        "CREATE TEMP VIEW v AS SELECT 1",
        "CREATE TEMP TRIGGER t AFTER INSERT ON main.words BEGIN DELETE FROM main.words; END",
    ],
)
async def test_connection_changes_are_refused_on_both_connections(database, sql):
    before = await probe(database)
    written = await execute(database, _command(sql), q.Flags())
    read = await query(database, _read(sql), client="a")
    assert "error" in written[0] and "error" in read[0], (written, read)
    if sql.startswith("PRAGMA"):
        name = sql.split()[1].split("=")[0].split("(")[0].removeprefix("main.")
        assert f"pragma {name}" in written[0]["error"]
    assert await probe(database) == before


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA foreign_keys",
        "PRAGMA cache_size",
        "PRAGMA main.page_size",
        "PRAGMA table_info(words)",
        "PRAGMA table_info('words')",
        "PRAGMA main.table_xinfo(words)",
        "PRAGMA integrity_check",
        "PRAGMA quick_check(10)",
        "PRAGMA foreign_key_check",
        "PRAGMA index_list(words)",
        "PRAGMA compile_options",
        "PRAGMA user_version",
        "SELECT * FROM pragma_table_info('words')",
        "SELECT * FROM pragma_foreign_keys",
        "SELECT * FROM pragma_pragma_list LIMIT 1",
        "SELECT name FROM pragma_table_list WHERE schema = 'main'",
    ],
)
async def test_reading_pragmas_stays_allowed(database, sql):
    read = await query(database, _read(sql), client="a")
    assert "error" not in read[0], read
    written = await execute(database, _command(sql), q.Flags())
    assert "error" not in written[0], written


async def test_file_fields_are_ordinary_writes(database):
    assert await execute(database,
        _command("PRAGMA user_version=7", "PRAGMA application_id(9)"), q.Flags()
    ) == [
        {},
        {},
    ]
    read = await query(database,
        _read("PRAGMA user_version", "PRAGMA application_id", "PRAGMA user_version=8")
    )
    assert read[:2] == [
        {"columns": ["user_version"], "types": [""], "values": [[7]]},
        {"columns": ["application_id"], "types": [""], "values": [[9]]},
    ]
    assert read[2] == {"error": "attempt to change database via query operation"}


def test_the_allow_list_only_names_real_pragmas():
    known = set(SQLITE_PRAGMAS)
    assert (pragmas.REPORTS | pragmas.SETTINGS | pragmas.FILE_FIELDS) - known <= {
        "count_changes",
        "full_column_names",
        "short_column_names",
        "empty_result_callbacks",
    }  # deprecated, compiled out


_VALUES = st.sampled_from(
    ["0", "1", "ON", "OFF", "-1", "100", "'x'", "DELETE", "MEMORY", "NORMAL", "2", "words"]
)
_NAMES = st.one_of(
    st.sampled_from(SQLITE_PRAGMAS),
    st.sampled_from(sorted(pragmas.SETTINGS)),
    st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
)
_SET_FORMS = ("PRAGMA {name}={value}", "PRAGMA {name}({value})", "PRAGMA main.{name}={value}")
_FORMS = st.sampled_from(
    [
        "PRAGMA {name}={value}",
        "PRAGMA {name}({value})",
        "PRAGMA main.{name}={value}",
        "PRAGMA {name}",
        "SELECT * FROM pragma_{name}({value})",
        "SELECT * FROM pragma_{name}",
    ]
)


def test_no_pragma_changes_any_connection(tmp_path):
    """Random pragmas, values and forms through both connections: no probed setting moves."""
    loop = asyncio.new_event_loop()
    database = Database(tmp_path / "data", limits=Limits(readers=2, readers_per_client=2), queue_size=16)
    try:
        loop.run_until_complete(database.open())
        loop.run_until_complete(
            execute(database,
                _command("CREATE TABLE words (w TEXT)", "INSERT INTO words VALUES ('a')"), q.Flags()
            )
        )
        baseline = loop.run_until_complete(probe(database))

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(form=_FORMS, name=_NAMES, value=_VALUES, via_write=st.booleans())
        def one(form, name, value, via_write):
            sql = form.format(name=name, value=value)
            if via_write:
                loop.run_until_complete(execute(database, _command(sql), q.Flags()))
            else:
                loop.run_until_complete(query(database, _read(sql), client="fuzz"))
            after = loop.run_until_complete(probe(database))
            # user_version/application_id are file content, not connection state: allowed to change.
            assert after == baseline, sql

        one()
    finally:
        loop.run_until_complete(database.close())
        loop.close()


def test_every_sqlite_pragma_with_every_value_leaves_every_connection_as_it_was(tmp_path):
    """The whole class, exhaustively: each pragma SQLite knows, each value, each setting form, both
    connections; then one probe (a change would persist until it)."""
    loop = asyncio.new_event_loop()
    database = Database(tmp_path / "data", limits=Limits(readers=1), queue_size=16)
    values = ["0", "1", "ON", "OFF", "-1", "100", "'x'", "DELETE", "MEMORY", "NORMAL", "2", "EXCLUSIVE"]
    try:
        loop.run_until_complete(database.open())
        loop.run_until_complete(execute(database, _command("CREATE TABLE words (w TEXT)"), q.Flags()))
        baseline = loop.run_until_complete(probe(database))
        sqls = [
            form.format(name=name, value=value)
            for name in SQLITE_PRAGMAS
            if name not in pragmas.FILE_FIELDS
            for value in values
            for form in _SET_FORMS
        ]
        for start in range(0, len(sqls), 200):  # the node's own cap on statements per request is higher
            batch = sqls[start : start + 200]
            written = loop.run_until_complete(execute(database, _command(*batch), q.Flags()))
            read = loop.run_until_complete(query(database, _read(*batch), client="sweep"))
            allowed = [
                s for s, r in zip(batch * 2, written + read, strict=True)
                if "error" not in r and s.split()[1].split("=")[0].split("(")[0].removeprefix("main.")
                not in pragmas.REPORTS
            ]  # fmt: skip
            assert allowed == []
        assert loop.run_until_complete(probe(database)) == baseline
    finally:
        loop.run_until_complete(database.close())
        loop.close()
