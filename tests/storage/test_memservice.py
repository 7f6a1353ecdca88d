"""The in-memory data service answers like the real one: same raw results for the same writes and reads."""

from __future__ import annotations

import asyncio
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import sqlreq as q
from node.service import DataService, LocalDataService, WriteRequest
from node.storage.sqlite import Database, Limits
from tests.storage.test_statemachine import STATEMENTS
from tests.support.memservice import InMemoryDataService

SCHEMA = (
    "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE t (x INTEGER UNIQUE)",
    "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
)
READ = q.DbRequest(
    tuple(q.Statement(f"SELECT * FROM {table} ORDER BY 1") for table in ("t", "child", "parent")), q.Flags()
)


def _request(sqls, transaction=False, request_id=None) -> WriteRequest:
    return WriteRequest(tuple(q.Statement(s) for s in sqls), transaction, request_id=request_id)


def _essence(results) -> list:
    """Results without what only the real database adds (timings)."""
    return [dataclasses.replace(r, time_s=None) for r in results]


async def _run(service: DataService, writes) -> list:
    out = []
    for request in writes:
        outcome = await service.submit(request, "client")
        out.append((_essence(outcome.results), outcome.index, outcome.duplicate))
    out.append(_essence(await service.read(READ, q.Level.WEAK, "client")))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    writes=st.lists(
        st.tuples(
            st.lists(st.sampled_from(STATEMENTS), min_size=1, max_size=3),
            st.booleans(),
            st.none() | st.sampled_from(["a", "b"]),
        ),
        max_size=5,
    )
)
def test_memory_and_sqlite_services_agree(tmp_path_factory, writes):
    requests = [_request(SCHEMA)] + [_request(s, tx, rid) for s, tx, rid in writes]

    async def real() -> list:
        database = Database(
            tmp_path_factory.mktemp("svc"), limits=Limits(write_step_budget=200_000), queue_size=8
        )
        await database.open()
        try:
            seeds = iter(range(1, 1000))
            svc = LocalDataService(
                database, wall_clock_ns=lambda: 1_700_000_000_000_000_000, seeds=lambda: next(seeds)
            )
            return await _run(svc, requests)
        finally:
            await database.close()

    memory = asyncio.run(_run(InMemoryDataService(step_budget=200_000), requests))
    assert memory == asyncio.run(real())
