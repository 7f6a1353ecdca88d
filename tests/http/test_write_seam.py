"""Writes through the data service: the log index header, request IDs (at most once), and an event loop that
stays free while a large write is stamped."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth, service
from node.storage import sqlite as storage_sqlite
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import start_db_api

SECRET = "a-test-secret-that-is-long-enough-0123456789"
# Tokens below are minted when the module is imported, i.e. when pytest collects the whole suite, which can
# run for longer than any short lifetime: they live a day.
DAY_S = 86_400


def token(role: auth.Role, now: float | None = None) -> dict[str, str]:
    minted = auth.mint_jwt(SECRET, role, now=now or time.time(), ttl_s=DAY_S)
    return {"Authorization": "Bearer " + minted}


WRITE = token(auth.Role.WRITE)
OTHER_WRITE = token(auth.Role.WRITE, now=time.time() - 5)  # another credential of the same role
ADMIN = token(auth.Role.ADMIN)


@pytest.fixture
async def api(tmp_path):
    database = Database(tmp_path / "data", limits=Limits(write_step_budget=10**9), queue_size=64)
    await database.open()
    client = await start_db_api(
        database, secret=SECRET, max_body_bytes=16 << 20, max_load_bytes=16 << 20, body_read_timeout_s=30
    )
    try:
        yield client
    finally:
        await client.close()
        await database.close()


async def post(api, body, *, headers=WRITE, path="/db/execute", request_id=None):
    headers = dict(headers)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    resp = await api.post(path, json=body, headers=headers)
    return resp.status, resp.headers, await resp.json()


async def count(api) -> int:
    resp = await api.get("/db/query", params={"q": "SELECT count(*) FROM t"}, headers=WRITE)
    return (await resp.json())["results"][0]["values"][0][0]


async def test_every_write_answers_the_index_that_committed_it(api):
    indices = []
    for sql in ("CREATE TABLE t (x)", "INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)"):
        status, headers, _ = await post(api, [sql])
        assert status == 200
        indices.append(int(headers["X-TalentNest-Index"]))
    status, headers, _ = await post(api, ["SELECT 1"], path="/db/request")
    indices.append(int(headers["X-TalentNest-Index"]))
    resp = await api.post("/db/load", data=b"INSERT INTO t VALUES (3);", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    indices.append(int(resp.headers["X-TalentNest-Index"]))
    assert indices == sorted(indices) and len(set(indices)) == len(indices) and indices[0] >= 1
    assert await api.database.applied_index() == indices[-1]
    # Reads commit nothing and carry no index.
    resp = await api.get("/db/query", params={"q": "SELECT 1"}, headers=WRITE)
    assert "X-TalentNest-Index" not in resp.headers


async def test_a_retried_write_is_applied_once_and_answers_the_same(api):
    await post(api, ["CREATE TABLE t (x)"])
    body = ["INSERT INTO t VALUES (random())"]
    first = await post(api, body, request_id="order-17")
    again = await post(api, body, request_id="order-17")
    assert first[0] == again[0] == 200
    assert first[2] == again[2] and first[1]["X-TalentNest-Index"] == again[1]["X-TalentNest-Index"]
    assert await count(api) == 1
    # The same ID from another credential is another request.
    other = await post(api, body, headers=OTHER_WRITE, request_id="order-17")
    assert other[0] == 200 and other[1]["X-TalentNest-Index"] != first[1]["X-TalentNest-Index"]
    assert await count(api) == 2
    # Without an ID every request is applied.
    await post(api, body)
    await post(api, body)
    assert await count(api) == 4


async def test_concurrent_duplicates_apply_once(api):
    await post(api, ["CREATE TABLE t (x)"])
    body = ["INSERT INTO t VALUES (random())"]
    answers = await asyncio.gather(*(post(api, body, request_id="burst") for _ in range(12)))
    assert {a[0] for a in answers} == {200}
    assert len({str(a[2]) for a in answers}) == 1
    assert len({a[1]["X-TalentNest-Index"] for a in answers}) == 1
    assert await count(api) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(value=st.text(max_size=200))
def test_any_request_id_is_accepted_or_a_json_400(tmp_path_factory, value):
    async def run() -> None:
        database = Database(tmp_path_factory.mktemp("rid"), limits=Limits(), queue_size=8)
        await database.open()
        api = await start_db_api(database, secret=SECRET)
        try:
            raw = value.encode("utf-8", "surrogateescape").decode("latin-1")
            try:
                resp = await api.post(
                    "/db/execute", json=["SELECT 1"], headers={**WRITE, "X-Request-Id": raw}
                )
            except ValueError:  # the client library refuses to send it (a newline): nothing to check
                return
            body = await resp.json()
            valid = 0 < len(raw) <= 128 and all("!" <= ch <= "~" for ch in raw)
            if valid:
                assert resp.status == 200, body
            else:
                assert resp.status == 400 and body["code"] == "bad_request", body
        finally:
            await api.close()
            await database.close()

    asyncio.run(run())


# --- the event loop while large SQL is stamped -------------------------------------------------------------


def _big_statement(mib: int = 4) -> str:
    values = ",(CURRENT_TIMESTAMP)" * (mib * (1 << 20) // 20)
    return "INSERT INTO t VALUES (1)" + values


async def test_stamping_never_runs_on_the_event_loop(api, monkeypatch):
    """While a 4 MiB statement is held in the middle of its stamping, /readyz answers: the stamp is on another
    thread. (If it ran on the loop, the probe could not be served and the stamp would time out waiting.)"""
    await post(api, ["CREATE TABLE t (x)"])
    loop_thread = threading.get_ident()
    stamping = threading.Event()
    probed = threading.Event()
    threads: list[int] = []
    real = service.stamp_write

    def held_stamp(*args, **kwargs):
        threads.append(threading.get_ident())
        stamping.set()
        held = probed.wait(30)
        result = real(*args, **kwargs)
        assert held, "the probe was not answered while the stamp was held"
        return result

    monkeypatch.setattr(service, "stamp_write", held_stamp)
    write = asyncio.create_task(post(api, [_big_statement()]))
    assert await asyncio.to_thread(stamping.wait, 30)
    resp = await api.get("/readyz?noleader")
    assert resp.status == 200, await resp.text()
    probed.set()
    status, headers, body = await asyncio.wait_for(write, 120)
    assert status == 200 and body["results"][0]["rows_affected"] > 200_000, body
    assert threads and loop_thread not in threads


async def test_a_dump_is_never_scanned_on_the_event_loop(api, monkeypatch):
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real = storage_sqlite.rewrite_time_keywords

    def recording(sql: str) -> str:
        threads.append(threading.get_ident())
        return real(sql)

    monkeypatch.setattr(storage_sqlite, "rewrite_time_keywords", recording)
    dump = "CREATE TABLE t (x);\n" + "".join(
        f"INSERT INTO t VALUES (CURRENT_TIMESTAMP || '{i}');\n" for i in range(500)
    )
    resp = await api.post("/db/load", data=dump.encode(), headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert len(threads) == 501 and loop_thread not in threads
    assert await count(api) == 500


async def test_loop_lag_while_a_4_mib_statement_is_written(api):
    """A figure, not a speed assertion: the worst loop delay seen by a 1 ms ticker during the write."""
    await post(api, ["CREATE TABLE t (x)"])
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        for _ in range(1_000_000):
            if done.is_set():
                return
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - started - 0.001)

    probe = asyncio.create_task(ticker())
    status, _, body = await post(api, [_big_statement()])
    done.set()
    await probe
    assert status == 200, body
    print(f"\nloop lag during a 4 MiB write: {worst * 1000:.1f} ms")
    assert worst < 5.0  # generous: a stall of seconds would make peers declare this node dead


# --- loads and the node's own tables -------------------------------------------------------------------------


async def test_a_dump_of_a_backup_loads_and_keeps_this_nodes_index(api):
    """A dump made from a backup holds the node's own tables: those statements are skipped, the rest loads."""
    dump = (
        "CREATE TABLE _talentnest_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;\n"
        "INSERT INTO _talentnest_state VALUES('applied_index', 999999);\n"
        "CREATE TABLE t (x);\nINSERT INTO t VALUES (1);\n"
    )
    resp = await api.post("/db/load", data=dump.encode(), headers=ADMIN)
    assert resp.status == 200, await resp.text()
    index = int(resp.headers["X-TalentNest-Index"])
    assert await api.database.applied_index() == index < 999999
    assert await count(api) == 1


async def test_loading_a_backup_file_records_the_loads_index_and_forgets_its_request_ids(api):
    await post(api, ["CREATE TABLE t (x)"])
    body = ["INSERT INTO t VALUES (1)"]
    await post(api, body, request_id="before-backup")
    resp = await api.get("/db/backup", headers=ADMIN)
    assert resp.status == 200
    backup = await resp.read()
    resp = await api.post("/db/load", data=backup, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    index = int(resp.headers["X-TalentNest-Index"])
    assert await api.database.applied_index() == index
    # The loaded file's request IDs named writes of the database it was taken from: this one applies anew.
    status, headers, _ = await post(api, body, request_id="before-backup")
    assert status == 200 and int(headers["X-TalentNest-Index"]) == index + 1
    assert await count(api) == 2
