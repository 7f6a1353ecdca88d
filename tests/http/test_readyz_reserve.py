"""/readyz names the log reserve: below LOG_RESERVE_BYTES free in DATA_DIR writes are refused (the log's
append refuses them, node.storage.log), so the node is not ready for writes and says why."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.http import db as http_db
from node.http.common import make_error_middleware
from node.http.db import DbRoutes
from node.runtime.mailbox import LatestCell
from node.service import LocalDataService
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import QuietLog


@pytest.fixture
async def database(tmp_path):
    db = Database(tmp_path / "data", limits=Limits(), queue_size=8)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


async def readyz(database: Database, reserve: int) -> tuple[int, str]:
    decisions: LatestCell = LatestCell()
    decisions.publish(object())
    app = web.Application(middlewares=[make_error_middleware(QuietLog())])
    DbRoutes(
        service=LocalDataService(database), jwt_secret="s" * 32, decisions=decisions, max_body_bytes=1024,
        max_load_bytes=1024, max_statements=4, body_read_timeout_s=1.0, log_reserve_bytes=reserve,
    ).add_to(app)  # fmt: skip
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/readyz")
        return resp.status, await resp.text()


async def test_below_the_reserve_readyz_is_503_and_says_so(database):
    status, text = await readyz(database, 1 << 62)  # more than any disk has free
    assert status == 503
    assert "[-]log below reserve:" in text and "LOG_RESERVE_BYTES is 4611686018427387904" in text


async def test_with_room_or_no_reserve_it_is_ready(database):
    assert (await readyz(database, 0))[0] == 200
    status, text = await readyz(database, 1)
    assert status == 200 and "reserve" not in text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(free=st.integers(0, 1 << 40), reserve=st.integers(0, 1 << 40))
async def test_the_line_appears_exactly_when_free_space_is_below_a_set_reserve(database, free, reserve):
    original = http_db.free_bytes
    http_db.free_bytes = lambda path: free  # what statvfs would say
    try:
        status, text = await readyz(database, reserve)
    finally:
        http_db.free_bytes = original
    below = reserve > 0 and free < reserve
    assert ("[-]log below reserve" in text) == below
    if below:
        assert status == 503 and f"{free} bytes free" in text
