"""The data API through aiohttp's test client, against a real database in a temporary directory."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from node import auth
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import start_db_api

SECRET = "a-test-secret-that-is-long-enough-0123456789"
# Tokens below are minted when the module is imported, i.e. when pytest collects the whole suite, which can
# run for longer than any short lifetime: they live a day.
DAY_S = 86_400


def token(role: str) -> dict[str, str]:
    return {
        "Authorization": "Bearer " + auth.mint_jwt(SECRET, auth.Role.parse(role), now=time.time(), ttl_s=DAY_S)
    }


READ, WRITE, ADMIN = token("read"), token("write"), token("admin")


@pytest.fixture
async def api(tmp_path):
    database = Database(
        tmp_path / "data",
        limits=Limits(
            statement_timeout_s=2.0,
            max_result_rows=50,
            max_result_bytes=64 << 10,
            write_step_budget=2_000_000,
        ),
        queue_size=8,
    )
    await database.open()
    client = await start_db_api(
        database, secret=SECRET
    )
    try:
        yield client
    finally:
        await client.close()
        await database.close()


async def execute(api, body, query="", headers=WRITE, status=200):
    resp = await api.post(f"/db/execute{query}", json=body, headers=headers)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def select(api, sql, query=None, headers=READ):
    resp = await api.get("/db/query", params={"q": sql, **(query or {})}, headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["results"][0]


async def make_foo(api):
    await execute(
        api,
        ["CREATE TABLE foo (id INTEGER NOT NULL PRIMARY KEY, name TEXT, age INTEGER, data BLOB, score REAL)"],
    )


async def test_execute_and_query_shapes(api):
    body = await execute(api, ["CREATE TABLE foo (id INTEGER NOT NULL PRIMARY KEY, name TEXT, Age INTEGER)"])
    assert body == {"results": [{}]}
    body = await execute(
        api,
        [
            ["INSERT INTO foo(name, age) VALUES(?, ?)", "fiona", 20],
            ["INSERT INTO foo(name, age) VALUES(:name, :age)", {"name": "declan", "age": 30}],
            "UPDATE foo SET age = age + 1",
            "DELETE FROM foo WHERE 0",
        ],
    )
    assert body == {
        "results": [
            {"last_insert_id": 1, "rows_affected": 1},
            {"last_insert_id": 2, "rows_affected": 1},
            {"rows_affected": 2},
            {},
        ]
    }
    result = await select(api, "SELECT * FROM foo ORDER BY id")
    assert result == {
        "columns": ["id", "name", "Age"],
        "types": ["integer", "text", "integer"],
        "values": [[1, "fiona", 21], [2, "declan", 31]],
    }
    assert await select(api, "SELECT * FROM foo WHERE 0") == {
        "columns": ["id", "name", "Age"],
        "types": ["integer", "text", "integer"],
    }


async def test_values_round_trip(api):
    await make_foo(api)
    await execute(
        api,
        [
            [
                "INSERT INTO foo(name, age, data, score) VALUES(?, ?, ?, ?)",
                "ünï ☃ 日本",
                -(1 << 63),
                [0, 1, 255],
                1.5,
            ],
            [
                "INSERT INTO foo(name, age, data, score) VALUES(?, ?, ?, ?)",
                None,
                (1 << 63) - 1,
                "x'cafe'",
                None,
            ],
        ],
    )
    result = await select(api, "SELECT name, age, data, score FROM foo ORDER BY id")
    assert result["types"] == ["text", "integer", "blob", "real"]
    assert result["values"] == [
        ["ünï ☃ 日本", -(1 << 63), base64.b64encode(b"\x00\x01\xff").decode(), 1.5],
        [None, (1 << 63) - 1, base64.b64encode(b"\xca\xfe").decode(), None],
    ]
    result = await select(api, "SELECT data FROM foo ORDER BY id", {"blob_array": ""})
    assert result["values"] == [[[0, 1, 255]], [[202, 254]]]


async def test_associative_timings_pretty(api):
    await make_foo(api)
    await execute(api, [["INSERT INTO foo(name) VALUES(?)", "a"]])
    resp = await api.get(
        "/db/query",
        params={"q": "SELECT id, name FROM foo", "associative": "", "timings": "", "pretty": ""},
        headers=READ,
    )
    text = await resp.text()
    assert "\n  " in text
    body = await resp.json()
    assert isinstance(body["time"], float)
    result = body["results"][0]
    assert result["types"] == {"id": "integer", "name": "text"}
    assert result["rows"] == [{"id": 1, "name": "a"}]
    assert isinstance(result["time"], float)


async def test_statement_errors_are_inside_results(api):
    body = await execute(
        api, ["CREATE TABLE t (x)", "INSERT INTO nope VALUES(1)", "blah", "INSERT INTO t VALUES(1)"]
    )
    assert body["results"][0] == {}
    assert body["results"][1] == {"error": "no such table: nope"}
    assert body["results"][2] == {"error": 'near "blah": syntax error'}
    assert body["results"][3] == {"last_insert_id": 1, "rows_affected": 1}


async def test_transaction_is_all_or_nothing(api):
    await execute(api, ["CREATE TABLE t (x INTEGER UNIQUE)"])
    body = await execute(
        api,
        [
            "INSERT INTO t VALUES(1)",
            "INSERT INTO t VALUES(2)",
            "INSERT INTO t VALUES(1)",
            "INSERT INTO t VALUES(3)",
        ],
        query="?transaction",
    )
    # One result per statement, and none claims a stored change: all were rolled back.
    assert len(body["results"]) == 4
    assert all("error" in r for r in body["results"]), body
    assert body["results"][0]["error"].startswith("rolled back: statement 3 failed: UNIQUE constraint failed")
    assert "UNIQUE constraint failed" in body["results"][2]["error"]
    assert body["results"][3]["error"].startswith("not run: statement 3 failed")
    assert "values" not in await select(api, "SELECT * FROM t")
    body = await execute(api, ["INSERT INTO t VALUES(1)", "INSERT INTO t VALUES(2)"], query="?transaction")
    assert (await select(api, "SELECT count(*) FROM t"))["values"] == [[2]]


async def test_query_refuses_writes(api):
    await execute(api, ["CREATE TABLE t (x)"])
    for sql in ("INSERT INTO t VALUES(1)", "DROP TABLE t", "CREATE TABLE u (y)", "PRAGMA user_version = 3"):
        result = await select(api, sql)
        assert result == {"error": "attempt to change database via query operation"}, sql
    resp = await api.post("/db/query", json=["SELECT 1", "DELETE FROM t"], headers=READ)
    results = (await resp.json())["results"]
    assert results[0]["values"] == [[1]]
    assert results[1] == {"error": "attempt to change database via query operation"}
    assert (await select(api, "SELECT count(*) FROM t"))["values"] == [[0]]


async def test_unified_request(api):
    resp = await api.post(
        "/db/request",
        json=["CREATE TABLE t (x TEXT)", ["INSERT INTO t VALUES(?)", "a"], "SELECT * FROM t"],
        params={"associative": ""},
        headers=WRITE,
    )
    assert resp.status == 200
    assert (await resp.json())["results"] == [
        {"rows": None},
        {"last_insert_id": 1, "rows_affected": 1, "rows": None},
        {"types": {"x": "text"}, "rows": [{"x": "a"}]},
    ]


async def test_text_plain_body_is_one_statement(api):
    resp = await api.post(
        "/db/execute", data="CREATE TABLE t (x)", headers={**WRITE, "Content-Type": "text/plain"}
    )
    assert (await resp.json()) == {"results": [{}]}


async def test_guards_on_user_sql(api):
    body = await execute(
        api, ["ATTACH '/tmp/evil.db' AS evil", "BEGIN", "PRAGMA journal_mode=DELETE", "SAVEPOINT a"]
    )
    errors_ = [r["error"] for r in body["results"]]
    assert "ATTACH" in errors_[0]
    assert "transaction" in errors_[1] and "transaction" in errors_[3]
    assert "pragma journal_mode cannot be set" in errors_[2]


async def test_statement_time_limit(api):
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    result = await select(api, sql, {"db_timeout": "100ms"})
    assert result["error"].startswith("interrupted")
    body = await execute(
        api,
        ["CREATE TABLE t (x)", "INSERT INTO t " + sql.replace("SELECT count(*) FROM c", "SELECT x FROM c")],
    )
    # Writes are bounded by VM steps, not by a clock (the same outcome on every replica).
    assert body["results"][1]["error"].startswith("write budget exceeded: the request used more than 2000000")
    assert (await select(api, "SELECT count(*) FROM t"))["values"] == [[0]]


async def test_result_limits(api):
    result = await select(
        api, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 51) SELECT x FROM c"
    )
    assert "more than 50 rows" in result["error"]
    result = await select(api, "SELECT randomblob(30000), randomblob(30000)")
    assert "result too large" in result["error"]
    result = await select(api, "SELECT randomblob(1000000)")
    assert "too big" in result["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b'{"a": 1}', 400),
        (b"[]", 400),
        (b"[1, 2]", 400),
        (b'[["SELECT ?", {"a": [1, {"b": 2}]}]]', 400),
        (b"\xff\xfe\x00garbage", 400),
        (b'["\\ud800"]', 400),
        (b"[" + b",".join([b'"SELECT 1"'] * 21) + b"]", 413),
        (b'["' + b"x" * (40 << 10) + b'"]', 413),
    ],
)
async def test_bad_bodies(api, body, status):
    for path in ("/db/execute", "/db/query", "/db/request"):
        resp = await api.post(path, data=body, headers={**WRITE, "Content-Type": "application/json"})
        assert resp.status == status, (path, await resp.text())
        assert "error" in await resp.json()


async def test_binary_text_plain_is_400(api):
    resp = await api.post("/db/execute", data=b"\xff\xfe", headers={**WRITE, "Content-Type": "text/plain"})
    assert resp.status == 400


async def test_get_query_needs_q(api):
    resp = await api.get("/db/query", headers=READ)
    assert resp.status == 400
    assert (await resp.json())["error"] == "query parameter not set"


async def test_wrong_method_is_405(api):
    resp = await api.get("/db/execute", headers=WRITE)
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]


async def test_slow_body_is_408(api):
    async def trickle():
        yield b'["SELECT 1"'
        await asyncio.sleep(2)
        yield b"]"

    resp = await api.post(
        "/db/execute", data=trickle(), headers={**WRITE, "Content-Type": "application/json"}
    )
    assert resp.status == 408


async def test_auth_statuses(api):
    resp = await api.get("/db/query", params={"q": "SELECT 1"})
    assert resp.status == 401
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    assert (await resp.json())["code"] == "unauthorized"
    resp = await api.get("/db/query", params={"q": "SELECT 1"}, headers={"Authorization": "Bearer x.y.z"})
    assert resp.status == 401
    expired = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=time.time() - 3600, ttl_s=60)
    resp = await api.get(
        "/db/query", params={"q": "SELECT 1"}, headers={"Authorization": f"Bearer {expired}"}
    )
    assert resp.status == 401
    resp = await api.post("/db/execute", json=["CREATE TABLE t (x)"], headers=READ)
    assert resp.status == 403
    assert (await resp.json())["code"] == "forbidden"
    resp = await api.post("/db/request", json=["SELECT 1"], headers=READ)
    assert resp.status == 403
    resp = await api.get("/db/backup", headers=WRITE)
    assert resp.status == 403
    resp = await api.post("/db/load", data=b"CREATE TABLE t (x);", headers=WRITE)
    assert resp.status == 403
    compact = auth.mint_compact(SECRET, auth.Role.READ, now=time.time(), ttl_s=60)
    basic = "Basic " + base64.b64encode(f"app:{compact}".encode()).decode()
    resp = await api.get("/db/query", params={"q": "SELECT 1"}, headers={"Authorization": basic})
    assert resp.status == 200


async def test_unauthenticated_big_body_is_401_not_read(api):
    resp = await api.post("/db/load", data=b"x" * (2 << 20))
    assert resp.status in (401, 413)


async def test_readyz_is_public(api):
    resp = await api.get("/readyz")
    assert resp.status == 200
    assert "[+]store ok" in await resp.text()


async def test_backup_and_load_round_trip(api):
    await make_foo(api)
    await execute(api, [["INSERT INTO foo(name, data) VALUES(?, ?)", "kept", [1, 2]]])
    written = await api.post("/db/execute", json=[["INSERT INTO foo(name) VALUES(?)", "second"]], headers=ADMIN)
    resp = await api.get("/db/backup", headers=ADMIN)
    assert resp.status == 200
    # The applied index the copy reflects: that of the last write before it.
    assert resp.headers["X-TalentNest-Applied-Index"] == written.headers["X-TalentNest-Index"]
    backup = await resp.read()
    assert backup.startswith(b"SQLite format 3\x00")
    await execute(api, ["DELETE FROM foo", "CREATE TABLE extra (x)"])
    resp = await api.post("/db/load", data=backup, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await select(api, "SELECT name FROM foo ORDER BY id"))["values"] == [["kept"], ["second"]]
    assert "no such table" in (await select(api, "SELECT * FROM extra"))["error"]
    await execute(api, [["INSERT INTO foo(name) VALUES(?)", "after load"]])
    assert (await select(api, "SELECT count(*) FROM foo"))["values"] == [[3]]


async def test_load_dump_is_atomic(api):
    dump = b"""PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE d (x TEXT);
INSERT INTO d VALUES('a;b');
INSERT INTO d VALUES('it''s');
COMMIT;
"""
    resp = await api.post("/db/load", data=dump, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await select(api, "SELECT x FROM d ORDER BY x"))["values"] == [["a;b"], ["it's"]]
    resp = await api.post(
        "/db/load",
        data=b"CREATE TABLE e (x); INSERT INTO e VALUES(1); INSERT INTO nope VALUES(2);",
        headers=ADMIN,
    )
    assert resp.status == 400
    assert "no such table" in (await select(api, "SELECT * FROM e"))["error"]


async def test_a_dump_that_rolls_back_is_refused_and_loads_nothing(api):
    """sqlite3's .dump ends with ROLLBACK when it met errors; a load is one transaction, so the dump is
    refused rather than its rolled-back statements stored (found by a hostile probe)."""
    dump = b"CREATE TABLE ld (a);\nBEGIN TRANSACTION;\nINSERT INTO ld VALUES('rolled-back');\nROLLBACK;\n"
    resp = await api.post("/db/load", data=dump, headers={**ADMIN, "Content-Type": "text/plain"})
    assert resp.status == 400, await resp.text()
    assert "rolls back" in (await resp.json())["error"]
    assert "no such table" in (await select(api, "SELECT * FROM ld"))["error"]


async def test_load_rejects_corrupt_sqlite_file(api):
    await make_foo(api)
    garbage = b"SQLite format 3\x00" + b"\x13" * 5000
    resp = await api.post("/db/load", data=garbage, headers=ADMIN)
    assert resp.status == 400
    assert "invalid SQLite data" in (await resp.json())["error"]
    assert (await select(api, "SELECT count(*) FROM foo"))["values"] == [[0]]


async def test_busy_queue_is_503(api):
    """Every reader is held by a blocker; a client may queue half the read queue (4), the node 8 in all."""
    import threading

    release = threading.Event()
    database = api.database
    blockers = [
        asyncio.create_task(database._read(f"blocker-{i}", lambda job, slot: release.wait(30)))
        for i in range(4)
    ]
    other = {  # another credential string: another client
        "Authorization": "Bearer " + auth.mint_jwt(SECRET, auth.Role.READ, now=time.time(), ttl_s=299)
    }
    waiting = []
    try:
        for _ in range(1000):  # at most ~10 s
            if database.snapshot()["reads_running"] == 4:
                break
            await asyncio.sleep(0.01)
        assert database.snapshot()["reads_running"] == 4
        waiting = [
            asyncio.create_task(api.get("/db/query", params={"q": "SELECT 1"}, headers=READ))
            for _ in range(4)
        ]
        for _ in range(1000):
            if database.snapshot()["reads_waiting"] >= 4:
                break
            await asyncio.sleep(0.01)
        assert database.snapshot()["reads_waiting"] == 4
        resp = await api.get("/db/query", params={"q": "SELECT 1"}, headers=READ)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "busy"
        assert "this client" in (await resp.json())["error"]
        waiting += [
            asyncio.create_task(api.get("/db/query", params={"q": "SELECT 1"}, headers=other))
            for _ in range(4)
        ]
        for _ in range(1000):
            if database.snapshot()["reads_waiting"] >= 8:
                break
            await asyncio.sleep(0.01)
        assert database.snapshot()["reads_waiting"] == 8
        resp = await api.get("/db/query", params={"q": "SELECT 1"}, headers=WRITE)
        assert resp.status == 503
        assert "read queue is full" in (await resp.json())["error"]
    finally:
        release.set()
    assert [await b for b in blockers] == [True] * 4
    assert [(await t).status for t in waiting] == [200] * 8


@pytest.mark.parametrize("level", ["none", "weak", "linearizable", "strong", "auto", "bogus", ""])
async def test_levels_and_redirect_are_accepted_and_read_locally(api, level):
    await execute(api, ["CREATE TABLE t (x)", "INSERT INTO t VALUES(7)"], query="?redirect")
    result = await select(api, "SELECT x FROM t", {"level": level, "redirect": ""})
    assert result["values"] == [[7]]


async def test_garbage_never_crashes_the_node(api):
    """A fixed-seed stream of random bodies, content types and flags: every answer is a JSON 2xx/4xx."""
    import random

    rng = random.Random(20261126)
    fragments = [
        b"[",
        b"]",
        b'"',
        b",",
        b"{",
        b"}",
        b":",
        b"SELECT",
        b" ",
        b"?",
        b"null",
        b"1e999",
        b"\\u0000",
        b"x'",
        b"-",
    ]
    await execute(api, ["CREATE TABLE t (x)"])
    for _ in range(150):
        if rng.random() < 0.5:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:
            body = b"".join(rng.choice(fragments) for _ in range(rng.randrange(0, 24)))
        path = rng.choice(["/db/execute", "/db/query", "/db/request"])
        ctype = rng.choice(["application/json", "text/plain", "application/octet-stream"])
        query = rng.choice(["", "?transaction", "?associative&timings", "?db_timeout=bogus", "?level=strong"])
        resp = await api.post(path + query, data=body, headers={**WRITE, "Content-Type": ctype})
        assert resp.status in (200, 400, 413), (path, body, resp.status)
        payload = await resp.json()
        assert "results" in payload if resp.status == 200 else "error" in payload
    assert (await select(api, "SELECT 1"))["values"] == [[1]]


async def test_last_insert_id_is_this_statements(api):
    await execute(api, ["CREATE TABLE kv (id INTEGER PRIMARY KEY, v TEXT)"])
    assert (await execute(api, ["INSERT INTO kv VALUES(5, 'a')"]))["results"] == [
        {"last_insert_id": 5, "rows_affected": 1}
    ]
    assert (await execute(api, ["UPDATE kv SET v = 'b'"]))["results"] == [{"rows_affected": 1}]
    body = await execute(api, ["REPLACE INTO kv VALUES(5, 'c')", "CREATE TABLE other (x)"])
    assert body["results"] == [{"last_insert_id": 5, "rows_affected": 1}, {}]
    body = await execute(
        api, [["INSERT INTO kv(v) VALUES(?)", "d"], "INSERT INTO kv(v) VALUES(last_insert_rowid())"]
    )
    assert body["results"] == [
        {"last_insert_id": 6, "rows_affected": 1},
        {"last_insert_id": 7, "rows_affected": 1},
    ]
    assert (await select(api, "SELECT v FROM kv WHERE id = 7"))["values"] == [["6"]]


async def test_a_client_that_disconnects_stops_its_running_and_queued_reads(tmp_path):
    """With handler_cancellation (as the node's server runs), a disconnect cancels the handler: the running
    read is interrupted and the queued one dropped, long before the read time limit (60 s here)."""
    database = Database(tmp_path / "data", limits=Limits(statement_timeout_s=60, readers=1), queue_size=8)
    await database.open()
    client = await start_db_api(
        database, secret=SECRET, handler_cancellation=True
    )
    runaway = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r"
    try:
        requests = [
            asyncio.create_task(client.get("/db/query", params={"q": runaway}, headers=READ))
            for _ in range(2)
        ]
        for _ in range(1000):
            snapshot = database.snapshot()
            if snapshot["reads_running"] == 1 and snapshot["reads_waiting"] == 1:
                break
            await asyncio.sleep(0.01)
        assert database.snapshot() | {"writes_queued": 0} == {
            "reads_running": 1, "reads_waiting": 1, "writes_queued": 0, "write_running": 0,
        }  # fmt: skip
        for task in requests:
            task.cancel()  # closes the client's connections
        await asyncio.gather(*requests, return_exceptions=True)
        for _ in range(1000):
            snapshot = database.snapshot()
            if snapshot["reads_running"] == 0 and snapshot["reads_waiting"] == 0:
                break
            await asyncio.sleep(0.01)
        assert database.snapshot()["reads_running"] == 0 and database.snapshot()["reads_waiting"] == 0
        assert (await select(client, "SELECT 3"))["values"] == [[3]]
    finally:
        await client.close()
        await database.close()


def _temp_files(api) -> list[str]:
    return [p.name for p in api.database.data_dir.iterdir() if p.name.startswith(".tmp-")]


async def test_a_dumps_foreign_keys_off_holds_for_that_load_only(api):
    dump = b"""PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE parent (id INTEGER PRIMARY KEY);
CREATE TABLE child (p INTEGER REFERENCES parent(id));
INSERT INTO child VALUES (42);
COMMIT;
"""
    resp = await api.post("/db/load", data=dump, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    # The orphan row loaded (the dump said so), but the next request's writes are checked again.
    body = await execute(api, ["INSERT INTO child VALUES (43)"])
    assert "FOREIGN KEY constraint failed" in body["results"][0]["error"]
    assert (await select(api, "PRAGMA foreign_keys"))["values"] == [[1]]
    # Without the pragma the same orphan is refused, and nothing of that dump stays.
    resp = await api.post(
        "/db/load", data=b"CREATE TABLE other (x); INSERT INTO child VALUES (44);", headers=ADMIN
    )
    assert resp.status == 400 and "FOREIGN KEY" in (await resp.json())["error"]
    assert "no such table" in (await select(api, "SELECT * FROM other"))["error"]
    assert _temp_files(api) == []


@pytest.mark.parametrize(
    "pragma",
    ["PRAGMA cache_size=1", "PRAGMA writable_schema=ON", "PRAGMA recursive_triggers(1)", "PRAGMA optimize"],
)
async def test_other_connection_pragmas_in_a_dump_are_refused_naming_them(api, pragma):
    dump = f"CREATE TABLE d (x);\n{pragma};\nINSERT INTO d VALUES (1);\n".encode()
    resp = await api.post("/db/load", data=dump, headers=ADMIN)
    assert resp.status == 400
    body = await resp.json()
    name = pragma.split()[1].split("=")[0].split("(")[0]
    assert f"pragma {name}" in body["error"] and body["code"] == "bad_request"
    assert "no such table" in (await select(api, "SELECT * FROM d"))["error"]
    assert _temp_files(api) == []


async def test_the_upload_file_is_removed_whatever_happens(api):
    await make_foo(api)
    resp = await api.post("/db/load", data=b"x" * (2 << 20), headers=ADMIN)
    assert resp.status == 413
    resp = await api.post("/db/load", data=b"SQLite format 3\x00" + b"\x13" * 5000, headers=ADMIN)
    assert resp.status == 400
    resp = await api.post("/db/load", data=b"   \n ", headers=ADMIN)
    assert resp.status == 400 and "empty" in (await resp.json())["error"]
    resp = await api.post("/db/load", data=b"INSERT INTO foo(name) VALUES ('x');", headers=ADMIN)
    assert resp.status == 200
    resp = await api.get("/db/backup", headers=ADMIN)
    backup = await resp.read()
    resp = await api.post("/db/load", data=backup, headers=ADMIN)
    assert resp.status == 200
    assert _temp_files(api) == []
    assert (await select(api, "SELECT name FROM foo"))["values"] == [["x"]]
