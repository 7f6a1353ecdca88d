"""X-TalentNest-Index names a stored write only: a write whose group COMMIT failed (nothing stored) answers
without it. The COMMIT is made to fail on the real write connection by wrapping the operations the state
machine uses, so everything else (SQLite, the service, HTTP) is the real path."""

from __future__ import annotations

import time

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth
from node.storage import statemachine
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import start_db_api

SECRET = "a-test-secret-that-is-long-enough-0123456789"
WRITE = {"Authorization": "Bearer " + auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time(), ttl_s=86_400)}


class _FailingCommit:
    """The write connection's operations, except that COMMIT raises as a full disk makes it."""

    def __init__(self, ops) -> None:
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        if sql == "COMMIT":
            raise apsw.FullError("database or disk is full")
        return self._ops.internal(sql, params)


@pytest.fixture
def commit_fails(monkeypatch):
    """Call with True to make every later group COMMIT fail, False to let them succeed again."""
    real = statemachine.apply
    failing = {"on": False}

    def apply(ops, entries):
        return real(_FailingCommit(ops) if failing["on"] else ops, entries)

    monkeypatch.setattr(statemachine, "apply", apply)
    return lambda on: failing.__setitem__("on", on)


@pytest.fixture
async def api(tmp_path):
    database = Database(tmp_path / "data", limits=Limits(), queue_size=16)
    await database.open()
    client = await start_db_api(database, secret=SECRET, max_statements=50)
    try:
        yield client
    finally:
        await client.close()
        await database.close()


async def _write(api, statements, query=""):
    resp = await api.post("/db/execute" + query, json=statements, headers=WRITE)
    return resp.status, resp.headers, (await resp.json())["results"]


async def test_a_failed_group_commit_answers_without_an_index(api, commit_fails):
    status, headers, _ = await _write(api, ["CREATE TABLE t (x)"])
    assert status == 200 and int(headers["X-TalentNest-Index"]) >= 1
    commit_fails(True)
    status, headers, results = await _write(api, ["INSERT INTO t VALUES (1)"])
    assert status == 200
    assert results == [{"error": "rolled back: COMMIT failed: database or disk is full"}]
    assert "X-TalentNest-Index" not in headers
    commit_fails(False)
    status, headers, results = await _write(api, ["INSERT INTO t VALUES (2)"])
    assert status == 200 and "X-TalentNest-Index" in headers and "error" not in results[0]


_STATEMENTS = st.sampled_from(
    [
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (randomblob(8))",
        "INSERT INTO nope VALUES (1)",  # a statement error: the entry still commits
        "UPDATE t SET x = x + 1",
        "DELETE FROM t WHERE x > 5",
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(
        st.tuples(st.lists(_STATEMENTS, min_size=1, max_size=4), st.booleans(), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
async def test_the_index_header_is_present_exactly_when_the_commit_succeeded(api, commit_fails, writes):
    """Any statements, with or without ``transaction``, COMMIT failing or not: the header is there iff the
    entry committed, and then every committed index is new and increasing."""
    await _write(api, ["CREATE TABLE IF NOT EXISTS t (x)"])
    last = 0
    for statements, transaction, fail in writes:
        commit_fails(fail)
        try:
            status, headers, results = await _write(api, statements, "?transaction" if transaction else "")
        finally:
            commit_fails(False)
        assert status == 200 and len(results) == len(statements)
        if fail:
            assert "X-TalentNest-Index" not in headers
            assert all("rolled back" in r.get("error", "") for r in results), results
        else:
            index = int(headers["X-TalentNest-Index"])
            assert index > last
            last = index
