"""Reading a node's copy for the convergence check (node.check.workload.Client.contents) against an
in-process stand-in for a node's /db/query: real SQL on SQLite, answered in the node's shape, with the
node's 10,000-row limit per result."""

from __future__ import annotations

import sqlite3

import aiohttp
import pytest
from aiohttp import web

from node.check.workload import Client, WorkloadConfig

ROW_LIMIT = 10_000  # a node's default: more rows answer "result too large"


async def serve(db: sqlite3.Connection) -> tuple[web.AppRunner, str]:
    async def query(request: web.Request) -> web.Response:
        assert request.query.get("level") == "none"
        results = []
        for statement in await request.json():
            sql, *params = statement if isinstance(statement, list) else [statement]
            rows = db.execute(sql, params).fetchall()
            if len(rows) > ROW_LIMIT:
                results.append({"error": f"result too large: more than {ROW_LIMIT} rows"})
            else:
                results.append({"columns": ["v"], "values": [list(r) for r in rows]})
        return web.json_response({"results": results})

    app = web.Application()
    app.router.add_post("/db/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("count", [0, 1, 4_999, 5_000, 5_001, 25_000])
async def test_a_set_larger_than_a_nodes_row_limit_is_read_whole_in_pages(count):
    """Regression: the set was read with one SELECT, which a node refuses above 10,000 rows, so a run that
    acknowledged more values never converged as far as the check could see."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE w_set (v INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE w_reg (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    values = sorted({(i * 7919) % 1_000_003 - 500_000 for i in range(count)})  # negatives too
    db.executemany("INSERT INTO w_set (v) VALUES (?)", [(v,) for v in values])
    db.executemany("INSERT INTO w_reg (k, v) VALUES (?, ?)", [("k0", 3), ("k1", 5)])
    runner, url = await serve(db)
    try:
        config = WorkloadConfig(urls=(url,), token="t", duration_s=1, max_ops=1, request_timeout_s=5, seed=1)
        async with aiohttp.ClientSession() as session:
            got = await Client(config, session).contents(url, "w")
    finally:
        await runner.cleanup()
    assert got == {"set": values, "reg": [["k0", 3], ["k1", 5]]}


async def test_an_unreadable_node_has_no_contents():
    config = WorkloadConfig(
        urls=("http://127.0.0.1:9",), token="t", duration_s=1, max_ops=1, request_timeout_s=2, seed=1
    )
    async with aiohttp.ClientSession() as session:
        assert await Client(config, session).contents("http://127.0.0.1:9", "w") is None
